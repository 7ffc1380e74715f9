"""How far the predicted cell's *shape* is from the target's, beside the input's (Dummy).

The shape without the volume or the orientation: per lattice vector, ln of its length minus the mean
of the three (the lengths' ratios), and the cosines of the three angles. Per structure the mean
absolute difference from the target's, for the input and for the prediction (``relax_batch`` with
its defaults), then per protocol and family. A model that predicts the volume but leaves the shape as
it finds it scores the input's numbers here, however good its volume error.

    python -m bench.cell_shape --data data/chgnet_v13sym --data data/chgnet_v4 --split test
    python -m bench.cell_shape --data data/chgnet_v13sym --data data/chgnet_v4 --checkpoint runs/X/best.pt
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch


def shape_errors(cells: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(G,)`` mean |difference| of the lengths' ratios (ln) and ``(G,)`` of the angles' cosines
    between ``(G, 3, 3)`` row cells and their targets."""
    from e3relax_fast.model.e3relax import cell_shape

    ours, theirs = (cell_shape(torch.from_numpy(np.asarray(c, dtype=np.float64))).numpy() for c in (cells, targets))
    diff = np.abs(ours - theirs)
    return diff[:, :3].mean(1), diff[:, 3:].mean(1)


def table(groups: dict[str, dict[str, list[float]]]) -> list[str]:
    """Markdown rows from ``{group: {"dummy_len", "dummy_cos", "model_len", "model_cos": [...]}}``."""
    lines = ["| group | pairs | lengths' ratios: input | prediction | angles' cosines: input | prediction |",
             "|---|---|---|---|---|---|"]
    for name in sorted(groups, key=lambda g: (g != "all", g)):
        g = {k: np.mean(v) for k, v in groups[name].items()}
        lines.append(f"| {name} | {len(groups[name]['dummy_len'])} | {g['dummy_len']:.4f} | {g['model_len']:.4f} | "
                     f"{g['dummy_cos']:.4f} | {g['model_cos']:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cell_shape", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint", default="default", help="bundled name or checkpoint path")
    args = ap.parse_args(argv)

    from e3relax_fast.io import read_pairs
    from e3relax_fast.model import load_pretrained
    from e3relax_fast.training.evaluate import predict

    pairs = read_pairs(args.data, args.split)
    targets = np.stack([p.cell_relaxed for p in pairs])
    dummy = shape_errors(np.stack([p.cell_unrelaxed for p in pairs]), targets)
    model = shape_errors(np.stack([cell for _, cell in predict(load_pretrained(args.checkpoint), pairs)]), targets)
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, pair in enumerate(pairs):
        for name in ("all", f"protocol {pair.protocol}", f"family {pair.family}"):
            for who, (lengths, cosines) in (("dummy", dummy), ("model", model)):
                groups[name][f"{who}_len"].append(float(lengths[i]))
                groups[name][f"{who}_cos"].append(float(cosines[i]))
    print(f"# cell shape against the target: {len(pairs)} pairs of {', '.join(args.data)} ({args.split}); "
          f"model {args.checkpoint}\n")
    print("\n".join(table(groups)))


if __name__ == "__main__":
    main()
