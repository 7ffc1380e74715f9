"""Benchmark: ``relax_batch`` against the original E3Relax user pipeline, end to end, in one run.

The original (the authors' public repository, installed as a user would in its own environment:
torch, torch_geometric, torch_scatter, pymatgen, ASE) runs in a subprocess,
:mod:`bench.original_worker`: its ``predict_relaxed_structure.py`` loop without file I/O — pymatgen
graph with top-50 per structure, a batch of one, the eager forward. Its code is never copied here.

Same inputs (the first ``--n`` crystals of the MP-like mix, in memory), same weights (the original's
model seeded with ``torch.manual_seed(0)``, its state dict loaded into ours), same threads (``--threads``
in both processes). Modes, timed in interleaved rounds (``harness.measure_interleaved``, order rotated):

* ``original`` — the original pipeline over all crystals (wall time seen from here, pipe included);
* ``relax_batch`` — one ``relax_batch(triples, model=...)`` call with every default (canonical frame,
  symmetry kept, the automatic backend and atom budget);
* ``relax_batch 1 by 1`` — ``relax_batch([t], ...)`` per crystal.

Before timing, a parity check that the weights are the same: the original's predictions against ours
with ``paper_compat=True`` and ``frame="input"`` (the original's arithmetic), max |Δ| over all atoms.

    python -m bench.bench_original --original-python /path/venv/bin/python --original-src /path/E3Relax
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import harness, inputs, report

BENCH = "relax_batch_vs_original"


class OriginalPipeline:
    """The worker process of one model size; ``run()`` runs the original over every input."""

    def __init__(self, python: str, src: str, inputs_npz: Path, hidden: int, layers: int, threads: int,
                 state_out: Path):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        env.pop("PYTHONPATH", None)  # the worker's environment is the original's own
        cmd = [python, str(Path(__file__).with_name("original_worker.py")), "--src", src, "--inputs",
               str(inputs_npz), "--hidden", str(hidden), "--layers", str(layers), "--threads", str(threads),
               "--state-out", str(state_out)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the original pipeline's worker exited (code {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def run(self) -> float:
        return self._ask("run")["seconds"]

    def predictions(self, path: Path) -> dict:
        self._ask(f"dump {path}")
        return dict(np.load(path))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _write_inputs(triples, path: Path) -> None:
    ptr = np.cumsum([0] + [len(t[0]) for t in triples])
    np.savez(path, numbers=np.concatenate([t[0] for t in triples]), ptr=ptr,
             positions=np.concatenate([t[1] for t in triples]), cells=np.stack([t[2] for t in triples]))


def _parity(original: dict, triples, state: Path) -> float:
    """Max |Δ| (Å) between the original's predictions and ours in the original's arithmetic."""
    from e3relax_fast import load_pretrained, relax_batch

    paper = load_pretrained(state, paper_compat=True)
    ours = relax_batch(triples, model=paper, frame="input")  # triples in, triples out
    positions = np.concatenate([np.asarray(t[1]) for t in ours])
    cells = np.stack([np.asarray(t[2]) for t in ours])
    return float(max(np.abs(positions - original["positions"]).max(), np.abs(cells - original["cells"]).max()))


def _time_size(hidden, layers, triples, npz, tmp: Path, args) -> list[harness.Result]:
    from e3relax_fast import load_pretrained, relax_batch

    state = tmp / f"original_h{hidden}.pt"
    original = OriginalPipeline(args.original_python, args.original_src, npz, hidden, layers, args.threads, state)
    try:
        original.run()  # its warm-up, and the predictions of the parity check
        parity = _parity(original.predictions(tmp / "original_pred.npz"), triples, state)
        model = load_pretrained(state, paper_compat=False)
        fns = {
            "original": original.run,
            "relax_batch": lambda: relax_batch(triples, model=model),
            "relax_batch 1 by 1": lambda: [relax_batch([t], model=model) for t in triples],
        }
        times = harness.measure_interleaved(fns, repeats=args.repeats, warmup=1, long_s=None)
    finally:
        original.close()
    atoms = sum(len(t[0]) for t in triples)
    case = f"H={hidden} L={layers} n={len(triples)} threads={args.threads}"
    results = []
    for name, ts in times.items():
        med = statistics.median(ts)
        results.append(harness.Result(benchmark=BENCH, provider=name, backend="auto", device="cpu", case=case,
                                      median_s=med, throughput=len(triples) / med, unit="structures/s",
                                      extra={"min_s": min(ts), "atoms_per_s": atoms / med, "parity_A": parity,
                                             "original_torch": original.info.get("torch")}))
    base = statistics.median(times["original"])
    for r in results:
        r.ratios["original"] = base / r.median_s
    return results


def run(args, info) -> str:
    harness.set_threads(args.threads)
    triples = inputs.mp_like_mix(args.n, seed=args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        npz = tmp / "inputs.npz"
        _write_inputs(triples, npz)
        for size in args.sizes:
            hidden, layers = harness.parse_model_size(size)
            print(f"[{BENCH}] H={hidden} L={layers}: {inputs.describe(triples)}", flush=True)
            results += _time_size(hidden, layers, triples, npz, tmp, args)
    rows = [[r.case.split(" n=")[0], r.provider,
             f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})", report.fmt_num(r.throughput),
             report.fmt_num(r.extra["atoms_per_s"]), report.fmt_ratio(r.ratios["original"]),
             f"{r.extra['parity_A']:.1e}"] for r in results]
    report.append_csv(results, BENCH, baseline="original", info=info)
    return (
        f"### relax_batch against the original pipeline ({inputs.describe(triples)}, {args.threads} threads)\n\n"
        f"The original: the authors' public repository in its own environment (torch "
        f"{results[0].extra['original_torch']}), its prediction loop without file I/O. Same inputs, same "
        f"weights (seeded untrained model, state dict shared), median (min) of {args.repeats} interleaved rounds "
        f"after one warm-up round. Speed-up = original median / mode median. Weights check: max |Δ| between the "
        f"original's predictions and ours with `paper_compat=True, frame=\"input\"`.\n\n"
        + report.markdown_table(["model", "mode", "median (min)", "structures/s", "atoms/s", "speed-up vs original",
                                 "weights check |Δ| Å"], rows) + "\n"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_original", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original-python", required=True, help="interpreter of the original's environment")
    ap.add_argument("--original-src", required=True, help="folder with the original repository's files")
    ap.add_argument("--n", type=int, default=320, help="crystals (first n of the MP-like mix; default 320)")
    ap.add_argument("--sizes", nargs="*", default=["64x4", "512x4"], help="model sizes HxL")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true",
                    help="also put the result into bench/RESULTS.md (its original-pipeline section)")
    args = ap.parse_args(argv)
    info = harness.machine()
    cmd = "python -m bench.bench_original " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report.header_md("relax_batch against the original pipeline", cmd.strip(), info) + "\n" + run(args, info)
    print(md)
    if args.write:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        results.write_text(report.splice_section(results.read_text(), "original-pipeline", md))


if __name__ == "__main__":
    main()
