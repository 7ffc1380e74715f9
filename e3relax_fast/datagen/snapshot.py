"""Snapshot of a ``datagen`` run folder for the repository: compressed extxyz per split.

``write_snapshot(run, dest)`` writes ``<split>_unrelaxed.extxyz.gz`` and ``<split>_relaxed.extxyz.gz``
(frames in the same order, sorted by id; ``info``: ``atoms_id``, ``family``, ``protocol``,
``seed_id``, ``note``; non-empty splits only), ``index.csv`` (the run's rows of those pairs) and
``provenance.json`` (the run's ``datagen.json`` — settings and the command line of every start —
plus the time of the snapshot and counts per split, family and protocol). The pair readers of
:mod:`e3relax_fast.data` read it (``read_pairs(dest, split)``; extra ``info`` keys are ignored).

Command line: ``python -m e3relax_fast.datagen.snapshot RUN DEST`` (or ``e3relax-fast datagen
--out RUN --snapshot DEST``).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

from ..io import SPLITS
from ..io.read import read_structure
from ..io.structures import to_atoms
from .generate import INDEX_COLUMNS, _read_rows, _rewrite_rows
from .seeds import family_of


def _frame(path: Path, info: dict):
    atoms = read_structure(path)
    # Only species, positions and cell: CIF-reader arrays (occupancies, spacegroup kinds) are noise.
    return to_atoms(atoms.numbers, atoms.positions, atoms.cell.array, **info)


def write_snapshot(run: str | Path, dest: str | Path) -> dict:
    """Write the snapshot of run folder ``run`` into ``dest`` (see the module docstring); returns the
    counts written to ``provenance.json`` (``pairs``, ``splits``, ``families``, ``protocols``,
    ``family_split``)."""
    from ase.io import write

    run, dest = Path(run), Path(dest)
    rows = {r["atoms_id"]: r for r in _read_rows(run / "index.csv", INDEX_COLUMNS)}
    for row in rows.values():
        row["family"] = row.get("family") or family_of(row["seed_id"])
    dest.mkdir(parents=True, exist_ok=True)
    kept, family_split = [], Counter()
    for split in SPLITS:
        path = run / f"{split}.csv"
        if not path.exists():
            continue
        with path.open(newline="") as fh:
            ids = sorted(r["atoms_id"] for r in csv.DictReader(fh) if r.get("atoms_id") in rows)
        # Files of a split no longer present are removed, so a snapshot never mixes two states.
        for role in ("unrelaxed", "relaxed"):
            (dest / f"{split}_{role}.extxyz.gz").unlink(missing_ok=True)
        if not ids:  # an empty extxyz file is unreadable; an empty split gets none
            continue
        for role in ("unrelaxed", "relaxed"):
            frames = []
            for pair_id in ids:
                row = rows[pair_id]
                info = {"atoms_id": pair_id, "family": row["family"], "protocol": row["protocol"],
                        "seed_id": row["seed_id"], "note": row["note"]}
                frames.append(_frame(run / "CIF" / f"{pair_id}_{role}.cif", info))
            tmp = dest / f"{split}_{role}.tmp.extxyz.gz"
            write(tmp, frames, format="extxyz")
            tmp.replace(dest / f"{split}_{role}.extxyz.gz")
        kept += ids
        family_split.update(f"{rows[i]['family']}/{split}" for i in ids)
    _rewrite_rows(dest / "index.csv", INDEX_COLUMNS, [rows[i] for i in sorted(kept)])
    counts = {
        "pairs": len(kept),
        "splits": {s: sum(v for k, v in family_split.items() if k.endswith(f"/{s}")) for s in SPLITS},
        "families": dict(sorted(Counter(rows[i]["family"] for i in kept).items())),
        "protocols": dict(sorted(Counter(rows[i]["protocol"] for i in kept).items())),
        "family_split": dict(sorted(family_split.items())),
    }
    config = json.loads((run / "datagen.json").read_text()) if (run / "datagen.json").exists() else {}
    provenance = {"snapshot_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "run": str(run.resolve()),
                  **counts, "datagen": config}
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m e3relax_fast.datagen.snapshot RUN_FOLDER DEST_FOLDER", file=sys.stderr)
        return 2
    counts = write_snapshot(*argv)
    print(f"snapshot: {counts['pairs']} pairs {counts['splits']} -> {argv[1]}; families {counts['families']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
