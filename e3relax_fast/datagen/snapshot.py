"""Snapshot of a ``datagen`` run folder for the repository: compressed extxyz per split.

``write_snapshot(run, dest)`` writes ``<split>_unrelaxed.extxyz.gz`` and ``<split>_relaxed.extxyz.gz``
(frames in the same order, sorted by id; ``info``: ``atoms_id``, ``family``, ``protocol``,
``seed_id``, ``note``; non-empty splits only), ``index.csv`` (the run's rows of those pairs) and
``provenance.json`` (the run's ``datagen.json`` — settings and the command line of every start —
plus the time of the snapshot and counts per split, family and protocol) and ``dropped.csv`` (the
jobs the run dropped, so a restore does not try them again). The pair readers of
:mod:`e3relax_fast.data` read it (``read_pairs(dest, split)``; extra ``info`` keys are ignored).

``restore_run(dest, run)`` is the way back: it rebuilds a run folder from a committed snapshot (CIF
pairs, ``index.csv``, split files, ``dropped.csv``, ``datagen.json``), so a fresh checkout resumes a
generator where the snapshot left it — new jobs only, same ids, same settings. Snapshots taken before
``dropped.csv`` existed restore the jobs up to the last kept id that are not in the snapshot as
dropped (they were dropped, or unfinished when the snapshot was taken).

Command line: ``python -m e3relax_fast.datagen.snapshot RUN DEST`` (or ``e3relax-fast datagen
--out RUN --snapshot DEST``; ``--restore DEST`` the other way).
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
from .generate import (
    DROPPED_COLUMNS,
    INDEX_COLUMNS,
    _read_rows,
    _rewrite_rows,
    _write_cif,
    assign_splits,
    inherit_splits,
)
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
    config = json.loads((run / "datagen.json").read_text()) if (run / "datagen.json").exists() else {}
    members = _split_members(run, rows, config)
    for split in SPLITS:
        ids = sorted(members.get(split, ()))
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
    _rewrite_rows(dest / "dropped.csv", DROPPED_COLUMNS, _read_rows(run / "dropped.csv", DROPPED_COLUMNS))
    counts = {
        "pairs": len(kept),
        "splits": {s: sum(v for k, v in family_split.items() if k.endswith(f"/{s}")) for s in SPLITS},
        "families": dict(sorted(Counter(rows[i]["family"] for i in kept).items())),
        "protocols": dict(sorted(Counter(rows[i]["protocol"] for i in kept).items())),
        "family_split": dict(sorted(family_split.items())),
    }
    provenance = {"snapshot_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "run": str(run.resolve()),
                  **counts, "datagen": config}
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return counts


def _split_members(run: Path, rows: dict[str, dict], config: dict) -> dict[str, list[str]]:
    """``{split: [atoms_id, ...]}`` of the pairs in ``rows``: from each row's seed, as the generator
    assigns them (its ``datagen.json`` settings ``config``), so pairs whose split rows a killed run had not
    written yet are kept; from the run's split files when the settings or the inherited dataset are missing."""
    inherit = config.get("inherit")
    if "split_fractions" in config and (not inherit or Path(inherit).exists()):
        return assign_splits(rows.values(), config["split_fractions"], inherit_splits(inherit) if inherit else None)
    members = {}
    for split in SPLITS:
        path = run / f"{split}.csv"
        if path.exists():
            with path.open(newline="") as fh:
                members[split] = [r["atoms_id"] for r in csv.DictReader(fh) if r.get("atoms_id") in rows]
    return members


def restore_run(snapshot: str | Path, run: str | Path) -> dict:
    """Rebuild run folder ``run`` from ``snapshot`` (see the module docstring); returns ``pairs`` (restored)
    and ``dropped`` (rows of the restored ``dropped.csv``). Refuses a ``run`` that holds pairs already."""
    from ase.io import read

    snapshot, run = Path(snapshot), Path(run)
    provenance = json.loads((snapshot / "provenance.json").read_text())
    config = provenance.get("datagen") or {}
    if not config.get("id_prefix"):
        raise ValueError(f"{snapshot} has no generator settings in provenance.json; it cannot be resumed")
    if _read_rows(run / "index.csv", INDEX_COLUMNS):
        raise ValueError(f"{run} holds pairs already; restore into a new folder")
    rows = _read_rows(snapshot / "index.csv", INDEX_COLUMNS)
    (run / "CIF").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        ids = []
        if (snapshot / f"{split}_unrelaxed.extxyz.gz").exists():
            for role in ("unrelaxed", "relaxed"):
                frames = read(snapshot / f"{split}_{role}.extxyz.gz", index=":")
                for frame in frames:
                    _write_cif(to_atoms(frame.numbers, frame.positions, frame.cell.array),
                               run / "CIF" / f"{frame.info['atoms_id']}_{role}.cif")
            ids = [f.info["atoms_id"] for f in frames]
        _rewrite_rows(run / f"{split}.csv", ("atoms_id",), [{"atoms_id": i} for i in ids])
    _rewrite_rows(run / "index.csv", INDEX_COLUMNS, rows)
    if (snapshot / "dropped.csv").exists():
        dropped = _read_rows(snapshot / "dropped.csv", DROPPED_COLUMNS)
    else:
        prefix = config["id_prefix"]
        kept = {r["atoms_id"] for r in rows}
        last = max(int(i[len(prefix):]) for i in kept)
        reason = f"not in snapshot {snapshot.name} (dropped, or unfinished when it was taken)"
        dropped = [{"atoms_id": f"{prefix}{k:06d}", "protocol": "unknown", "seed_id": "unknown", "note": "",
                    "natoms": 0, "steps": 0, "reason": reason, "family": ""}
                   for k in range(last) if f"{prefix}{k:06d}" not in kept]
    _rewrite_rows(run / "dropped.csv", DROPPED_COLUMNS, dropped)
    config = dict(config)
    config["restored_from"] = {"snapshot": str(snapshot.resolve()), "snapshot_utc": provenance.get("snapshot_utc"),
                               "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "pairs": len(rows)}
    (run / "datagen.json").write_text(json.dumps(config, indent=1) + "\n")
    return {"pairs": len(rows), "dropped": len(dropped)}


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
