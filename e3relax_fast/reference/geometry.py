"""Per-layer geometry recomputed from the fixed graph (spec §6 Step 0)."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8  # clamp of the squared norm in the safe norm (spec §1.3)


def safe_norm(r: Tensor) -> Tensor:
    """``sqrt(max(sum(r**2, -1), 1e-8))`` over the last axis."""
    return torch.sqrt(torch.clamp((r * r).sum(-1), min=EPS))


def edge_vectors(positions: Tensor, cells: Tensor, edge_index: Tensor, cell_offsets: Tensor,
                 edge_graph: Tensor) -> Tensor:
    """``(E, 3)`` edge vectors ``r_e = p_j + o_e @ C_g - p_i`` in Å.

    Args:
        positions: ``(N, 3)`` Å.  cells: ``(G, 3, 3)`` Å, rows = lattice vectors.
        edge_index: ``(2, E)`` int64 (source j, target i).  cell_offsets: ``(E, 3)`` integer image
        of j (any int or float dtype; cast to the positions' dtype).
        edge_graph: ``(E,)`` int64 crystal of each edge.
    """
    j, i = edge_index[0], edge_index[1]
    shift = torch.einsum("ep,epq->eq", cell_offsets.to(positions.dtype), cells[edge_graph])
    return positions[j] + shift - positions[i]


def lattice_vectors(positions: Tensor, cells: Tensor, graph_index: Tensor, centres: Tensor | None) -> Tensor:
    """``(N, 3, 3)`` vectors ``q_ik = l_k - p~_i`` from each atom to lattice point k (rows of C).

    ``centres`` is ``None`` for the original's absolute positions (paper mode), or ``(G, 3)``
    per-crystal mean positions subtracted first (default mode; translation invariant).
    """
    p = positions if centres is None else positions - centres[graph_index]
    return cells[graph_index] - p.unsqueeze(1)
