"""The training loss and target alignment (spec §8): one loss, the golden-tested one, which the
training loop optimises."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..batch import graph_index_from_ptr
from ..geometry import IMAGES_27, align_fractional_centroid, nearest_images, safe_norm
from ..model import E3RelaxOutput

LOSSES = ("l2", "pbc_l1")


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
    return nearest_images(pos_relaxed, pos_unrelaxed, cell_relaxed, graph_index)


@dataclass
class LossTerms:
    """``total`` = sum over layers of ``positions[n] + cells[n]`` (scalars)."""

    total: Tensor
    positions: list[Tensor]
    cells: list[Tensor]
    prior: Tensor | None = None


def layerwise_loss(output: E3RelaxOutput, target_positions: Tensor, target_cells: Tensor, ptr: Tensor | None = None,
                   kind: str = "l2", atom_norm: float | None = None, cell_norm: float | None = None,
                   reference: tuple[Tensor, Tensor] | None = None, cell_weight: float = 1.0,
                   prior_weight: float = 0.0, input_cells: Tensor | None = None) -> LossTerms:
    """E3Relax's training loss: every layer supervised, equal weights for every layer and both terms.

    Position term of layer n: ``kind="l2"`` (the paper's): the safe norm ``|p_n - p*|`` (Å) summed
    over atoms; ``kind="pbc_l1"`` (E3Relax-H2's): ``|p_n + t - p*|_1 / 3`` summed over atoms, with
    ``t`` the image of the target cell that brings the prediction closest to its target (chosen
    without gradient). Either is divided by ``atom_norm`` (default: the atoms of this batch, i.e. a
    mean, so larger crystals weigh more). Cell term: ``|C_n - C*|`` summed over the entries divided
    by ``cell_norm`` (default: 9G). Predictions are not re-wrapped; targets must be unwrapped first
    (:func:`unwrap_targets`).

    Args:
        output: per-layer predictions of :class:`~e3relax_fast.model.E3Relax`.
        target_positions: ``(N, 3)`` Å.  target_cells: ``(G, 3, 3)`` Å.
        ptr: ``(G+1,)`` atom ranges; needed by ``pbc_l1`` and ``reference``.
        atom_norm, cell_norm: under data parallelism, the atoms and cell entries of the *global*
            batch, so that the processes' losses add up to the single-process loss.
        cell_weight: multiplies every layer's cell term (1: the paper's equal weights).
        prior_weight, input_cells: with ``prior_weight`` > 0, a term supervising the volume prior's
            ``output.log_scale`` directly: ``prior_weight`` times ``|ln s - ln(V*/V_in) / 3|`` summed over
            crystals divided by ``cell_norm / 9``, with ``V_in`` the volume of ``input_cells`` ``(G, 3, 3)``
            Å (the model's input) and ``V*`` the target's; in ``LossTerms.prior``.
        reference: ``(positions (N, 3), cells (G, 3, 3))`` of the inputs: each layer's positions are
            first translated so that their fractional centroid is the input's
            (:func:`~e3relax_fast.geometry.align_fractional_centroid`), the translation a relaxation
            keeps and a translation-equivariant model cannot see (the canonical-frame recipe).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    atom_norm = float(target_positions.shape[0]) if atom_norm is None else atom_norm
    cell_norm = float(target_cells.numel()) if cell_norm is None else cell_norm
    if (kind == "pbc_l1" or reference is not None) and ptr is None:
        raise ValueError("loss 'pbc_l1' and a reference need ptr")
    if ptr is not None:
        graph_index = graph_index_from_ptr(ptr, target_positions.shape[0])
    if kind == "pbc_l1":
        images = IMAGES_27.to(device=target_positions.device, dtype=target_positions.dtype)
        target_shifts = torch.einsum("tp,npq->ntq", images, target_cells[graph_index])
    pos_terms, cell_terms = [], []
    total = 0.0
    for pos, cell in zip(output.positions, output.cells, strict=True):
        if reference is not None:
            pos = align_fractional_centroid(pos, cell, reference[0].to(pos.dtype), reference[1].to(pos.dtype),
                                            graph_index, ptr[1:] - ptr[:-1])
        target = target_positions.to(pos.dtype)
        if kind == "l2":
            pos_terms.append(safe_norm(pos - target).sum() / atom_norm)
        else:
            with torch.no_grad():
                best = (pos.unsqueeze(1) + target_shifts - target.unsqueeze(1)).norm(dim=-1).argmin(1)
            shift = target_shifts[torch.arange(len(best), device=best.device), best]
            pos_terms.append((pos + shift - target).abs().sum() / (3 * atom_norm))
        cell_terms.append(cell_weight * (cell - target_cells.to(cell.dtype)).abs().sum() / cell_norm)
        total = total + pos_terms[-1] + cell_terms[-1]
    prior = None
    if prior_weight:
        if output.log_scale is None or input_cells is None:
            raise ValueError("prior_weight needs a model with volume_prior=True and the input cells")
        cells = target_cells.to(output.log_scale.dtype)
        change = torch.log(torch.linalg.det(cells).abs() / torch.linalg.det(input_cells.to(cells.dtype)).abs()) / 3
        prior = prior_weight * (output.log_scale - change).abs().sum() / (cell_norm / 9)
        total = total + prior
    return LossTerms(total, pos_terms, cell_terms, prior)
