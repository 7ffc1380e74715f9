"""Training data: unrelaxed → relaxed pairs with their targets and graphs, built once."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..batch import Batch
from ..frame import SYMPREC, FrameError, canonical_frame
from ..geometry import MAX_NEIGHBORS, RADIUS
from ..graph import build_graph
from ..io.pairs import Pair
from ..io.validate import InvalidStructureError, validate
from .loss import unwrap_targets


class PairDataset(torch.utils.data.Dataset):
    """Pairs as model inputs with targets and graphs, built once.

    With ``frame="canonical"`` (default) each pair is seen in the canonical frame of its unrelaxed
    structure (:mod:`e3relax_fast.frame`), where the model predicts at inference: the input is the
    canonical cell and the target is the relaxed structure read into the same frame; with
    ``frame="input"`` both are used as given (the original's training, for ``paper_compat``).
    Targets are first moved to the image nearest each unrelaxed atom (in the relaxed cell). Graphs
    are built on the inputs, in batches. Everything is cached at ``cache`` when given (keyed by a
    hash of the pairs, the frame and the graph rule, so a stale cache is never used). Items are
    single-crystal dicts; :meth:`collate` joins them into ``(Batch, pos_target (N, 3), cell_target
    (G, 3, 3))``.

    Raises:
        ValueError: a pair is not a valid model input (its unrelaxed or relaxed structure fails
            :func:`~e3relax_fast.io.validate`, as inference inputs do) or its canonical frame cannot
            be built; the message names the pair.
    """

    def __init__(self, pairs: list[Pair], radius: float = RADIUS, max_neighbors: int = MAX_NEIGHBORS,
                 cache: str | Path | None = None, graph_backend: str = "auto", chunk: int = 256,
                 frame: str = "canonical", symprec: float = SYMPREC):
        if frame not in ("canonical", "input"):
            raise ValueError(f"frame must be 'canonical' or 'input', got {frame!r}")
        self.pairs = pairs
        self.frame = frame
        key = self._fingerprint(radius, max_neighbors, frame, symprec)
        stored = _load_cache(cache)
        if stored.get("key") == key:
            self.items = stored["items"]
            return
        self.items = [self._item(pair, symprec) for pair in pairs]
        self._add_graphs(radius, max_neighbors, graph_backend, chunk)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            # Atomically: the ranks of a torchrun job build the same cache at once, and one of them
            # may read it while another writes it.
            save_atomically({"key": key, "items": self.items}, Path(cache))

    def _item(self, pair: Pair, symprec: float) -> dict:
        """The model input and target of one pair, in the dataset's frame (float64 tensors)."""
        for role, positions, cell in (("unrelaxed", pair.pos_unrelaxed, pair.cell_unrelaxed),
                                      ("relaxed", pair.pos_relaxed, pair.cell_relaxed)):
            try:
                validate(pair.atomic_numbers, positions, cell)
            except InvalidStructureError as err:
                raise ValueError(f"pair {pair.id}: {role} structure: {err.reason}") from err
        ptr = torch.tensor([0, len(pair.atomic_numbers)])
        target, _ = unwrap_targets(torch.from_numpy(pair.pos_unrelaxed), torch.from_numpy(pair.pos_relaxed),
                                   torch.from_numpy(pair.cell_relaxed)[None], ptr)
        z, positions, cell = pair.atomic_numbers, pair.pos_unrelaxed, pair.cell_unrelaxed
        target_pos, target_cell = target.numpy(), pair.cell_relaxed
        if self.frame == "canonical":
            try:
                canon = canonical_frame(z, positions, cell, symprec)
            except FrameError as err:
                raise ValueError(f"pair {pair.id}: {err}") from err
            z, positions, cell = canon.numbers, canon.positions, canon.cell
            target_pos, target_cell = canon.from_user(target_pos, target_cell)
        return {"atomic_numbers": torch.as_tensor(z), "positions": torch.as_tensor(positions),
                "cell": torch.as_tensor(cell), "pos_target": torch.as_tensor(target_pos),
                "cell_target": torch.as_tensor(target_cell)}

    def _fingerprint(self, radius: float, max_neighbors: int, frame: str, symprec: float) -> str:
        h = hashlib.sha256(f"{radius}:{max_neighbors}:{frame}:{symprec}".encode())
        for p in self.pairs:
            for arr in (p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed, p.pos_relaxed, p.cell_relaxed):
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def _add_graphs(self, radius: float, max_neighbors: int, backend: str, chunk: int) -> None:
        """Each item's graph (receiver-sorted edges, with their CSR so the model skips sorting)."""
        for start in range(0, len(self.items), chunk):
            part = self.items[start:start + chunk]
            batch = Batch.from_arrays([(it["atomic_numbers"], it["positions"], it["cell"]) for it in part])
            g = build_graph(batch.positions, batch.cells, batch.ptr, radius, max_neighbors, backend=backend)
            edge_ptr = g.rowptr[batch.ptr]  # edges are receiver-sorted, hence contiguous per crystal
            for k, item in enumerate(part):
                lo, hi = int(edge_ptr[k]), int(edge_ptr[k + 1])
                item["edge_index"] = g.edge_index[:, lo:hi] - batch.ptr[k]
                item["cell_offsets"] = g.cell_offsets[lo:hi]
                item["rowptr"] = g.rowptr[batch.ptr[k]:batch.ptr[k + 1] + 1] - lo

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


#: The most already-relaxed twins per pair ``with_minima`` makes (``fraction`` up to this).
MAX_MINIMA = 4


def with_minima(pairs: list[Pair], fraction: float, seed: int = 0) -> list[Pair]:
    """``pairs`` followed by already-relaxed pairs: for a ``fraction`` of them (chosen with ``seed``),
    the relaxed structure as both input and target (id ``<id>:min``, protocol ``"minimum"``).

    Every target is a minimum of the potential, so these pairs cost no calculation; they teach the
    model that a relaxed crystal stays where it is (a model trained on unrelaxed inputs alone learns
    to expand whatever it is given, as most of them expand). A ``fraction`` above 1 (at most
    :data:`MAX_MINIMA`) repeats them, so that they weigh more in the sampling: 2 gives every pair two
    (``<id>:min``, ``<id>:min2``), 1.5 every pair one and half of them (chosen with ``seed``) a second.
    Use it on a training split only: the pairs share their seeds with the originals.
    """
    if not 0 <= fraction <= MAX_MINIMA:
        raise ValueError(f"the fraction of already-relaxed pairs must be in [0, {MAX_MINIMA}], got {fraction}")
    whole = int(fraction)
    chosen, _ = _choose(len(pairs), fraction - whole, seed, "already-relaxed")
    repeats = [minimum_pair(pair, copy) for copy in range(whole) for pair in pairs]
    return pairs + repeats + [minimum_pair(pairs[k], whole) for k in chosen]


def _choose(n: int, fraction: float, seed: int, kind: str) -> tuple[np.ndarray, np.random.Generator]:
    """The sorted indices of ``round(fraction * n)`` of ``n`` pairs drawn with ``seed``, and the
    generator after the draw (for a caller's further draws); ``kind`` names the pairs in the error."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the fraction of {kind} pairs must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: round(fraction * n)]), rng


def minimum_pair(pair: Pair, copy: int = 0) -> Pair:
    """The already-relaxed pair of ``pair``: its relaxed structure as input and target (id
    ``<id>:min``, or ``<id>:min<copy + 1>`` for a further copy; protocol ``"minimum"``, same family)."""
    suffix = f":min{copy + 1}" if copy else ":min"
    return Pair(f"{pair.id}{suffix}", pair.atomic_numbers, pair.pos_relaxed, pair.cell_relaxed, pair.pos_relaxed,
                pair.cell_relaxed, family=pair.family, protocol="minimum")


def perturbed_twins(pairs: list[Pair], fraction: float, seed: int = 0, strain: float | None = None,
                    sigma: float | None = None) -> list[Pair]:
    """Perturbed twins of ``pairs``: for a ``fraction`` of them (chosen with ``seed``), the
    relaxed structure strained and rattled as the ``rattle`` protocol makes its inputs (a symmetric
    stretch with entries uniform in [−STRAIN, STRAIN], Gaussian displacements of σ = RATTLE_SIGMA Å,
    :mod:`e3relax_fast.datagen.protocols`) as the input, the relaxed structure as the target (id
    ``<id>:perturbed``, protocol ``"perturbed"``). ``strain`` and ``sigma`` (Å) replace those two
    amplitudes (0: no stretch, no displacement; the draws are made all the same).

    Free pairs that ask the model to undo a strain and a rattle on every training crystal instead of
    on the rattled pairs' seeds alone. The target is the minimum the perturbation started from: a
    relaxation from the perturbed input may fall into another one nearby (a rattle breaks symmetry),
    so these labels are an approximation the relaxed ``rattle`` pairs are not. Training split only.
    """
    from ..datagen.protocols import RATTLE_SIGMA, STRAIN, random_stretch  # here: datagen loads its calculators

    chosen, rng = _choose(len(pairs), fraction, seed, "perturbed")
    strain = STRAIN if strain is None else strain
    sigma = RATTLE_SIGMA if sigma is None else sigma
    twins = []
    for k in chosen:
        pair = pairs[k]
        stretch = random_stretch(rng, strain)
        positions = pair.pos_relaxed @ stretch + rng.normal(0.0, sigma, size=pair.pos_relaxed.shape)
        twins.append(Pair(f"{pair.id}:perturbed", pair.atomic_numbers, positions, pair.cell_relaxed @ stretch,
                          pair.pos_relaxed, pair.cell_relaxed, family=pair.family, protocol="perturbed"))
    return twins


def save_atomically(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file of this process, then renamed over ``path``: a reader
    (another rank) or a run killed while saving never sees a truncated file, and processes saving
    the same path at once each rename a whole file of their own."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _load_cache(cache: str | Path | None) -> dict:
    """The cache's contents, or ``{}`` when there is none or it cannot be read (written by an older
    version, or truncated by a crash before saves were atomic): then it is rebuilt."""
    if cache is None or not Path(cache).exists():
        return {}
    try:
        stored = torch.load(cache, weights_only=True)
    # How a truncated file fails depends on where it ends (in the zip directory, in a pickle, ...).
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return {}
    return stored if isinstance(stored, dict) else {}
