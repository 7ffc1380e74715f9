"""Seed crystals: files and folders of DFT-relaxed structures that pairs are made from."""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# A seed's family (the data format's knowledge, so readers of pair files share it): re-exported here.
from ..io.pairs import FAMILIES, family_of  # noqa: F401
from ..io.read import read_cif_text, read_structure, read_structures

# --- seeds --------------------------------------------------------------------------------------


@dataclass
class SeedSource:
    """Seed crystals of one file or folder: ids and a loader ``load(i) -> ase.Atoms``."""

    name: str
    ids: list[str]
    load: Callable = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)


def _prefix(path: Path) -> str:
    stem = path.name
    for suffix in (".gz", ".extxyz", ".xyz", ".csv"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^a-z]", "", stem.lower()) or "seed"


def load_seed_source(path: str | Path) -> SeedSource:
    """Seeds from a CSV with a ``cif`` column (ids ``<prefix>-<material_id>``, prefix: the letters
    of the file name, e.g. ``perovval``), an extxyz/xyz file (ids from ``info`` ``atoms_id``,
    ``material_id`` or another ``*_id`` key, else the frame index) or a folder of ``*.cif`` files
    (ids ``<folder prefix>-<file stem>``).

    An extxyz file may hold several frames of one material (NOMAD: one per calculation of an
    entry): exact repeats are dropped, the other frames become seeds ``<id>#2``, ``<id>#3``, … in
    file order, which share the material's split (:func:`~e3relax_fast.datagen.generate.split_of`)."""
    path = Path(path)
    prefix = _prefix(path)
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        if not files:
            raise ValueError(f"no .cif files in {path}")
        return SeedSource(prefix, [f"{prefix}-{f.stem}" for f in files], lambda i: read_structure(files[i]))
    if path.suffix == ".csv":
        csv.field_size_limit(sys.maxsize)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "cif" not in rows[0]:
            raise ValueError(f"{path}: no 'cif' column")
        key = next((k for k in ("material_id", "atoms_id", "id") if k in rows[0]), None)
        ids = [f"{prefix}-{row[key] if key else k}" for k, row in enumerate(rows)]
        texts = [row["cif"] for row in rows]
        return SeedSource(prefix, ids, lambda i: read_cif_text(texts[i]))
    ids, frames, by_id = [], [], {}
    for k, atoms in enumerate(read_structures(path)):
        info = atoms.info
        key = next((x for x in ("atoms_id", "material_id", "seed_id") if x in info), None)
        key = key or next((x for x in sorted(info) if x.endswith("_id")), None)
        material = f"{prefix}-{info[key] if key else k}"
        same = by_id.setdefault(material, [])
        if any(_identical(atoms, other) for other in same):
            continue
        ids.append(material if not same else f"{material}#{len(same) + 1}")
        same.append(atoms)
        frames.append(atoms)
    return SeedSource(prefix, ids, lambda i: frames[i].copy())


def _identical(a, b) -> bool:
    return (list(a.numbers) == list(b.numbers) and np.allclose(a.cell.array, b.cell.array, atol=1e-8)
            and np.allclose(a.positions, b.positions, atol=1e-8))


