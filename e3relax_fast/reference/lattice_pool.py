"""Per-crystal pooling of atom features onto the lattice nodes (spec §6 Step E)."""

from __future__ import annotations

from torch import Tensor


def lattice_pool(x: Tensor, ptr: Tensor, graph_index: Tensor) -> Tensor:
    """Mean of ``x`` over the atoms of each crystal.

    Args:
        x: ``(N, ...)`` atom features (any float dtype).
        ptr: ``(G+1,)`` int64 CSR atom ranges.
        graph_index: ``(N,)`` int64 crystal of each atom (consistent with ``ptr``).

    Returns:
        ``(G, ...)`` means; a crystal without atoms gets 0 (its count is clamped to 1).
    """
    num_graphs = ptr.shape[0] - 1
    sums = x.new_zeros((num_graphs, *x.shape[1:])).index_add_(0, graph_index, x)
    counts = (ptr[1:] - ptr[:-1]).clamp(min=1).to(x.dtype)
    return sums / counts.reshape(-1, *([1] * (x.dim() - 1)))
