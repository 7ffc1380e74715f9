"""The E3Relax graph of a ragged batch (spec §3): the periodic radius graph with a per-centre top-K,
through the op table (:func:`build_graph`), or into fixed-size buffers for CUDA graphs
(:func:`build_graph_fixed`)."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .batch import Batch, Graph
from .geometry import MAX_NEIGHBORS, RADIUS
from .ops import compiled


def build_graph(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = RADIUS,
    max_neighbors: int = MAX_NEIGHBORS,
    backend: str = "auto",
    reserved: Tensor | None = None,
) -> Graph:
    """Build the E3Relax graph of every crystal in a ragged batch.

    The same deterministic graph serves both model modes (spec §3.3).

    Args:
        positions: ``(N, 3)`` float32/float64 Cartesian positions in Å (used as given, not wrapped).
        cells: ``(G, 3, 3)`` cells in Å, rows = lattice vectors a, b, c.
        ptr: ``(G+1,)`` int64 CSR atom ranges of the crystals.
        radius: candidate radius in Å (pairs at exactly ``radius`` are included).
        max_neighbors: K of the per-centre cut, taken over all candidates including periodic
            self-images, which are then removed and replaced by the six fixed self-image edges.
        backend: ``"auto" | "reference" | "cpu" | "cuda" | "triton"``.
        reserved: optional ``(N,)`` 0/1 ints; centre i keeps at most ``max_neighbors - reserved[i]``
            candidates. Emulates the original's "49-slot effect" (spec §3.2) for golden tests.

    Returns:
        :class:`~e3relax_fast.batch.Graph`, receiver-sorted, on the device of ``positions``.
    """
    _, fn = ops.resolve(ops.RADIUS_GRAPH, backend, positions.device.type)
    return Graph(*fn(positions, cells, ptr, radius, max_neighbors, reserved))


class GraphCapacityError(RuntimeError):
    """The fixed-capacity graph needs more edges than were allocated."""

    def __init__(self, required: int, capacity: int):
        super().__init__(
            f"radius_graph: the graph has {required} edges but the fixed capacity is {capacity}; "
            f"rebuild with capacity >= {required}"
        )
        self.required = required
        self.capacity = capacity


class FixedGraph(NamedTuple):
    """A graph in caller-sized buffers. Edges ``[num_edges, capacity)`` are padding
    (``edge_index == pad_index``, zero offsets and distances); everything else is exactly
    :class:`~e3relax_fast.batch.Graph`'s content (``rowptr`` always describes the full graph).

    num_edges: 0-d int64 tensor, edges of the full graph (may exceed the capacity).
    status: 0-d int64 tensor, 0 when the graph is complete and valid; otherwise error bits
        (:data:`~e3relax_fast.ops.compiled.ERR_OVERFLOW` = capacity too small, the others = invalid input).
    """

    edge_index: Tensor
    cell_offsets: Tensor
    rowptr: Tensor
    distances: Tensor
    num_candidates: Tensor
    num_edges: Tensor
    status: Tensor


def check_fixed(graph: FixedGraph) -> None:
    """Raise if ``graph`` is incomplete or its input was invalid (synchronises with the device)."""
    status, n_edges = (int(v) for v in torch.stack((graph.status, graph.num_edges)).tolist())
    if status & compiled.ERR_OVERFLOW:
        raise GraphCapacityError(n_edges, graph.distances.shape[0])
    if status:
        raise ValueError(compiled.error_message(status))


def build_graph_fixed(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    capacity: int,
    radius: float = RADIUS,
    max_neighbors: int = MAX_NEIGHBORS,
    reserved: Tensor | None = None,
    *,
    check: bool = True,
    pad_index: int = -1,
) -> FixedGraph:
    """The radius graph written into buffers of ``capacity`` edges, never silently truncated.

    On CUDA (``_C`` with CUDA) nothing here synchronises with the host except the final check,
    so with ``check=False`` the call can be captured in a CUDA graph: inspect ``status`` (or call
    :func:`check_fixed`) after replay. With ``check=True`` (default) a graph that does not fit
    raises :class:`GraphCapacityError` and invalid input raises ``ValueError``. An upper bound
    that always fits is ``N * (max_neighbors + 6)``.

    Elsewhere (CPU tensors, or CUDA tensors without the ``cuda`` backend) the same contract is
    provided on top of the ``cpu`` backend (or the reference); that path synchronises.
    """
    capacity = int(capacity)
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    device = positions.device
    k = int(max_neighbors)
    edge_index = torch.full((2, capacity), pad_index, dtype=torch.int64, device=device)
    offsets = torch.zeros((capacity, 3), dtype=torch.int64, device=device)
    dist = torch.zeros(capacity, dtype=torch.float64, device=device)
    if device.type == "cuda" and compiled.CUDA_UNAVAILABLE_REASON is None:
        with torch.cuda.device(device):
            pos, cell, p, res = compiled.graph_inputs(positions, cells, ptr, reserved, device)
            kept, kept_count, ncand, status, rowptr = compiled.cuda_select(pos, cell, p, res, radius, k)
            if capacity and pos.shape[0]:
                compiled.cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist)
            n_edges = rowptr[-1].clone()
            status = status[0] | torch.where(n_edges > capacity, compiled.ERR_OVERFLOW, 0)
    else:
        try:
            _, fn = ops.resolve(ops.RADIUS_GRAPH, "cpu", "cpu")
        except ops.BackendUnavailableError:
            _, fn = ops.resolve(ops.RADIUS_GRAPH, "reference", device.type)
        ei, off, rowptr, d, ncand = fn(positions, cells, ptr, radius, k, reserved)
        e = d.shape[0]
        m = min(e, capacity)
        edge_index[:, :m] = ei[:, :m]
        offsets[:m] = off[:m]
        dist[:m] = d[:m]
        n_edges = torch.tensor(e, dtype=torch.int64, device=device)
        status = torch.tensor(compiled.ERR_OVERFLOW if e > capacity else 0, dtype=torch.int64, device=device)
    graph = FixedGraph(edge_index, offsets, rowptr, dist, ncand, n_edges, status)
    if check:
        check_fixed(graph)
    return graph


def drop_images(batch: Batch, periodic: Tensor) -> Batch:
    """The batch with the edges of its graph that cross a non-periodic axis removed.

    Args:
        batch: a batch with a receiver-sorted graph (``rowptr`` given).
        periodic: ``(G, 3)`` bool, which lattice vectors of each crystal are periodic; an edge whose
            image offset is non-zero along a non-periodic axis of its crystal is dropped (a slab's
            self-image edges through its vacuum, for one).

    Returns:
        A copy with the remaining edges, still receiver-sorted, and their ``rowptr``.
    """
    if batch.rowptr is None:
        raise ValueError("drop_images needs a receiver-sorted graph with its rowptr")
    edge_graph = batch.graph_index()[batch.edge_index[1]]
    crossing = ((batch.cell_offsets != 0) & ~periodic.to(batch.cell_offsets.device)[edge_graph]).any(dim=1)
    keep = ~crossing
    kept_per_receiver = torch.zeros(batch.num_atoms, dtype=torch.int64, device=keep.device)
    kept_per_receiver.index_add_(0, batch.edge_index[1], keep.to(torch.int64))
    rowptr = torch.zeros(batch.num_atoms + 1, dtype=torch.int64, device=keep.device)
    rowptr[1:] = torch.cumsum(kept_per_receiver, 0)
    return replace(batch, edge_index=batch.edge_index[:, keep], cell_offsets=batch.cell_offsets[keep], rowptr=rowptr)
