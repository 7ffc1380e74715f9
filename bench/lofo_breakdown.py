"""Where a held-out family's error against Dummy comes from: per protocol and per element set.

A fold's model / Dummy ratio is a ratio of sums over the family's crystals, so a few crystal types
that the model gets badly wrong can decide it. This splits those sums by protocol and by element set
(a crystal's elements, e.g. ``C-Si``), lists the element sets that lose most against Dummy with the
volume change the model predicts for them beside the one their targets make, and gives the ratios
without the worst of them (of those that lose against Dummy; never all of them).

    python -m bench.lofo_breakdown --checkpoint runs/lofo_vir2m/nomad/best.pt --family nomad \\
        --data data/chgnet_v13sym --data data/chgnet_v4i
    python -m bench.lofo_breakdown --checkpoint default --family pyxtal --data data/chgnet_v5f
"""

from __future__ import annotations

import argparse

import numpy as np

WITHOUT = (1, 2, 5)  # the ratios are also given without this many of the worst element sets


def element_set(numbers) -> str:
    """``"C-Si"``: the distinct elements of a crystal, alphabetically."""
    from ase.data import chemical_symbols

    return "-".join(sorted({chemical_symbols[int(z)] for z in numbers}))


def losses(keys: np.ndarray, model: np.ndarray, dummy: np.ndarray) -> list[tuple[str, float]]:
    """``[(key, Σ model − Σ dummy)]`` over the structures of each key, the largest loss first
    (a loss is error the model adds over doing nothing; negative where the model helps)."""
    totals: dict[str, float] = {}
    for key, m, d in zip(keys, model, dummy, strict=True):
        totals[key] = totals.get(key, 0.0) + float(m - d)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def ratio_without(keys: np.ndarray, model: np.ndarray, dummy: np.ndarray, dropped) -> float:
    """Σ model / Σ dummy over the structures whose key is not in ``dropped``."""
    keep = ~np.isin(keys, list(dropped))
    return float(model[keep].sum() / dummy[keep].sum())


def report(keys, protocols, per_structure: dict, volume_ratio, target_ratio, worst: int) -> list[str]:
    """Markdown lines: the ratios per protocol, the ``worst`` element sets, the ratios without some."""
    model, dummy = per_structure["model"], per_structure["dummy"]
    coords, volumes = (model["coord_mae"], dummy["coord_mae"]), (model["volume_error"], dummy["volume_error"])
    lines = [f"All {len(keys)} structures: coordinates {coords[0].sum() / coords[1].sum():.3f} × Dummy, "
             f"volume {volumes[0].sum() / volumes[1].sum():.3f} ×", "",
             "| protocol | structures | share of Dummy's coordinate error | coordinates model / Dummy |",
             "|---|---|---|---|"]
    for protocol in sorted(set(protocols)):
        sel = protocols == protocol
        base = coords[1][sel].sum()  # zero for already-relaxed inputs: no ratio
        ratio = f"{coords[0][sel].sum() / base:.3f}" if base > 0 else "n/a"
        lines.append(f"| {protocol} | {sel.sum()} | {base / coords[1].sum():.2f} | {ratio} |")
    ranked = losses(keys, *coords)
    lines += ["", "| element set | structures | coordinate loss (Å, summed) | predicted volume / input's | "
              "target's volume / input's |", "|---|---|---|---|---|"]
    for key, loss in ranked[:worst]:
        sel = keys == key
        lines.append(f"| {key} | {sel.sum()} | {loss:+.2f} | {volume_ratio[sel].min():.2f}–"
                     f"{volume_ratio[sel].max():.2f} | {target_ratio[sel].min():.2f}–{target_ratio[sel].max():.2f} |")
    lines.append("")
    losing = [key for key, loss in ranked if loss > 0]  # only those the model makes worse than Dummy
    for k in (k for k in WITHOUT if k <= len(losing) < len(ranked)):
        dropped = losing[:k]
        lines.append(f"Without the {k} worst element set(s) ({', '.join(dropped)}): coordinates "
                     f"{ratio_without(keys, *coords, dropped):.3f} × Dummy, "
                     f"volume {ratio_without(keys, *volumes, dropped):.3f} ×")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.lofo_breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    ap.add_argument("--family", required=True, help="the held-out seed family: its pairs in every split")
    ap.add_argument("--checkpoint", default="default", help="bundled name or checkpoint path")
    ap.add_argument("--worst", type=int, default=10, help="element sets listed (default 10)")
    args = ap.parse_args(argv)
    from e3relax_fast import load_pretrained
    from e3relax_fast.io import SPLITS, read_pairs
    from e3relax_fast.training import evaluate

    pairs = [p for split in SPLITS for p in read_pairs(args.data, split) if p.family == args.family]
    if not pairs:
        raise SystemExit(f"no pairs of family {args.family!r} in {', '.join(args.data)}")
    result = evaluate(load_pretrained(args.checkpoint), pairs, match=False)
    volume = np.array([abs(np.linalg.det(cell)) for _, cell in result["predictions"]])
    start = np.array([abs(np.linalg.det(p.cell_unrelaxed)) for p in pairs])
    target = np.array([abs(np.linalg.det(p.cell_relaxed)) for p in pairs])
    keys = np.array([element_set(p.atomic_numbers) for p in pairs])
    protocols = np.array([p.protocol or "?" for p in pairs])
    print(f"{args.checkpoint} on the {args.family} pairs of {', '.join(args.data)} (all splits)\n")
    print("\n".join(report(keys, protocols, result["per_structure"], volume / start, target / start, args.worst)))


if __name__ == "__main__":
    main()
