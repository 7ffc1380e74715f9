"""Seed crystals: files and folders of DFT-relaxed structures that pairs are made from."""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def _read_cif_text(text: str):
    from ase.io import read

    return read(io.StringIO(text), format="cif")


def load_seed_source(path: str | Path) -> SeedSource:
    """Seeds from a CSV with a ``cif`` column (ids ``<prefix>-<material_id>``, prefix: the letters
    of the file name, e.g. ``perovval``), an extxyz/xyz file (ids from ``info`` ``atoms_id``,
    ``material_id`` or another ``*_id`` key, else the frame index) or a folder of ``*.cif`` files
    (ids ``<folder prefix>-<file stem>``)."""
    from ase.io import read

    path = Path(path)
    prefix = _prefix(path)
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        if not files:
            raise ValueError(f"no .cif files in {path}")
        return SeedSource(prefix, [f"{prefix}-{f.stem}" for f in files], lambda i: read(files[i], format="cif"))
    if path.suffix == ".csv":
        csv.field_size_limit(sys.maxsize)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "cif" not in rows[0]:
            raise ValueError(f"{path}: no 'cif' column")
        key = next((k for k in ("material_id", "atoms_id", "id") if k in rows[0]), None)
        ids = [f"{prefix}-{row[key] if key else k}" for k, row in enumerate(rows)]
        texts = [row["cif"] for row in rows]
        return SeedSource(prefix, ids, lambda i: _read_cif_text(texts[i]))
    frames = read(path, index=":")
    ids = []
    for k, atoms in enumerate(frames):
        info = atoms.info
        key = next((x for x in ("atoms_id", "material_id", "seed_id") if x in info), None)
        key = key or next((x for x in sorted(info) if x.endswith("_id")), None)
        ids.append(f"{prefix}-{info[key] if key else k}")
    return SeedSource(prefix, ids, lambda i: frames[i].copy())


