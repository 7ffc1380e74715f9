"""Benchmark: accuracy (and speed) of the inference precisions of ``relax_batch`` against float64.

The shipped default model (trained weights, so the deviations are those a user sees) relaxes the
validation pairs of ``data/`` once per configuration; every configuration gets the same inputs:

* ``float64`` — the reference;
* ``float32`` — ``dtype=torch.float32`` (``precision="default"``);
* ``bf16`` — ``dtype=torch.float32, precision="bf16"`` (autocast: linear layers in bfloat16);
* ``tf32`` — ``dtype=torch.float32, precision="tf32"`` (CUDA only: TF32 tensor-core matmuls).

Reported per configuration: max and mean |Δ position| (Å, over atoms) and max |Δ cell entry| (Å)
against float64, the coordinate MAE (mean over structures of the mean over atoms × xyz, as `eval`) against the
true relaxed structures (to show whether the
deviation matters next to the model's own error), and the median time of the whole
``relax_batch`` call with its ratio to float32.

    python -m bench.bench_precision                       # CPU, 200 val pairs
    python -m bench.bench_precision --device cuda --n 2000
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from . import harness, report

BENCH = "precision"
DATA = Path(__file__).resolve().parent.parent / "data"


def load_pairs(n: int):
    """The first ``n`` validation pairs of the shipped datasets (``data/chgnet_*``)."""
    from e3relax_fast.io import read_pairs

    pairs = []
    for folder in sorted(DATA.glob("chgnet_*")):
        pairs += read_pairs(folder, "val")
    return pairs[:n]


def run(n: int = 200, device: str = "cpu", repeats: int = 3, info: dict | None = None):
    """Returns ``(markdown, results)``."""
    import torch

    from e3relax_fast import load_pretrained, relax_batch
    from e3relax_fast.training import unwrap_targets

    pairs = load_pairs(n)
    triples = [(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs]
    atoms = sum(len(t[0]) for t in triples)
    model = load_pretrained("default")
    configs = {"float64": dict(dtype=torch.float64), "float32": dict(dtype=torch.float32),
               "bf16": dict(dtype=torch.float32, precision="bf16")}
    if torch.device(device).type == "cuda":
        configs["tf32"] = dict(dtype=torch.float32, precision="tf32")
    outputs = {}

    def call(name):
        outputs[name] = relax_batch(triples, model=model, device=device, **configs[name])

    times = harness.measure_interleaved({k: (lambda k=k: call(k)) for k in configs}, repeats=repeats, warmup=1)

    # Targets unwrapped to the image nearest each unrelaxed atom, as in training and `eval`.
    targets = [unwrap_targets(torch.from_numpy(p.pos_unrelaxed), torch.from_numpy(p.pos_relaxed),
                              torch.from_numpy(p.cell_relaxed)[None], torch.tensor([0, len(p.atomic_numbers)]))[0]
               .numpy() for p in pairs]

    def coord_mae(arrays):
        return float(np.mean([np.abs(pos - t).mean()  # as metrics.coordinate_mae: mean over atoms × xyz
                              for (pos, _), t in zip(arrays, targets, strict=True)]))

    ref_arrays = result_arrays(outputs["float64"])
    results, rows = [], []
    for name in configs:
        arrays = result_arrays(outputs[name])
        pairs_ab = list(zip(arrays, ref_arrays, strict=True))
        dp = np.concatenate([np.linalg.norm(a[0] - b[0], axis=1) for a, b in pairs_ab])
        dc = max(float(np.abs(a[1] - b[1]).max()) for a, b in pairs_ab)
        t = statistics.median(times[name])
        r = harness.Result(BENCH, name, "reference", device, f"default model, {len(pairs)} val pairs", t,
                           len(pairs) / t, "structures/s",
                           extra={"max_dpos": float(dp.max()), "mean_dpos": float(dp.mean()), "max_dcell": dc,
                                  "coord_mae": coord_mae(arrays), "min_s": round(min(times[name]), 6)})
        results.append(r)
    harness.add_ratios(results, ["float32"])
    report.append_csv(results, BENCH, baseline="float32", info=info)
    for r in results:
        rows.append([f"`{r.provider}`", f"{r.extra['max_dpos']:.2e}", f"{r.extra['mean_dpos']:.2e}",
                     f"{r.extra['max_dcell']:.2e}", f"{r.extra['coord_mae']:.4f}",
                     f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})",
                     report.fmt_ratio(r.ratios.get("float32"))])
    table = report.markdown_table(["precision", "max |Δpos| vs float64 (Å)", "mean |Δpos| (Å)",
                                    "max |Δcell| (Å)", "coordinate MAE vs truth (Å)", "relax_batch median (min)",
                                    "× vs float32"], rows)
    md = (report.header_md(f"Inference precision ({device})", f"python -m bench.bench_precision "
                            f"--n {n} --device {device}", info)
          + f"- inputs: the first {len(pairs)} validation pairs of data/chgnet_* ({atoms} atoms), the shipped "
          "default model, `relax_batch` end to end (graph, forward, conversion)\n\n" + table + "\n")
    return md, results


def result_arrays(result):
    """``[(positions (n, 3), cell (3, 3))]`` of a ``relax_batch`` result of ``(z, pos, cell)`` triples."""
    return [(np.asarray(s[1]), np.asarray(s[2])) for s in result]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    md, _ = run(args.n, args.device, args.repeats)
    print(md)


if __name__ == "__main__":
    main()
