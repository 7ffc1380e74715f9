"""Training data: unrelaxed → relaxed pairs with their targets and graphs, built once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..batch import Batch
from ..geometry import MAX_NEIGHBORS, RADIUS
from ..graph import build_graph
from ..io.pairs import Pair
from .loss import unwrap_targets


class PairDataset(torch.utils.data.Dataset):
    """Pairs with unwrapped targets and precomputed graphs.

    Targets are moved to the image nearest each unrelaxed atom (in the relaxed cell) once; graphs
    are built once on the unrelaxed structures, in batches, and cached at ``cache`` when given
    (keyed by a hash of the inputs and the graph rule, so a stale cache is never used).
    Items are single-crystal dicts; :meth:`collate` joins them into ``(Batch, pos_target (N, 3),
    cell_target (G, 3, 3))``.
    """

    def __init__(self, pairs: list[Pair], radius: float = RADIUS, max_neighbors: int = MAX_NEIGHBORS,
                 cache: str | Path | None = None, graph_backend: str = "auto", chunk: int = 256):
        self.pairs = pairs
        self.items = []
        graphs = self._load_or_build_graphs(cache, radius, max_neighbors, graph_backend, chunk)
        for pair, (edge_index, cell_offsets) in zip(pairs, graphs, strict=True):
            ptr = torch.tensor([0, len(pair.atomic_numbers)])
            target, _ = unwrap_targets(torch.from_numpy(pair.pos_unrelaxed), torch.from_numpy(pair.pos_relaxed),
                                       torch.from_numpy(pair.cell_relaxed)[None], ptr)
            self.items.append({
                "atomic_numbers": torch.from_numpy(pair.atomic_numbers),
                "positions": torch.from_numpy(pair.pos_unrelaxed),
                "cell": torch.from_numpy(pair.cell_unrelaxed),
                "pos_target": target,
                "cell_target": torch.from_numpy(pair.cell_relaxed),
                "edge_index": edge_index,
                "cell_offsets": cell_offsets,
                # The cached edges are receiver-sorted (as built): their CSR lets the model skip sorting.
                "rowptr": torch.searchsorted(edge_index[1], torch.arange(len(pair.atomic_numbers) + 1)),
            })

    def _fingerprint(self, radius: float, max_neighbors: int) -> str:
        h = hashlib.sha256(f"{radius}:{max_neighbors}".encode())
        for p in self.pairs:
            for arr in (p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed):
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def _load_or_build_graphs(self, cache, radius, max_neighbors, backend, chunk):
        key = self._fingerprint(radius, max_neighbors) if cache is not None else None
        if cache is not None and Path(cache).exists():
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == key:
                return list(zip(stored["edge_index"], stored["cell_offsets"], strict=True))
        graphs = []
        for start in range(0, len(self.pairs), chunk):
            part = self.pairs[start:start + chunk]
            batch = Batch.from_arrays([(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in part])
            g = build_graph(batch.positions, batch.cells, batch.ptr, radius, max_neighbors, backend=backend)
            # Edges are receiver-sorted, hence contiguous per crystal.
            edge_ptr = g.rowptr[batch.ptr]
            for k in range(len(part)):
                lo, hi = int(edge_ptr[k]), int(edge_ptr[k + 1])
                graphs.append((g.edge_index[:, lo:hi] - batch.ptr[k], g.cell_offsets[lo:hi]))
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "edge_index": [e for e, _ in graphs], "cell_offsets": [o for _, o in graphs]},
                       cache)
        return graphs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def batches(self, batch_size: int):
        """The dataset in order, as batches of at most ``batch_size`` crystals (graphs included)."""
        for start in range(0, len(self.items), batch_size):
            yield self.collate(self.items[start:start + batch_size])[0]

    def targets(self, batch_size: int):
        """``(pos_target (N, 3), cell_target (G, 3, 3))`` of each batch of :meth:`batches`."""
        for start in range(0, len(self.items), batch_size):
            yield self.collate(self.items[start:start + batch_size])[1:]

    @staticmethod
    def collate(items: list[dict]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        parts = [Batch(it["atomic_numbers"], it["positions"], it["cell"][None],
                       torch.tensor([0, len(it["atomic_numbers"])]), it["edge_index"], it["cell_offsets"],
                       it["rowptr"])
                 for it in items]
        return (Batch.collate(parts), torch.cat([it["pos_target"] for it in items]),
                torch.stack([it["cell_target"] for it in items]))
