"""Run every CPU benchmark at its default size and write ``bench/RESULTS.md`` anew (the sections
other commands write — ``report.KEPT_SECTIONS``: the static sm_90 report, the comparison with the
original pipeline — are carried over from the old file).

    cd <repo root> && python -m bench.run_cpu      # ~7 min on 2 cores
    python -m bench.run_cpu --no-scaling           # without the graph scaling series (~4 min)
    python -m bench.run_cpu --no-message-passing   # without the message-passing --quick run

Benchmarks: graph building (MP-like mix and scaling series), ``relax_batch``, and the message
op / layer / model microbenchmark in its ``--quick`` CPU form (eager reference vs torch.compile).

CPU only by construction: CUDA is hidden (``CUDA_VISIBLE_DEVICES=""``) before torch is imported,
so no GPU number can end up in the report. CSV rows also go to ``bench/out/*.csv``.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything imports torch

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from . import (  # noqa: E402
    bench_datagen,
    bench_lattice_message,
    bench_message_passing,
    bench_precision,
    bench_radius_graph,
    bench_relax_batch,
    harness,
    inputs,
    report,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parent.parent

# Kernel test files whose results the report lists (CPU: compiled launchers, Triton interpreter).
CORRECTNESS_FILES = {
    "tests/ops/test_radius_graph.py": "radius graph: every backend vs the reference, golden graphs and a NumPy oracle",
    "tests/ops/test_radius_graph_cpu_paths.py": "radius graph: every path of the C++ `cpu` backend vs the reference",
    "tests/ops/test_message_passing.py": "atom–atom message op: each backend (cpu, cuda logic, triton, cueq) fwd + bwd",
    "tests/ops/test_lattice_message.py": "atom–lattice message op: cpu and Triton fwd + bwd (interpreter)",
    "tests/ops/test_lattice_pool.py": "lattice pooling (segment mean): Triton fwd + bwd (interpreter)",
    "tests/kernels/test_message_passing_aot.py": "message-passing kernels compiled ahead of time for sm_90",
    "tests/kernels/test_lattice_message_aot.py": "atom–lattice and pool kernels compiled ahead of time for sm_90",
    "tests/kernels/test_radius_graph_aot.py": "radius-graph kernels compiled ahead of time for sm_90",
    "tests/model/test_model_capture.py": "model forward: one graph, no host sync; CUDA-graph capture (GPU only)",
}


def kernel_correctness() -> tuple[str, str]:
    """Run the kernel test files once (pytest, CPU) and tabulate them. Returns ``(markdown, summary)``."""
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET

    files = [f for f in CORRECTNESS_FILES if (ROOT / f).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
                               *files], cwd=ROOT, env=env, capture_output=True, text=True)
        per: dict[str, list] = {f: [0, 0, 0, 0.0, set()] for f in files}  # passed, skipped, failed, s, reasons
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            # classname "tests.ops.test_x" (or "tests.ops.test_x.TestClass"): the file is its longest known prefix
            parts = case.get("classname", "").split(".")
            row = next((per[f] for f in ("/".join(parts[:i]) + ".py" for i in range(len(parts), 0, -1)) if f in per),
                       None)
            if row is None:
                continue
            row[3] += float(case.get("time", 0))
            skip = case.find("skipped")
            if case.find("failure") is not None or case.find("error") is not None:
                row[2] += 1
            elif skip is not None:
                row[1] += 1
                row[4].add(skip.get("message", "")[:90])
            else:
                row[0] += 1
    return report.correctness_md(per, CORRECTNESS_FILES, proc.returncode)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.run_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-graph", type=int, default=1000, help="crystals for the graph benchmark (1000)")
    ap.add_argument("--n-relax", type=int, default=48, help="crystals for the relax_batch benchmark (48)")
    ap.add_argument("--model-sizes", nargs="*", default=["512x4", "64x4"], help="HxL (512x4 64x4)")
    ap.add_argument("--verify", type=int, default=200, help="graph: original == reference check on N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the 8..20,000-atom graph scaling series (~3 min)")
    ap.add_argument("--no-message-passing", dest="message_passing", action="store_false",
                    help="skip the message op / layer / model microbenchmark (--quick, ~1.5 min)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="report path (default bench/RESULTS.md)")
    ap.add_argument("--graph-threads", type=int, default=2,
                    help="threads of the second graph run (original, cpu, vesin only; 2); 0 skips it")
    ap.add_argument("--datagen-n", type=int, default=24,
                    help="structures of the pair-generation benchmark (24, ~2 min with CHGNet); 0 skips it")
    ap.add_argument("--n-precision", type=int, default=200, help="validation pairs of the precision benchmark (200)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch (and vesin) threads; default 1 (see RESULTS.md); 0 = torch's default")
    args = ap.parse_args(argv)
    threads = harness.set_threads(args.threads)

    cmd = "python -m bench.run_cpu" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    info = harness.machine()
    load_start = harness.load_average()
    t0 = time.perf_counter()
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"== {cmd}\n== {harness.machine_line(info)}; load {load_start}", flush=True)

    graph = bench_radius_graph.run_mix(args.n_graph, repeats=args.repeats, verify_n=args.verify, info=info)
    graph2 = report.NOT_RUN
    if args.graph_threads:
        harness.set_threads(args.graph_threads)
        graph2 = bench_radius_graph.run_mix(
            args.n_graph, repeats=max(args.repeats, 5), providers=["original", "cpu", "cpu-portable", "vesin"],
            info=info,
        )
        harness.set_threads(args.threads)
    precision = bench_precision.run(args.n_precision, "cpu", repeats=args.repeats, info=info)
    datagen = bench_datagen.run(args.datagen_n, info=info) if args.datagen_n else report.NOT_RUN
    scaling = bench_radius_graph.run_scaling(repeats=args.repeats, info=info) if args.scaling else report.NOT_RUN
    relax = bench_relax_batch.run(
        args.n_relax, [harness.parse_model_size(s) for s in args.model_sizes], repeats=args.repeats, info=info,
    )
    message_passing = report.NOT_RUN
    if args.message_passing:
        mp_args = bench_message_passing.parse_args(
            ["--quick", "--no-accuracy", "--device", "cpu", "--threads", str(threads)]
        )
        mp_md, mp_res = bench_message_passing.run(mp_args, info)
        lattice_md, _ = bench_lattice_message.run(200, [64, 512], "cpu", repeats=max(args.repeats, 5), info=info)
        message_passing = (mp_md + "\n" + lattice_md, mp_res)
    correctness_md, correctness_summary = kernel_correctness()
    print(f"== kernel correctness: {correctness_summary}", flush=True)
    load_end = harness.load_average()
    wall = time.perf_counter() - t0

    run = report.CpuRun(
        command=cmd, started=started, wall_s=wall, info=info, load_start=load_start, load_end=load_end,
        inputs=inputs.describe(inputs.mp_like_mix(args.n_graph)), n_relax=args.n_relax, threads=threads,
        graph_threads=args.graph_threads, graph=graph, relax=relax, correctness_md=correctness_md,
        graph2=graph2, precision=precision, datagen=datagen, scaling=scaling, message_passing=message_passing,
    )
    text = report.results_md(run)
    old = args.out.read_text() if args.out.exists() else ""
    for name in report.KEPT_SECTIONS:  # written by their own commands: carried over as they are
        kept = report.section(old, name)
        if kept is not None:
            text = report.splice_section(text, name, kept)
    args.out.write_text(text)
    print(f"\nwrote {args.out} ({wall / 60:.1f} min); CSV rows in {report.OUT_DIR}/", flush=True)


if __name__ == "__main__":
    main()
