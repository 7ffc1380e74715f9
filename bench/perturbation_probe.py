"""Can a model undo a perturbation of a crystal it has not seen?

Each pair's relaxed structure (the already-relaxed pairs left out: their structures are their seeds'
minima, which other pairs share) is perturbed as the ``rattle`` protocol makes its inputs — the
displacements alone (σ = 0.08 Å), the symmetric stretch alone (entries within ±0.05), both — and
given to the model with the relaxed structure as the target
(:func:`e3relax_fast.training.perturbed_twins`). Unlike the rattled pairs, whose relaxation may end
in another minimum, every target here is the minimum the input was made from. Model / Dummy below
1 means the model moves the structure back toward it.

    python -m bench.perturbation_probe --data data/chgnet_v13sym --data data/chgnet_v4 --split test
    python -m bench.perturbation_probe --data data/chgnet_v13sym --data data/chgnet_v4 --checkpoint runs/X/best.pt
"""

from __future__ import annotations

import argparse

#: (name, stretch amplitude, displacement σ in Å); None: the rattle protocol's value.
PERTURBATIONS = (("displacements alone", 0.0, None), ("stretch alone", None, 0.0), ("both", None, None))


def probe_pairs(pairs: list, seed: int = 0) -> dict[str, list]:
    """``{perturbation name: pairs}``: the relaxed structure of every pair but the already-relaxed
    ones, perturbed each way (the same ``seed`` for each, so the draws match)."""
    from e3relax_fast.training import perturbed_twins

    relaxed = [p for p in pairs if p.protocol != "minimum"]
    return {name: perturbed_twins(relaxed, 1.0, seed, strain=strain, sigma=sigma)
            for name, strain, sigma in PERTURBATIONS}


def probe_table(results: dict[str, dict]) -> list[str]:
    """Markdown rows from ``{perturbation name: evaluate()'s result}``; the volume's ratio is "n/a"
    where Dummy's volume is exact (displacements alone)."""
    lines = ["| perturbation | structures | Dummy coordinate MAE (Å) | coordinates model / Dummy "
             "| volume model / Dummy |", "|---|---|---|---|---|"]
    for name, result in results.items():
        model, dummy = result["model"], result["dummy"]
        n = len(result["per_structure"]["model"]["coord_mae"])
        volume = f"{model['volume_error'] / dummy['volume_error']:.3f}" if dummy["volume_error"] > 0 else "n/a"
        lines.append(f"| {name} | {n} | {dummy['coord_mae']:.4f} | {model['coord_mae'] / dummy['coord_mae']:.3f} | "
                     f"{volume} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.perturbation_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint", default="default", help="bundled name or checkpoint path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from e3relax_fast import load_pretrained
    from e3relax_fast.io import read_pairs
    from e3relax_fast.training import evaluate

    model = load_pretrained(args.checkpoint)
    probes = probe_pairs(read_pairs(args.data, args.split), args.seed)
    results = {name: evaluate(model, pairs, match=False) for name, pairs in probes.items()}
    print(f"{args.checkpoint} on the relaxed structures of the {args.split} pairs of {', '.join(args.data)}, "
          f"perturbed (seed {args.seed})\n")
    print("\n".join(probe_table(results)))


if __name__ == "__main__":
    main()
