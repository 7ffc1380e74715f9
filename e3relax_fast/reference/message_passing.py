"""Atom–atom message passing with segment reduction (spec §6 Step B), reference twin of the fused
kernels (``kernels/message_passing.py``, ``csrc/message_passing``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..geometry import edge_vectors, safe_norm
from .rbf import nonzero_window, radial_basis


def message_passing(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    edge_index: Tensor,
    cell_offsets: Tensor,
    edge_graph: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    rowptr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Messages of every edge, summed into its receiver.

    For edge e = (j -> i): ``[b1|b2|b3] = x_proj[j] * (W f(d_e) + b) / sqrt(3)``;
    ``ds_i = sum_e b3``, ``dv_i = sum_e (b1 * vec[j] + u_e (x) b2) / sqrt(H)`` with
    ``u_e = -r_e / |r_e|``.

    Args:
        x_proj: ``(N, 3H)`` node projection Q2(σ(Q1 s)) of every atom.
        vec: ``(N, 3, H)`` atom vector features.
        positions: ``(N, 3)`` Å; cells: ``(G, 3, 3)`` Å rows = lattice vectors.
        edge_index: ``(2, E)`` int64 (source j, target i); cell_offsets: ``(E, 3)`` integer images.
        edge_graph: ``(E,)`` int64 crystal of each edge.
        edge_weight: ``(3H, R)`` and edge_bias ``(3H,)``: the edge projection W.
        rbf_centres: ``(R,)``; rbf_coeff: Gaussian exponent; cutoff: basis cutoff (Å).
        rowptr: optional ``(N+1,)`` receiver CSR of receiver-sorted edges. Unused here (``index_add``
            needs no order); accepted so every backend shares one signature. The fused kernels
            require it.

    Returns:
        ``(ds (N, H), dv (N, 3, H))`` in the dtype of ``x_proj``.
    """
    del rowptr
    n, h = vec.shape[0], vec.shape[2]
    j, i = edge_index[0], edge_index[1]
    r = edge_vectors(positions, cells, edge_index, cell_offsets, edge_graph)
    d = safe_norm(r)
    u = -r / d.unsqueeze(-1)
    window = nonzero_window(d, rbf_centres, rbf_coeff, cutoff)  # the other columns are exact zeros
    basis = radial_basis(d, rbf_centres[window], rbf_coeff, cutoff)
    gate = torch.nn.functional.linear(basis, edge_weight[:, window], edge_bias)
    b1, b2, b3 = (x_proj[j] * gate * (1 / math.sqrt(3.0))).split(h, dim=-1)
    msg_v = (b1.unsqueeze(1) * vec[j] + u.unsqueeze(-1) * b2.unsqueeze(1)) * (1 / math.sqrt(h))
    ds = x_proj.new_zeros(n, h).index_add_(0, i, b3)
    dv = vec.new_zeros(n, 3, h).index_add_(0, i, msg_v)
    return ds, dv
