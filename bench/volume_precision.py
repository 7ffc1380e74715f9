"""How precisely a model knows a crystal's relaxed volume, per protocol and volume guess.

For every pair: the true change ln(V_relaxed / V_input) and the model's ln(V_predicted / V_input)
(predictions by ``relax_batch`` with its defaults). Per group (the pair's protocol, and for a
substitution its volume guess, ``radius3``, ``dls`` or ``none``, from ``index.csv``): the mean
|true change| (Dummy's error), the mean |predicted change|, their correlation and the mean |error|.
A model that moves the volume much less than the true change, with a weak correlation, cannot
resolve that group's volume changes: e.g. the random strain of the rattled pairs against its
precision on the substitutions.

    python -m bench.volume_precision --data data/chgnet_v4 --split test
    python -m bench.volume_precision --data data/chgnet_v4h --split val --checkpoint runs/X/best.pt
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def volume_guesses(sources: list[str]) -> dict[str, str]:
    """``{pair id: volume guess}`` of each substitution in the sources' ``index.csv``: its note's
    ``vol=...``, or ``radius3`` (the generator's default, which it does not note); other pairs, and
    datasets without an index, are left out."""
    out = {}
    for source in sources:
        index = Path(source) / "index.csv"
        if not index.exists():
            continue
        with index.open() as f:
            for row in csv.DictReader(f):
                if not row.get("protocol", "").startswith("subst"):
                    continue
                words = [w[4:] for w in (row.get("note") or "").split(";") if w.startswith("vol=")]
                out[row["atoms_id"]] = words[0] if words else "radius3"
    return out


def group_table(groups: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Markdown rows from ``{group: [(true ln V change, predicted ln V change)]}``."""
    lines = ["| group | pairs | mean \\|true\\| (Dummy) | mean \\|predicted\\| | correlation | mean \\|error\\| |",
             "|---|---|---|---|---|---|"]
    for name in sorted(groups):
        true, predicted = np.array(groups[name]).T
        varied = len(true) > 2 and true.std() > 0 and predicted.std() > 0
        correlation = f"{np.corrcoef(true, predicted)[0, 1]:.2f}" if varied else "n/a"
        lines.append(f"| {name} | {len(true)} | {np.abs(true).mean():.3f} | {np.abs(predicted).mean():.3f} | "
                     f"{correlation} | {np.abs(true - predicted).mean():.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.volume_precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint", default="default", help="bundled name or checkpoint path")
    args = ap.parse_args(argv)
    from e3relax_fast import load_pretrained
    from e3relax_fast.io import read_pairs
    from e3relax_fast.training.evaluate import predict

    pairs = read_pairs(args.data, args.split)
    guesses = volume_guesses(args.data)
    groups: dict[str, list[tuple[float, float]]] = {}
    for pair, (_, cell) in zip(pairs, predict(load_pretrained(args.checkpoint), pairs), strict=True):
        v_input = abs(np.linalg.det(pair.cell_unrelaxed))
        name = pair.protocol + (f" ({guesses[pair.id]})" if pair.id in guesses else "")
        groups.setdefault(name, []).append((np.log(abs(np.linalg.det(pair.cell_relaxed)) / v_input),
                                            np.log(abs(np.linalg.det(cell)) / v_input)))
    print(f"ln(V / V_input) of {args.checkpoint} on {len(pairs)} {args.split} pairs of {', '.join(args.data)}\n")
    print("\n".join(group_table(groups)))


if __name__ == "__main__":
    main()
