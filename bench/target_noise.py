"""How reproducible are the targets themselves? A floor below which no one-shot model can go.

Each pair's unrelaxed structure is relaxed again with the recipe that made its target (CHGNet,
batched FIRE + unit-cell filter, fmax 0.05 eV/Å, 300 steps), from a start that no model could tell
apart from the input: its positions moved by ``--sigma`` Å (Gaussian per coordinate, seeded). A pair
whose input has symmetry (spglib, 1e-3 Å) that its target keeps is relaxed again the way such targets
were made, under ``FixSymmetry`` from the input itself (a perturbation below the tolerance is refined
away, so these measure the pipeline's own repeatability). The coordinate MAE between that second
relaxation and the target (both unwrapped to the images nearest the input's atoms, as in ``eval``),
over Dummy's, is the spread the input does not determine: where a relaxation runs down one of
several nearby minima (a rattled perovskite tilting its octahedra one way or another), the target
is one draw of it. Two draws are no closer to a prediction that cannot tell their starts apart than
half their distance on average (triangle inequality), so half the ratio is a floor for any model.
Reported per protocol and family beside the model's ratio. Every relaxed structure, stored or made
here, is first turned rigidly into its input's orientation (``read_pairs``' default,
:func:`~e3relax_fast.io.pairs.without_relaxed_rotation`): an orientation is no part of a minimum.

    python -m bench.target_noise --data data/chgnet_v13sym --data data/chgnet_v4 --split test
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def symmetric_start(pair):
    """The input under ``FixSymmetry`` when it has symmetry beyond the identity (1e-3 Å) that its
    target keeps (how such targets were made); ``None`` for a pair relaxed freely."""
    import spglib
    from ase.constraints import FixSymmetry

    from e3relax_fast.datagen.rerelax import keeps_symmetry
    from e3relax_fast.io.structures import to_atoms

    cell = (pair.cell_unrelaxed, pair.pos_unrelaxed @ np.linalg.inv(pair.cell_unrelaxed), pair.atomic_numbers)
    ops = spglib.get_symmetry(cell, symprec=1e-3)
    if ops is None or len(ops["rotations"]) < 2 or not keeps_symmetry(pair):
        return None
    atoms = to_atoms(pair.atomic_numbers, pair.pos_unrelaxed, pair.cell_unrelaxed)
    atoms.set_constraint(FixSymmetry(atoms, symprec=1e-3))
    return atoms


def starts(pairs, sigma: float, seed: int) -> tuple[list, list[bool]]:
    """The second relaxation's start of every pair (ASE ``Atoms``) and whether it keeps symmetry."""
    from e3relax_fast.io.structures import to_atoms

    rng = np.random.default_rng(seed)
    out, kept = [], []
    for pair in pairs:
        atoms = symmetric_start(pair)
        kept.append(atoms is not None)
        if atoms is None:
            moved = pair.pos_unrelaxed + rng.normal(0.0, sigma, pair.pos_unrelaxed.shape)
            atoms = to_atoms(pair.atomic_numbers, moved, pair.cell_unrelaxed)
        out.append(atoms)
    return out, kept


def relax_again(pairs, sigma: float, seed: int, fmax: float) -> tuple[list[bool], list, list]:
    """Relax every pair again from :func:`starts` (CHGNet, batched FIRE, 300 steps); returns the
    converged ones' ``(symmetry kept?, outcomes, pairs)`` and names each one left out on stderr."""
    from e3relax_fast.datagen.calculators import make_calculator
    from e3relax_fast.datagen.fire import BatchedFIRE

    atoms, kept = starts(pairs, sigma, seed)
    fire = BatchedFIRE(make_calculator("chgnet", batched=True, batch_size=32), fmax=fmax, max_steps=300, max_batch=32)
    done = []
    for k, o, p in zip(kept, fire.relax(atoms), pairs, strict=True):
        if o.error is None and o.converged:
            done.append((k, o, p))
        else:
            print(f"left out {p.id}: {o.error or f'not converged in {o.steps} steps (fmax {o.fmax:.3f} eV/A)'}",
                  file=sys.stderr)
    return [k for k, _, _ in done], [o for _, o, _ in done], [p for _, _, p in done]


def unturned(pairs, outcomes) -> list:
    """Each pair with its relaxed structure replaced by the outcome's, turned into the input's
    orientation."""
    from e3relax_fast.io.pairs import without_relaxed_rotation

    return [without_relaxed_rotation(replace(p, pos_relaxed=o.atoms.positions, cell_relaxed=o.atoms.cell.array))
            for p, o in zip(pairs, outcomes, strict=True)]


def coordinate_errors(pairs, positions: list[np.ndarray], cells: list[np.ndarray]) -> np.ndarray:
    """``(G,)`` coordinate MAE (Å) of each structure against its pair's target, both unwrapped to the
    images nearest the input's atoms (the relaxed cell's images, as ``eval`` unwraps its targets)."""
    from e3relax_fast.training.evaluate import inputs_and_targets
    from e3relax_fast.training.loss import unwrap_targets

    batch, target, _ = inputs_and_targets(pairs)
    guess, _ = unwrap_targets(batch.positions, torch.from_numpy(np.concatenate(positions)),
                              torch.from_numpy(np.stack(cells)), batch.ptr)
    per_atom = (guess - target).abs().mean(-1).numpy()
    ptr = batch.ptr.numpy()
    return np.array([per_atom[ptr[i]:ptr[i + 1]].mean() for i in range(len(pairs))])


def table(groups: dict[str, dict[str, list[float]]]) -> list[str]:
    """Markdown rows from ``{group: {"dummy", "again", "model": [per-structure errors]}}``."""
    lines = ["| group | pairs | Dummy (Å) | target relaxed again / Dummy | model / Dummy |", "|---|---|---|---|---|"]
    for name in sorted(groups, key=lambda g: (g != "all", g)):
        g = {k: np.asarray(v) for k, v in groups[name].items()}
        dummy = g["dummy"].mean()
        lines.append(f"| {name} | {len(g['dummy'])} | {dummy:.3f} | {g['again'].mean() / dummy:.3f} | "
                     f"{g['model'].mean() / dummy:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.target_noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint", default="default", help="the model beside the floor")
    ap.add_argument("--sigma", type=float, default=1e-3, help="Å, the free starts' perturbation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fmax", type=float, help="eV/Å: make the targets again at this threshold (from the inputs "
                    "as given) and compare the perturbed relaxation with those instead of the stored targets "
                    "(made at 0.05): is the spread the landscape's or the stopping criterion's?")
    ap.add_argument("--protocol", action="append", help="only pairs of this protocol (repeatable)")
    ap.add_argument("--json", help="also write every pair's errors (Å) to this JSON file")
    args = ap.parse_args(argv)

    from e3relax_fast.io import read_pairs
    from e3relax_fast.model import load_pretrained
    from e3relax_fast.training.evaluate import predict

    pairs = [p for p in read_pairs(args.data, args.split) if not args.protocol or p.protocol in args.protocol]
    if args.fmax is not None:  # the targets themselves made again at this fmax, from the inputs as given
        _, reference, pairs = relax_again(pairs, 0.0, args.seed, args.fmax)
        pairs = unturned(pairs, reference)
    kept, outcomes, pairs = relax_again(pairs, args.sigma, args.seed, args.fmax or 0.05)
    second = unturned(pairs, outcomes)
    again = coordinate_errors(pairs, [p.pos_relaxed for p in second], [p.cell_relaxed for p in second])
    dummy = coordinate_errors(pairs, [p.pos_unrelaxed for p in pairs], [p.cell_unrelaxed for p in pairs])
    predictions = predict(load_pretrained(args.checkpoint), pairs)
    model = coordinate_errors(pairs, [pos for pos, _ in predictions], [cell for _, cell in predictions])
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, pair in enumerate(pairs):
        policy = "symmetry kept" if kept[i] else "free"
        for name in ("all", f"protocol {pair.protocol}", f"family {pair.family}", policy):
            for who, err in (("dummy", dummy), ("again", again), ("model", model)):
                groups[name][who].append(float(err[i]))
    if args.json:
        rows = [{"id": p.id, "family": p.family, "protocol": p.protocol, "symmetry_kept": kept[i],
                 "dummy": float(dummy[i]), "again": float(again[i]), "model": float(model[i])}
                for i, p in enumerate(pairs)]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    targets = "stored targets" if args.fmax is None else f"targets made again at fmax {args.fmax} eV/A"
    print(f"# {len(pairs)} pairs relaxed again (those that did not converge left out, named on stderr); {targets}; "
          f"sigma {args.sigma} A, seed {args.seed}; model {args.checkpoint}\n")
    print("\n".join(table(groups)))


if __name__ == "__main__":
    main()
