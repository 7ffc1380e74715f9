"""Ragged batches of crystals.

Atoms of ``G`` crystals are concatenated; ``ptr`` (CSR, shape ``(G+1,)``) gives each crystal's
atom range, so no crystal is padded to the size of the largest. Edges, when present, are sorted by
receiver (target) and therefore contiguous per crystal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .geometry import MAX_NEIGHBORS, RADIUS


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


@dataclass
class Batch:
    """A batch of ``G`` crystals with ``N`` atoms in total and ``E`` edges.

    Attributes:
        atomic_numbers: ``(N,)`` int64, Z of each atom (1..117).
        positions: ``(N, 3)`` float32/float64, Cartesian positions in Å (never wrapped).
        cells: ``(G, 3, 3)`` same dtype as ``positions``; rows are the lattice vectors a, b, c in Å.
        ptr: ``(G+1,)`` int64; atoms of crystal g are ``ptr[g]:ptr[g+1]``.
        edge_index: optional ``(2, E)`` int64, row 0 = source j, row 1 = target i (global atom
            indices). A graph given here is used as is (e.g. precomputed by the original pipeline).
        cell_offsets: optional ``(E, 3)`` int64 image of the source: the edge vector is
            ``positions[j] + cell_offsets @ cells[g] - positions[i]`` (Å).
        rowptr: optional ``(N+1,)`` int64 receiver CSR, given only when the edges are sorted by
            receiver (as :meth:`with_graph` builds them): the model then uses the edges as they are
            instead of sorting them.
    """

    atomic_numbers: Tensor
    positions: Tensor
    cells: Tensor
    ptr: Tensor
    edge_index: Tensor | None = None
    cell_offsets: Tensor | None = None
    rowptr: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.edge_index is None) != (self.cell_offsets is None):
            raise ValueError("edge_index and cell_offsets must be given together")
        if self.rowptr is not None and (self.edge_index is None or self.rowptr.shape != (self.num_atoms + 1,)):
            raise ValueError("rowptr must be the (N+1,) receiver CSR of a graph given with it")
        n, g = self.positions.shape[0], self.cells.shape[0]
        if self.positions.shape != (n, 3) or self.atomic_numbers.shape != (n,):
            raise ValueError(
                f"positions must be (N, 3) and atomic_numbers (N,); got {tuple(self.positions.shape)} "
                f"and {tuple(self.atomic_numbers.shape)}"
            )
        if self.cells.shape != (g, 3, 3) or self.ptr.shape != (g + 1,):
            raise ValueError(
                f"cells must be (G, 3, 3) and ptr (G+1,); got {tuple(self.cells.shape)} and "
                f"{tuple(self.ptr.shape)}"
            )

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays, dtype: torch.dtype = torch.float64) -> Batch:
        """Concatenate ``(atomic_numbers (n,), positions (n, 3) Å, cell (3, 3) Å)`` triples."""
        counts = [len(z) for z, _, _ in arrays]
        ptr = torch.zeros(len(arrays) + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        if arrays:
            z = torch.cat([torch.as_tensor(z, dtype=torch.int64).reshape(-1) for z, _, _ in arrays])
            pos = torch.cat([torch.as_tensor(p, dtype=dtype).reshape(-1, 3) for _, p, _ in arrays])
            cells = torch.stack([torch.as_tensor(c, dtype=dtype).reshape(3, 3) for _, _, c in arrays])
        else:
            z = torch.zeros(0, dtype=torch.int64)
            pos = torch.zeros(0, 3, dtype=dtype)
            cells = torch.zeros(0, 3, 3, dtype=dtype)
        return cls(z, pos, cells, ptr)

    @classmethod
    def collate(cls, batches: list[Batch]) -> Batch:
        """Concatenate batches (graphs included when every batch has one)."""
        if not batches:
            raise ValueError("Batch.collate needs at least one batch")
        ptrs, shift = [torch.zeros(1, dtype=torch.int64)], 0
        for b in batches:
            ptrs.append(b.ptr[1:] + shift)
            shift += b.num_atoms
        has_graph = all(b.has_graph for b in batches)
        edge_index = cell_offsets = rowptr = None
        if has_graph:
            offs, edges, rowptrs, acc, edge_acc = [], [], [], 0, 0
            for b in batches:
                edges.append(b.edge_index + acc)
                offs.append(b.cell_offsets)
                if b.rowptr is not None:
                    rowptrs.append(b.rowptr[1:] + edge_acc)
                acc += b.num_atoms
                edge_acc += b.edge_index.shape[1]
            edge_index = torch.cat(edges, dim=1)
            cell_offsets = torch.cat(offs)
            # Receiver-sorted parts concatenate to a receiver-sorted whole.
            if len(rowptrs) == len(batches):
                rowptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=edge_index.device), *rowptrs])
        return cls(
            torch.cat([b.atomic_numbers for b in batches]),
            torch.cat([b.positions for b in batches]),
            torch.cat([b.cells for b in batches]),
            torch.cat(ptrs),
            edge_index,
            cell_offsets,
            rowptr,
        )

    # --- properties ---------------------------------------------------------------------------
    @property
    def num_graphs(self) -> int:
        return self.cells.shape[0]

    @property
    def num_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def has_graph(self) -> bool:
        return self.edge_index is not None

    def graph_index(self) -> Tensor:
        """``(N,)`` int64 crystal of each atom, computed without a host sync."""
        return graph_index_from_ptr(self.ptr, self.num_atoms)

    # --- transforms ---------------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> Batch:
        """Move to ``device``; floating fields (positions, cells) also cast to ``dtype``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
            elif t.is_floating_point():
                out[f.name] = t.to(device=device, dtype=dtype or t.dtype)
            else:
                out[f.name] = t.to(device=device)
        return Batch(**out)

    def with_graph(self, radius: float = RADIUS, max_neighbors: int = MAX_NEIGHBORS, backend: str = "auto") -> Batch:
        """Return a copy holding the graph of :func:`e3relax_fast.build_graph` (receiver-sorted, with
        its ``rowptr``)."""
        from .graph import build_graph  # graph.py imports this module

        g = build_graph(self.positions, self.cells, self.ptr, radius, max_neighbors, backend=backend)
        return replace(self, edge_index=g.edge_index, cell_offsets=g.cell_offsets, rowptr=g.rowptr)

    def select(self, graphs: list[int]) -> Batch:
        """The sub-batch of the listed crystals (in that order), graph included."""
        sizes = self.ptr[1:] - self.ptr[:-1]
        parts = []
        for g in graphs:
            lo, hi = int(self.ptr[g]), int(self.ptr[g + 1])
            sub = Batch(
                self.atomic_numbers[lo:hi],
                self.positions[lo:hi],
                self.cells[g : g + 1],
                torch.tensor([0, int(sizes[g])], dtype=torch.int64, device=self.ptr.device),
            )
            if self.has_graph:
                mask = (self.edge_index[1] >= lo) & (self.edge_index[1] < hi)
                sub.edge_index = self.edge_index[:, mask] - lo
                sub.cell_offsets = self.cell_offsets[mask]
                if self.rowptr is not None:  # a receiver-sorted graph keeps its order under the mask
                    sub.rowptr = self.rowptr[lo:hi + 1] - self.rowptr[lo]
            parts.append(sub)
        return Batch.collate(parts)


def graph_index_from_ptr(ptr: Tensor, num_atoms: int) -> Tensor:
    """``(N,)`` int64 crystal index of each atom from CSR ``ptr``; ``output_size`` avoids a sync."""
    counts = ptr[1:] - ptr[:-1]
    graphs = torch.arange(counts.shape[0], device=ptr.device)
    return torch.repeat_interleave(graphs, counts, output_size=num_atoms)


def plan_batches(
    num_atoms: Sequence[int], batch_size: int | None = None, max_atoms: int | None = None
) -> list[list[int]]:
    """Group consecutive structures into batches.

    A batch is closed before it would exceed ``batch_size`` structures or ``max_atoms`` atoms in
    total (either bound may be ``None``); a structure larger than ``max_atoms`` forms a batch alone.

    Args:
        num_atoms: atom count of each structure, in order.

    Returns:
        Lists of positions into ``num_atoms``; every position appears exactly once, in order.
    """
    for name, value in (("batch_size", batch_size), ("max_atoms", max_atoms)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    batches: list[list[int]] = []
    current: list[int] = []
    atoms = 0
    for k, n in enumerate(num_atoms):
        too_many = batch_size is not None and len(current) >= batch_size
        too_large = max_atoms is not None and atoms + n > max_atoms
        if current and (too_many or too_large):
            batches.append(current)
            current, atoms = [], 0
        current.append(k)
        atoms += n
    if current:
        batches.append(current)
    return batches
