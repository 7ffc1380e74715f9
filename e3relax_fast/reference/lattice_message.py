"""Lattice -> atom message of one lattice node (spec §6 Step 0 atom–lattice pairs, Step A.1–3),
reference twin of the fused Triton op (``kernels/lattice_message.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..geometry import lattice_vectors, safe_norm
from .rbf import nonzero_window, radial_basis


def lattice_message(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    graph_index: Tensor,
    centres: Tensor | None,
    k: int,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
) -> tuple[Tensor, Tensor]:
    """Gated message from lattice point k of each atom's crystal to the atom.

    For atom i of crystal g: ``q = C_g[k] - p~_i`` (``p~_i = p_i``, or ``p_i - centres[g]``),
    ``d = safe_norm(q)``, ``w = -q / d``, ``[a1|a2|a3] = x_proj_i * (W f(d) + b) / sqrt(3)``;
    the results are ``ds_i = a3`` (added to s by the caller) and the *replacement*
    ``v_i = (a1 * vec_i + w (x) a2) / sqrt(H)`` (not residual).

    Args:
        x_proj: ``(N, 3H)`` node projection A2(σ(A1 s)) of every atom.
        vec: ``(N, 3, H)`` atom vector features.
        positions: ``(N, 3)`` Å; cells: ``(G, 3, 3)`` Å, rows = lattice vectors.
        graph_index: ``(N,)`` int64 crystal of each atom.
        centres: ``(G, 3)`` Å per-crystal mean positions subtracted from the positions first
            (default mode, translation invariant), or ``None`` for the original's absolute
            positions (``paper_compat``).
        k: lattice node, 0, 1 or 2 (row of the cell).
        edge_weight: ``(3H, R)`` and edge_bias ``(3H,)``: the projection B of the basis.
        rbf_centres: ``(R,)``; rbf_coeff: Gaussian exponent; cutoff: basis cutoff (Å).

    Returns:
        ``(ds (N, H), v_out (N, 3, H))`` in the dtype of ``x_proj``.
    """
    h = vec.shape[2]
    q = lattice_vectors(positions, cells, graph_index, centres)[:, k]
    d = safe_norm(q)
    w = -q / d.unsqueeze(-1)
    window = nonzero_window(d, rbf_centres, rbf_coeff, cutoff)  # the other columns are exact zeros
    basis = radial_basis(d, rbf_centres[window], rbf_coeff, cutoff)
    gate = x_proj * torch.nn.functional.linear(basis, edge_weight[:, window], edge_bias) * (1 / math.sqrt(3.0))
    a1, a2, a3 = gate.split(h, dim=-1)
    v_out = (a1.unsqueeze(1) * vec + w.unsqueeze(-1) * a2.unsqueeze(1)) * (1 / math.sqrt(h))
    return a3, v_out
