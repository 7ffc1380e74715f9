"""Textbook substitutions: a crystal written in another's cell (KCl in rock-salt NaCl's, Ge in Si's, ...).

The screening workflow in miniature: substitute elements into a known structure and ask for the
relaxed crystal. Each case is built with ASE at the host's experimental lattice constant and relaxed
with CHGNet, its space group kept (:func:`bench.examples_relaxed.chgnet_minima`), as the target; each
model's prediction (``relax_batch``'s defaults) is scored as ``eval`` scores pairs. Most of these
crystals change volume by tens of percent, so a model that leaves them where they are scores 1.0 ×
Dummy; their elements and structure types are common in the training families, but most of these
exact compounds are not.

    python -m bench.textbook_substitutions                      # the shipped model
    python -m bench.textbook_substitutions --checkpoint runs/X/best.pt --checkpoint default
    python -m bench.textbook_substitutions --seen-in data/chgnet_v13sym --seen-in data/chgnet_v6  # no model

``--seen-in FOLDER`` (repeatable) adds how many training pairs of those folders have each case's
compound in its host's space group as their relaxed structure (the same compound met in training
makes the case an in-family one).

Needs the ``datagen`` extra (CHGNet). Prints a Markdown table: one row per case (the target's volume
change, then each model's), and each model's coordinate MAE and volume error against Dummy's.
"""

from __future__ import annotations

import numpy as np

#: name -> (ASE ``bulk`` arguments of the host, {host element: substitute})
CASES = {
    "KCl in NaCl's cell": (("NaCl", "rocksalt", 5.64), {"Na": "K"}),
    "NaCl in KCl's cell": (("KCl", "rocksalt", 6.29), {"K": "Na"}),
    "NaBr in NaCl's cell": (("NaCl", "rocksalt", 5.64), {"Cl": "Br"}),
    "KF in LiF's cell": (("LiF", "rocksalt", 4.03), {"Li": "K"}),
    "CaO in MgO's cell": (("MgO", "rocksalt", 4.21), {"Mg": "Ca"}),
    "MgO in CaO's cell": (("CaO", "rocksalt", 4.81), {"Ca": "Mg"}),
    "Ge in Si's cell": (("Si", "diamond", 5.43), {"Si": "Ge"}),
    "Si in Ge's cell": (("Ge", "diamond", 5.66), {"Ge": "Si"}),
    "GaAs in ZnS's cell": (("ZnS", "zincblende", 5.41), {"Zn": "Ga", "S": "As"}),
    "ZnSe in ZnS's cell": (("ZnS", "zincblende", 5.41), {"S": "Se"}),
    "Ag in Cu's cell": (("Cu", "fcc", 3.61), {"Cu": "Ag"}),
    "Cu in Ag's cell": (("Ag", "fcc", 4.09), {"Ag": "Cu"}),
    "Mo in W's cell": (("W", "bcc", 3.16), {"W": "Mo"}),
    "K in Na's cell": (("Na", "bcc", 4.23), {"Na": "K"}),
    "SrF2 in CaF2's cell": (("CaF2", "fluorite", 5.46), {"Ca": "Sr"}),
}


def substituted(host: tuple, mapping: dict):
    """The host crystal (ASE ``bulk(name, structure, a=a)``) with its elements replaced by ``mapping``."""
    from ase.build import bulk

    name, structure, a = host
    atoms = bulk(name, structure, a=a)
    symbols = atoms.get_chemical_symbols()
    if not set(mapping) <= set(symbols):
        raise ValueError(f"{name} has no {sorted(set(mapping) - set(symbols))} to substitute")
    atoms.set_chemical_symbols([mapping.get(s, s) for s in symbols])
    return atoms


def _compound(numbers) -> tuple:
    """A compound's element ratios: its sorted (element, count / gcd of the counts)."""
    elements, counts = np.unique(numbers, return_counts=True)
    return tuple(zip(elements.tolist(), (counts // np.gcd.reduce(counts)).tolist(), strict=True))


def _space_group(numbers, positions, cell) -> int:
    import spglib

    dataset = spglib.get_symmetry_dataset((cell, np.linalg.solve(cell.T, positions.T).T, numbers), symprec=1e-3)
    return int(dataset.number) if dataset is not None else 0


def seen_in(pairs, inputs: dict) -> dict[str, int]:
    """Per case (name -> its input ``ase.Atoms``): how many of ``pairs`` have the case's compound in the
    input's space group as their relaxed structure."""
    wanted = {name: (_compound(a.numbers), _space_group(a.numbers, a.positions, a.cell.array))
              for name, a in inputs.items()}
    seen = dict.fromkeys(inputs, 0)
    for pair in pairs:
        compound = _compound(pair.atomic_numbers)
        cases = [name for name, (want, _) in wanted.items() if want == compound]
        if not cases:  # spglib only for the few pairs of a case's compound
            continue
        group = _space_group(pair.atomic_numbers, pair.pos_relaxed, pair.cell_relaxed)
        for name in cases:
            seen[name] += group == wanted[name][1]
    return seen


def main(argv: list[str] | None = None) -> None:
    from bench.examples_relaxed import checkpoints_parser, chgnet_minima

    parser = checkpoints_parser("python -m bench.textbook_substitutions", __doc__)
    parser.add_argument("--seen-in", action="append", default=[], metavar="FOLDER",
                        help="count each case's compound among this pair folder's training pairs (repeatable)")
    args = parser.parse_args(argv)
    inputs = {name: substituted(*case) for name, case in CASES.items()}
    if args.seen_in:
        from e3relax_fast.io import read_pairs

        seen = seen_in(read_pairs(args.seen_in, "train"), inputs)
        print(f"| case | training pairs of {', '.join(args.seen_in)} with its compound in its space group |")
        print("|---|---|")
        for name, count in seen.items():
            print(f"| {name} | {count} |")
        if not args.checkpoint:
            return
    from e3relax_fast import load_pretrained
    from e3relax_fast.io import Pair
    from e3relax_fast.io.structures import to_arrays
    from e3relax_fast.training import evaluate

    targets = chgnet_minima(inputs)
    pairs = [Pair(name, *to_arrays(inputs[name]), *to_arrays(targets[name])[1:]) for name in CASES]
    start = np.array([abs(np.linalg.det(p.cell_unrelaxed)) for p in pairs])
    change = {"CHGNet (target)": [abs(np.linalg.det(p.cell_relaxed)) for p in pairs] / start}
    scores = {}
    for name in args.checkpoint or ["default"]:
        result = evaluate(load_pretrained(name), pairs, match=False)
        change[f"`{name}`"] = np.array([abs(np.linalg.det(cell)) for _, cell in result["predictions"]]) / start
        scores[f"`{name}`"] = [result["model"][k] / result["dummy"][k] for k in ("coord_mae", "volume_error")]
    print("| case | " + " | ".join(f"{who}: volume change" for who in change) + " |")
    print("|---|" + "---|" * len(change))
    for k, name in enumerate(CASES):
        print(f"| {name} | " + " | ".join(f"{100 * (c[k] - 1):+.0f} %" for c in change.values()) + " |")
    for k, label in enumerate(("coordinate MAE / Dummy", "volume error / Dummy")):
        print(f"| {label} | | " + " | ".join(f"{s[k]:.3f}" for s in scores.values()) + " |")


if __name__ == "__main__":
    main()
