"""The periodic radius graph with a per-centre top-K (spec §3), behind the backend switch."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import backends
from .reference.radius_graph import radius_graph as _reference_radius_graph

OP = "radius_graph"
backends.declare(OP, {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
backends.register(OP, "reference", _reference_radius_graph)
from . import _ext  # noqa: E402,F401  (registers the compiled "cpu"/"cuda" backends when built)


class Graph(NamedTuple):
    """Receiver-sorted periodic graph of a batch (``E`` edges, ``N`` atoms).

    edge_index: ``(2, E)`` int64, row 0 = source j, row 1 = target i (global atom indices).
    cell_offsets: ``(E, 3)`` int64 image of the source; edge vector
        ``r = pos[j] + cell_offsets @ cell - pos[i]`` (Å).
    rowptr: ``(N+1,)`` int64 CSR over receivers: edges into atom i are ``rowptr[i]:rowptr[i+1]``.
        Within a receiver: its selected neighbours in (distance, j, offset) order, then its six
        self-image edges (0,0,1), (0,1,0), (1,0,0), (0,1,1), (1,0,1), (1,1,0).
    distances: ``(E,)`` float64 edge lengths in Å, computed in float64 from the inputs.
    num_candidates: ``(N,)`` int64 candidates within the radius per centre before the top-K cut
        (periodic self-images included, the zero-offset self pair excluded).
    """

    edge_index: Tensor
    cell_offsets: Tensor
    rowptr: Tensor
    distances: Tensor
    num_candidates: Tensor


def build_graph(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = 6.0,
    max_neighbors: int = 50,
    paper_compat: bool = False,
    backend: str = "auto",
    reserved: Tensor | None = None,
) -> Graph:
    """Build the E3Relax graph of every crystal in a ragged batch.

    Args:
        positions: ``(N, 3)`` float32/float64 Cartesian positions in Å (used as given, not wrapped).
        cells: ``(G, 3, 3)`` cells in Å, rows = lattice vectors a, b, c.
        ptr: ``(G+1,)`` int64 CSR atom ranges of the crystals.
        radius: candidate radius in Å (pairs at exactly ``radius`` are included).
        max_neighbors: K of the per-centre cut, taken over all candidates including periodic
            self-images, which are then removed and replaced by the six fixed self-image edges.
        paper_compat: accepted so callers can pass the model's mode through; the spec (§3.3)
            prescribes the same deterministic graph in both modes.
        backend: ``"auto" | "reference" | "cpu" | "cuda" | "triton"``.
        reserved: optional ``(N,)`` 0/1 ints; centre i keeps at most ``max_neighbors - reserved[i]``
            candidates. Emulates the original's "49-slot effect" (spec §3.2) for golden tests.

    Returns:
        :class:`Graph`, receiver-sorted, on the device of ``positions``.
    """
    del paper_compat  # same graph in both modes (spec §3.3)
    _, fn = backends.resolve(OP, backend, positions.device.type)
    return Graph(*fn(positions, cells, ptr, radius, max_neighbors, reserved))
