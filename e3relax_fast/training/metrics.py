"""The field's relaxation metrics (spec §10), computed per structure.

Every function takes a batch's predictions and targets and returns one value per structure;
averaging over structures (not atoms) is left to the caller, as the spec prescribes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batch import graph_index_from_ptr
from ..geometry import nearest_images
from ..reference.lattice_pool import lattice_pool


def coordinate_mae(pred_positions: Tensor, target_positions: Tensor, ptr: Tensor) -> Tensor:
    """``(G,)`` mean over atoms × xyz of ``|p̂ − p*|`` (Å); predictions are not re-wrapped.

    pred_positions, target_positions: ``(N, 3)`` Å (targets unwrapped). ptr: ``(G+1,)`` int64.
    """
    err = (pred_positions - target_positions).abs().mean(-1)
    return lattice_pool(err, ptr, graph_index_from_ptr(ptr, err.shape[0]))


def periodic_coordinate_mae(pred_positions: Tensor, target_positions: Tensor, target_cells: Tensor,
                            ptr: Tensor) -> Tensor:
    """``(G,)`` periodicity-aware MAE (Å, from E3Relax-H2): each predicted atom is first moved by
    the image ``t`` in {-1, 0, 1}^3 of the *target* cell that brings it closest to its target."""
    graph_index = graph_index_from_ptr(ptr, pred_positions.shape[0])
    best, _ = nearest_images(pred_positions, target_positions, target_cells, graph_index)
    err = (best - target_positions).abs().mean(-1)
    return lattice_pool(err, ptr, graph_index)


def shape_error(pred_cells: Tensor, target_cells: Tensor) -> Tensor:
    """``(G,)`` metric-tensor error ``‖Ĉ Ĉᵀ − C* C*ᵀ‖_F`` (Å²); invariant to rotating the cell."""
    gram = pred_cells @ pred_cells.transpose(-1, -2) - target_cells @ target_cells.transpose(-1, -2)
    return torch.linalg.matrix_norm(gram)


def volume_error(pred_cells: Tensor, target_cells: Tensor) -> Tensor:
    """``(G,)`` ``|det Ĉ − det C*|`` (Å³), signed determinants."""
    return (torch.linalg.det(pred_cells) - torch.linalg.det(target_cells)).abs()


def structure_metrics(pred_positions: Tensor, pred_cells: Tensor, target_positions: Tensor,
                      target_cells: Tensor, ptr: Tensor) -> dict[str, Tensor]:
    """All tensor metrics of one batch, each ``(G,)``: ``coord_mae`` (Å), ``pbc_coord_mae`` (Å),
    ``shape_error`` (Å²), ``volume_error`` (Å³)."""
    return {
        "coord_mae": coordinate_mae(pred_positions, target_positions, ptr),
        "pbc_coord_mae": periodic_coordinate_mae(pred_positions, target_positions, target_cells, ptr),
        "shape_error": shape_error(pred_cells, target_cells),
        "volume_error": volume_error(pred_cells, target_cells),
    }
