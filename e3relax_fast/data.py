"""Unrelaxed → relaxed pair datasets in the formats the original work released (spec §11).

Readers return :class:`Pair` records; :class:`PairDataset` unwraps targets and builds every graph
once (batched, optionally cached on disk), never per epoch.

Supported sources:

- a CIF folder: ``CIF/<id>_unrelaxed.cif`` + ``CIF/<id>_relaxed.cif`` (or ``<id>_U.cif`` /
  ``<id>_R.cif``; the ``CIF/`` level is optional) with split files ``train.csv`` / ``val.csv`` /
  ``test.csv`` (id column ``atoms_id`` or ``mp_id``) or ``id_prop_{split}_all.csv`` (ids in
  column 0);
- extxyz pairs: ``<split>_unrelaxed.extxyz[.gz]`` and ``<split>_relaxed.extxyz[.gz]``, frames in
  the same order, ids in ``info["atoms_id"]``;
- an ASE database whose rows are unrelaxed structures with ``data["pos_relaxed"]`` (n, 3) and
  ``data["cell_relaxed"]`` (3, 3) and key-value pairs ``atoms_id`` and ``split``.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batch import Batch
from .graph import build_graph
from .loss import unwrap_targets

SPLITS = ("train", "val", "test")


@dataclass
class Pair:
    """One unrelaxed → relaxed pair; atoms correspond by index. Positions (n, 3) Cartesian Å,
    cells (3, 3) Å with lattice vectors as rows, atomic numbers (n,) int64."""

    id: str
    atomic_numbers: np.ndarray
    pos_unrelaxed: np.ndarray
    cell_unrelaxed: np.ndarray
    pos_relaxed: np.ndarray
    cell_relaxed: np.ndarray


def _pair_from_atoms(pair_id: str, unrelaxed, relaxed) -> Pair:
    if list(unrelaxed.numbers) != list(relaxed.numbers):
        raise ValueError(f"pair {pair_id}: unrelaxed and relaxed structures have different species/order")
    return Pair(
        pair_id,
        np.asarray(unrelaxed.numbers, dtype=np.int64),
        np.asarray(unrelaxed.positions, dtype=np.float64),
        np.asarray(unrelaxed.cell.array, dtype=np.float64),
        np.asarray(relaxed.positions, dtype=np.float64),
        np.asarray(relaxed.cell.array, dtype=np.float64),
    )


def _split_ids(root: Path, split: str) -> list[str]:
    for name in (f"{split}.csv", f"id_prop_{split}_all.csv"):
        path = root / name
        if not path.exists():
            continue
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        header = rows[0] if rows else []
        for column in ("atoms_id", "mp_id"):
            if column in header:
                col = header.index(column)
                return [r[col] for r in rows[1:] if r]
        return [r[0] for r in rows if r]  # id_prop files have no header: ids in column 0
    raise FileNotFoundError(f"no {split}.csv or id_prop_{split}_all.csv in {root}")


def read_cif_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pairs of one split of a CIF folder; pairs with a missing file are skipped with a warning."""
    from ase.io import read

    root = Path(root)
    folder = root / "CIF" if (root / "CIF").is_dir() else root
    pairs, missing = [], []
    for pair_id in _split_ids(root, split):
        for u_name, r_name in ((f"{pair_id}_unrelaxed.cif", f"{pair_id}_relaxed.cif"),
                               (f"{pair_id}_U.cif", f"{pair_id}_R.cif")):
            u_path, r_path = folder / u_name, folder / r_name
            if u_path.exists() and r_path.exists():
                pairs.append(_pair_from_atoms(pair_id, read(u_path), read(r_path)))
                break
        else:
            missing.append(pair_id)
    if missing:
        warnings.warn(f"{root} ({split}): {len(missing)} pairs skipped, files missing: {missing[:10]}",
                      stacklevel=2)
    return pairs


def _extxyz_path(root: Path, stem: str) -> Path:
    for suffix in (".extxyz", ".extxyz.gz", ".xyz", ".xyz.gz"):
        if (root / f"{stem}{suffix}").exists():
            return root / f"{stem}{suffix}"
    raise FileNotFoundError(f"no {stem}.extxyz[.gz] in {root}")


def read_extxyz_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pairs from ``<split>_unrelaxed.extxyz[.gz]`` and ``<split>_relaxed.extxyz[.gz]``."""
    from ase.io import read

    root = Path(root)
    unrelaxed = read(_extxyz_path(root, f"{split}_unrelaxed"), index=":")
    relaxed = read(_extxyz_path(root, f"{split}_relaxed"), index=":")
    if len(unrelaxed) != len(relaxed):
        raise ValueError(f"{root} ({split}): {len(unrelaxed)} unrelaxed but {len(relaxed)} relaxed frames")
    pairs = []
    for k, (u, r) in enumerate(zip(unrelaxed, relaxed, strict=True)):
        pair_id = str(u.info.get("atoms_id", k))
        if str(r.info.get("atoms_id", pair_id)) != pair_id:
            raise ValueError(f"{root} ({split}): frame {k} ids differ: {pair_id} vs {r.info['atoms_id']}")
        pairs.append(_pair_from_atoms(pair_id, u, r))
    return pairs


def write_extxyz_pairs(pairs: list[Pair], root: str | Path, split: str, compress: bool = True) -> None:
    """Write pairs in the format :func:`read_extxyz_pairs` reads."""
    from ase import Atoms
    from ase.io import write

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".extxyz.gz" if compress else ".extxyz"
    for role, pos_key, cell_key in (("unrelaxed", "pos_unrelaxed", "cell_unrelaxed"),
                                    ("relaxed", "pos_relaxed", "cell_relaxed")):
        frames = [Atoms(numbers=p.atomic_numbers, positions=getattr(p, pos_key), cell=getattr(p, cell_key),
                        pbc=True, info={"atoms_id": p.id}) for p in pairs]
        write(root / f"{split}_{role}{suffix}", frames, format="extxyz")


def read_ase_db_pairs(path: str | Path, split: str | None = None) -> list[Pair]:
    """Pairs from an ASE database (see the module docstring for the row layout)."""
    from ase.db import connect

    pairs = []
    selection = {"split": split} if split is not None else {}
    for row in connect(str(path)).select(**selection):
        atoms = row.toatoms()
        pairs.append(Pair(
            str(row.get("atoms_id", row.id)),
            np.asarray(atoms.numbers, dtype=np.int64),
            np.asarray(atoms.positions, dtype=np.float64),
            np.asarray(atoms.cell.array, dtype=np.float64),
            np.asarray(row.data["pos_relaxed"], dtype=np.float64).reshape(-1, 3),
            np.asarray(row.data["cell_relaxed"], dtype=np.float64).reshape(3, 3),
        ))
    return pairs


def read_pairs(source: str | Path, split: str) -> list[Pair]:
    """Read one split from a CIF folder, an extxyz folder or an ASE database (``.db``)."""
    source = Path(source)
    if source.is_file():
        return read_ase_db_pairs(source, split)
    if any(source.glob(f"{split}_unrelaxed.*")):
        return read_extxyz_pairs(source, split)
    return read_cif_pairs(source, split)


class PairDataset(torch.utils.data.Dataset):
    """Pairs with unwrapped targets and precomputed graphs.

    Targets are moved to the image nearest each unrelaxed atom (in the relaxed cell) once; graphs
    are built once on the unrelaxed structures, in batches, and cached at ``cache`` when given
    (keyed by a hash of the inputs and the graph rule, so a stale cache is never used).
    Items are single-crystal dicts; :meth:`collate` joins them into ``(Batch, pos_target (N, 3),
    cell_target (G, 3, 3))``.
    """

    def __init__(self, pairs: list[Pair], radius: float = 6.0, max_neighbors: int = 50,
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

    @staticmethod
    def collate(items: list[dict]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        parts = [Batch(it["atomic_numbers"], it["positions"], it["cell"][None],
                       torch.tensor([0, len(it["atomic_numbers"])]), it["edge_index"], it["cell_offsets"])
                 for it in items]
        return (Batch.collate(parts), torch.cat([it["pos_target"] for it in items]),
                torch.stack([it["cell_target"] for it in items]))
