"""Layer-wise loss and target alignment (spec §8)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import graph_index_from_ptr
from .geometry import safe_norm
from .model import E3RelaxOutput

# The 27 candidate images t in {-1, 0, 1}^3, in a fixed order so ties resolve deterministically.
_IMAGES = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.int64)


def unwrap_targets(pos_unrelaxed: Tensor, pos_relaxed: Tensor, cell_relaxed: Tensor, ptr: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Move each relaxed atom to its image nearest the unrelaxed atom (done once, in preprocessing).

    For atom i, ``t_i`` in {-1, 0, 1}^3 minimises ``|p_u,i - (p_r,i + t_i @ C_r)|``; note the
    *relaxed* cell. Computed in the inputs' dtype (the original used float32).

    Args:
        pos_unrelaxed: ``(N, 3)`` Å.  pos_relaxed: ``(N, 3)`` Å, same atom order.
        cell_relaxed: ``(G, 3, 3)`` Å, rows = lattice vectors.  ptr: ``(G+1,)`` int64.

    Returns:
        ``(unwrapped (N, 3) Å, images (N, 3) int64)``.
    """
    graph_index = graph_index_from_ptr(ptr, pos_relaxed.shape[0])
    images = _IMAGES.to(pos_relaxed.device)
    shifts = torch.einsum("tp,npq->ntq", images.to(pos_relaxed.dtype), cell_relaxed[graph_index])
    candidates = pos_relaxed.unsqueeze(1) + shifts  # (N, 27, 3)
    best = torch.linalg.vector_norm(pos_unrelaxed.unsqueeze(1) - candidates, dim=-1).argmin(dim=1)
    return candidates[torch.arange(len(best), device=best.device), best], images[best]


@dataclass
class LossTerms:
    """``total`` = sum over layers of ``positions[n] + cells[n]`` (scalars)."""

    total: Tensor
    positions: list[Tensor]
    cells: list[Tensor]


def layerwise_loss(output: E3RelaxOutput, target_positions: Tensor, target_cells: Tensor) -> LossTerms:
    """E3Relax's training loss, equal weights for every layer and both terms (spec §8).

    Position term: mean over all atoms of the batch of the safe norm ``|p_n - p*|`` (Å), so larger
    crystals weigh more. Cell term: mean over the 9G entries of ``|C_n - C*|`` (Å). Predictions are
    not re-wrapped; targets must be unwrapped first (:func:`unwrap_targets`).

    Args:
        output: per-layer predictions of :class:`~e3relax_fast.model.E3Relax`.
        target_positions: ``(N, 3)`` Å.  target_cells: ``(G, 3, 3)`` Å.
    """
    pos_terms = [safe_norm(p - target_positions.to(p.dtype)).mean() for p in output.positions]
    cell_terms = [(c - target_cells.to(c.dtype)).abs().mean() for c in output.cells]
    total = torch.stack(pos_terms).sum() + torch.stack(cell_terms).sum()
    return LossTerms(total, pos_terms, cell_terms)
