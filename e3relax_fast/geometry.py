"""Spec constants and the geometry every part shares: the reference ops, the model, the kernels'
host code, the loss and the metrics (spec §1.3, §3, §4, §6 Step 0).

Units: Å; cells are ``(G, 3, 3)`` with the lattice vectors a, b, c as rows.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

# --- the graph rule (spec §3) ---------------------------------------------------------------------
#: Graph radius in Å and per-centre neighbour cap of the trained configuration.
RADIUS = 6.0
MAX_NEIGHBORS = 50
#: Quantum of the distance key q(d) = round(d / DISTANCE_QUANTUM) that orders candidates, in Å.
DISTANCE_QUANTUM = 1e-6
#: Margins added to the fractional reach of the image enumeration so that an image exactly at the
#: radius is never missed by rounding in inv(C) or in f = p @ inv(C) (errors ~1e-16 relative; a
#: margin only enlarges the enumerated superset, it never changes the candidate set).
REACH_REL_MARGIN = 1e-9
REACH_ABS_MARGIN = 1e-9
#: The six fixed self-image offsets of §3.4 (images at +c, +b, +a, +b+c, +a+c, +a+b), in order.
SELF_IMAGE_OFFSETS = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0))

# --- the radial basis (spec §4) -------------------------------------------------------------------
#: Gaussians of the radial basis and its cutoff in Å (separate from the graph radius).
NUM_RBF = 128
CUTOFF = 30.0

# --- safe norm (spec §1.3) ------------------------------------------------------------------------
EPS = 1e-8  # clamp of the squared norm in the safe norm

#: The 27 images t in {-1, 0, 1}^3 in a fixed (lexicographic) order, so that a nearest-image
#: search resolves ties deterministically; ``(27, 3)`` int64.
IMAGES_27 = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.int64)


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


def nearest_images(positions: Tensor, reference: Tensor, cells: Tensor, graph_index: Tensor) -> tuple[Tensor, Tensor]:
    """Move each atom of ``positions`` by the image ``t`` in {-1, 0, 1}^3 of its crystal's cell that
    brings it closest to the same atom of ``reference`` (first image in :data:`IMAGES_27` order on ties).

    Args:
        positions, reference: ``(N, 3)`` Å, same atom order.  cells: ``(G, 3, 3)`` Å.
        graph_index: ``(N,)`` int64 crystal of each atom.

    Returns:
        ``(moved (N, 3) Å, images (N, 3) int64)``.
    """
    images = IMAGES_27.to(positions.device)
    shifts = torch.einsum("tp,npq->ntq", images.to(positions.dtype), cells[graph_index])
    candidates = positions.unsqueeze(1) + shifts  # (N, 27, 3)
    best = torch.linalg.vector_norm(reference.unsqueeze(1) - candidates, dim=-1).argmin(dim=1)
    return candidates[torch.arange(len(best), device=best.device), best], images[best]


def align_fractional_centroid(positions: Tensor, cells: Tensor, reference: Tensor, reference_cells: Tensor,
                              graph_index: Tensor, counts: Tensor) -> Tensor:
    """Translate each crystal's atoms so that their centroid, in fractions of its cell in ``cells``,
    equals the centroid of ``reference`` in fractions of ``reference_cells``.

    This fixes the one thing a translation-equivariant model cannot know: where a relaxed crystal
    sits. A relaxation keeps it there (the forces sum to zero, so the atoms only move with the cell,
    whose deformation keeps fractional coordinates), and so do the training targets.

    Args:
        positions, reference: ``(N, 3)`` Å.  cells, reference_cells: ``(G, 3, 3)`` Å, rows.
        graph_index: ``(N,)`` int64 crystal of each atom.  counts: ``(G,)`` atoms per crystal.

    Returns:
        ``(N, 3)`` translated positions (differentiable in ``positions`` and ``cells``).
    """
    g = cells.shape[0]
    size = counts.clamp(min=1).to(positions.dtype).unsqueeze(-1)
    mean = positions.new_zeros(g, 3).index_add_(0, graph_index, positions) / size
    ref_mean = reference.new_zeros(g, 3).index_add_(0, graph_index, reference) / size
    frac = torch.linalg.solve(reference_cells.transpose(1, 2), ref_mean.unsqueeze(-1)).squeeze(-1)
    target = torch.einsum("gi,gij->gj", frac.to(cells.dtype), cells)
    return positions + (target - mean)[graph_index]
