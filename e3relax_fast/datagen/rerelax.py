"""Re-relax committed pairs with the input's symmetry kept (``e3relax-fast datagen --rerelax``).

The pairs of ``data/chgnet_v1``–``v3`` were relaxed freely. For a substituted crystal with a
symmetric input, CHGNet's free relaxation often breaks the symmetry once float32 noise tilts an
octahedron: a target that no one-shot model can predict from the symmetric input (and that the
canonical frame's symmetry projection cannot reach). Each such pair — its relaxed structure does not
keep every symmetry operation of its unrelaxed one (within ``tolerance`` Å) — is relaxed again from
its unrelaxed structure with ASE's ``FixSymmetry`` (found at ``symprec`` Å); one whose re-relaxation
fails or does not converge is left out. Every other pair is copied unchanged: P1 inputs, strained +
rattled pairs (relaxed freely on purpose), and pairs whose free relaxation kept the symmetry anyway.

The output is an extxyz pair folder (:func:`~e3relax_fast.io.write_extxyz_pairs`) with the input's
ids and splits, and an ``index.csv`` whose ``rerelaxed`` column says which targets changed.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from ..io import SPLITS, Pair, read_pairs, write_extxyz_pairs
from ..io.structures import to_atoms
from .calculators import make_calculator
from .fire import BatchedFIRE


def keeps_symmetry(pair: Pair, symprec: float = 1e-3, tolerance: float = 1e-2) -> bool:
    """Every symmetry operation of the unrelaxed structure (spglib at ``symprec`` Å, fractional, same
    basis and atom order) maps the relaxed structure onto itself within ``tolerance`` Å."""
    import spglib

    inverse = np.linalg.inv(pair.cell_unrelaxed)
    ops = spglib.get_symmetry((pair.cell_unrelaxed, pair.pos_unrelaxed @ inverse, pair.atomic_numbers),
                              symprec=symprec)
    frac = pair.pos_relaxed @ np.linalg.inv(pair.cell_relaxed)
    same = pair.atomic_numbers[:, None] == pair.atomic_numbers[None, :]
    for rotation, translation in zip(ops["rotations"], ops["translations"], strict=True):
        diff = (frac @ rotation.T + translation)[:, None, :] - frac[None, :, :]
        diff -= np.round(diff)
        dist = np.where(same, np.linalg.norm(diff @ pair.cell_relaxed, axis=-1), np.inf)
        if dist.min(axis=1).max() > tolerance:
            return False
    return True


def _split_or_nothing(source, split: str) -> list[Pair]:
    try:
        return read_pairs(source, split)
    except FileNotFoundError:  # a folder without this split
        return []


def _relax_in_chunks(broken: list[Pair], journal: Path, calculator: str, symprec: float, fmax: float,
                     max_steps: int, batch_size: int, device: str) -> dict[str, dict]:
    """Relax each pair's unrelaxed structure with ``FixSymmetry``, ``batch_size`` pairs at a time; each
    finished chunk is appended to ``journal`` (JSON lines: id, converged, positions, cell), so a killed
    run resumes where it stopped. Returns the outcomes by pair id."""
    from ase.constraints import FixSymmetry

    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            if line.strip():  # a line cut by a kill is incomplete JSON: drop it, its chunk runs again
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[record["id"]] = record
    todo = [pair for pair in broken if pair.id not in done]
    fire = BatchedFIRE(make_calculator(calculator, batched=True, batch_size=batch_size, device=device),
                       fmax=fmax, max_steps=max_steps, max_batch=batch_size) if todo else None
    for first in range(0, len(todo), batch_size):
        chunk = todo[first:first + batch_size]
        starts = []
        for pair in chunk:
            atoms = to_atoms(pair.atomic_numbers, pair.pos_unrelaxed, pair.cell_unrelaxed)
            atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))
            starts.append(atoms)
        lines = []
        for pair, outcome in zip(chunk, fire.relax(starts), strict=True):
            ok = outcome.error is None and outcome.converged
            record = {"id": pair.id, "converged": ok,
                      "positions": outcome.atoms.positions.tolist() if ok else None,
                      "cell": outcome.atoms.cell.array.tolist() if ok else None}
            done[pair.id] = record
            lines.append(json.dumps(record) + "\n")
        with journal.open("a") as fh:
            fh.write("".join(lines))
        print(f"rerelax: {len(done)}/{len(broken)} symmetry-broken pairs relaxed again", flush=True)
    return done


def rerelax(sources: list[str | Path], out: str | Path, calculator: str = "chgnet", symprec: float = 1e-3,
            tolerance: float = 1e-2, fmax: float = 0.05, max_steps: int = 300, batch_size: int = 64,
            device: str = "cpu") -> dict:
    """Copy the pairs of ``sources`` to ``out``, re-relaxing the symmetry-broken ones (see the module
    docstring). A re-relaxation that fails or does not converge keeps the pair's old target and is
    counted as failed, and the pair is left out (its old target broke the symmetry). A killed run
    resumes from ``out/rerelaxed.jsonl``. Returns the counts and the time taken (of this call)."""
    out = Path(out)
    start = time.perf_counter()
    pairs = {split: [pair for source in sources for pair in _split_or_nothing(source, split)] for split in SPLITS}
    broken = [p for split in SPLITS for p in pairs[split]
              if p.protocol.startswith("subst") and not keeps_symmetry(p, symprec, tolerance)]
    out.mkdir(parents=True, exist_ok=True)
    done = _relax_in_chunks(broken, out / "rerelaxed.jsonl", calculator, symprec, fmax, max_steps,
                            batch_size, device)
    changed, failed = set(), set()
    for pair in broken:
        outcome = done[pair.id]
        if outcome["converged"]:
            pair.pos_relaxed = np.asarray(outcome["positions"], dtype=np.float64)
            pair.cell_relaxed = np.asarray(outcome["cell"], dtype=np.float64)
            changed.add(pair.id)
        else:
            failed.add(pair.id)
    read = sum(len(v) for v in pairs.values())
    # A failed re-relaxation leaves a symmetry-broken target: dropped, listed in provenance.json.
    pairs = {split: [p for p in pairs[split] if p.id not in failed] for split in SPLITS}
    for split in SPLITS:
        if pairs[split]:  # an empty extxyz file is unreadable
            write_extxyz_pairs(pairs[split], out, split)
    with (out / "index.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["atoms_id", "split", "family", "protocol", "rerelaxed"])
        for split in SPLITS:
            for p in pairs[split]:
                writer.writerow([p.id, split, p.family, p.protocol, int(p.id in changed)])
    summary = {"sources": [str(s) for s in sources], "pairs": read,
               "symmetry_broken": len(broken), "rerelaxed": len(changed), "failed": len(failed),
               "dropped": sorted(failed), "written": sum(len(v) for v in pairs.values()),
               "symprec": symprec, "tolerance": tolerance, "calculator": calculator, "fmax": fmax,
               "max_steps": max_steps, "seconds": round(time.perf_counter() - start, 1)}
    (out / "provenance.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m e3relax_fast.datagen.rerelax --source DIR [--source DIR ...] --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e3relax_fast.datagen.rerelax", description=__doc__)
    parser.add_argument("--source", action="append", required=True, help="pair folder (repeatable)")
    parser.add_argument("--out", required=True, help="extxyz pair folder to write")
    parser.add_argument("--calculator", default="chgnet")
    parser.add_argument("--symprec", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    summary = rerelax(args.source, args.out, args.calculator, args.symprec, batch_size=args.batch_size)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
