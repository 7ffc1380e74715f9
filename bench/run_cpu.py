"""Run every CPU benchmark at its default size and write ``bench/RESULTS.md`` from scratch.

    cd <repo root> && PYTHONPATH=. python bench/run_cpu.py      # ~7 min on 2 cores
    PYTHONPATH=. python bench/run_cpu.py --no-scaling           # without the graph scaling series (~4 min)
    PYTHONPATH=. python bench/run_cpu.py --no-message-passing   # without the message-passing --quick run

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_datagen  # noqa: E402
import bench_lattice_message  # noqa: E402
import bench_message_passing  # noqa: E402
import bench_precision  # noqa: E402
import bench_radius_graph  # noqa: E402
import bench_relax_batch  # noqa: E402
import harness  # noqa: E402
import mp_like  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parent.parent

# Kernel test files whose results the report lists (CPU: compiled launchers, Triton interpreter).
CORRECTNESS_FILES = {
    "tests/test_radius_graph.py": "radius graph: reference builder vs golden graphs and a NumPy oracle",
    "tests/test_radius_graph_cpu.py": "radius graph: C++ `cpu` backend and the CUDA kernel's logic on its CPU launcher",
    "tests/test_radius_graph_triton.py": "radius graph: Triton kernel (interpreter)",
    "tests/test_message_passing_triton.py": "atom–atom message op: Triton fwd + bwd (interpreter), model parity",
    "tests/test_message_passing_cuda.py": "atom–atom message op: CUDA forward's logic on its CPU launcher",
    "tests/test_message_passing_cueq.py": "atom–atom message op: cuEquivariance backend (naive CPU path)",
    "tests/test_lattice_message_triton.py": "atom–lattice message op: Triton fwd + bwd (interpreter)",
    "tests/test_lattice_pool_triton.py": "lattice pooling (segment mean): Triton fwd + bwd (interpreter)",
    "tests/test_triton_aot.py": "every Triton kernel compiled ahead of time for sm_90",
    "tests/test_model_capture.py": "model forward: one graph, no host sync; CUDA-graph capture (GPU only)",
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
            f = case.get("classname", "").split(".")[-1]
            row = per.get(f"tests/{f}.py")
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
    rows = [[f"`{f}`", CORRECTNESS_FILES[f], p, sk, fl, f"{t:.0f} s", "; ".join(sorted(r))]
            for f, (p, sk, fl, t, r) in per.items()]
    total = [sum(r[k] for r in per.values()) for k in range(3)]
    summary = (f"{total[0]} passed, {total[1]} skipped, {total[2]} failed "
               f"(pytest exit code {proc.returncode})")
    md = ("## Kernel correctness on this machine (CPU, Triton interpreter)\n\n"
          f"- command: `TRITON_INTERPRET=1 python -m pytest -q {' '.join(files)}`\n- result: {summary}\n\n"
          + harness.markdown_table(["file", "what", "passed", "skipped", "failed", "time", "skip reasons"], rows)
          + "\n\nTolerances (asserted in the files): neighbour lists exact (integers equal after the canonical "
          "order); fused ops vs the float64 reference 1e-10 relative in float64 and 5e-6 in float32, forward and "
          "gradients, gradcheck in float64, outputs NaN-poisoned before each kernel run; model golden parity "
          "1e-12 (reference) and through every fused backend. GPU: not yet measured on GPU.\n")
    return md, summary


def _by(results, provider, case=None):
    for r in results:
        if r.provider == provider and (case is None or r.case == case):
            return r
    return None


_pct = harness.fmt_pct


def _min_ratio(base, r) -> str:
    """Ratio of the fastest calls (less sensitive to background load than the medians)."""
    if base is None or not base.extra.get("min_s") or not r.extra.get("min_s"):
        return ""
    return f" (fastest calls: {harness.fmt_ratio(base.extra['min_s'] / r.extra['min_s'])})"


def read_graph(results) -> list[str]:
    """Sentences about the graph-building table, computed from the numbers."""
    out = []
    orig = _by(results, "original")
    full = [r for r in results if not r.note]
    less = [r for r in results if r.note]
    if orig is not None:
        for r in full:
            if r.provider == "original":
                continue
            out.append(
                f"`{r.provider}` builds the full graph at {harness.fmt_num(r.throughput)} structures/s, "
                f"{harness.fmt_ratio(r.ratios.get('original'))}{_min_ratio(orig, r)} the original "
                f"pipeline's {harness.fmt_num(orig.throughput)} structures/s."
            )
    if full:
        best = max(full, key=lambda r: r.throughput)
        out.append(f"Fastest full-graph provider here: `{best.provider}`.")
        for r in less:
            out.append(
                f"`{r.provider}` (radius only, no top-50 and no self-image edges, so less work) runs at "
                f"{harness.fmt_num(r.throughput)} structures/s, "
                f"{harness.fmt_ratio(r.throughput / best.throughput)} `{best.provider}`."
            )
    spreads = [r.median_s / r.extra["min_s"] for r in results if r.extra.get("min_s")]
    if spreads:
        out.append(
            f"Median / fastest call ranges {min(spreads):.2f}–{max(spreads):.2f} across providers: "
            "that spread is machine noise, not the code."
        )
    return out


def read_relax(results) -> list[str]:
    out = []
    for case in dict.fromkeys(r.case for r in results):
        model = case.split(" n=")[0]
        b, one = _by(results, "batched", case), _by(results, "one_at_a_time", case)
        g, m, gm = _by(results, "graph", case), _by(results, "model", case), _by(results, "graph+model", case)
        parts = []
        if b is not None and one is not None:
            parts.append(
                f"`relax_batch` batched: {harness.fmt_num(b.throughput)} structures/s "
                f"({harness.fmt_num(b.extra['atoms_per_s'])} atoms/s), "
                f"{harness.fmt_ratio(b.ratios.get('one_at_a_time'))}{_min_ratio(one, b)} one structure "
                f"at a time ({harness.fmt_num(one.throughput)} structures/s)"
            )
        if g is not None and m is not None:
            ref = b.median_s if b is not None else gm.median_s
            parts.append(
                f"graph building is {_pct(g.median_s, ref)} and the model forward "
                f"{_pct(m.median_s, ref)} of the batched time"
            )
        if b is not None and gm is not None:
            over = b.median_s - gm.median_s
            over_min = b.extra["min_s"] - gm.extra["min_s"]
            if over > 0:
                parts.append(
                    f"the rest (conversion, validation, output, and noise) is {harness.fmt_time(over)} "
                    f"({_pct(over, b.median_s)}) by medians, "
                    + (f"{harness.fmt_time(over_min)} ({_pct(over_min, b.extra['min_s'])})"
                       if over_min > 0 else "nothing measurable")
                    + " by fastest calls"
                )
            else:
                parts.append("graph + model timed separately add up to more than the end-to-end call (noise)")
        if parts:
            out.append(f"{model}: " + "; ".join(parts) + ".")
    return out


def read_scaling(results) -> list[str]:
    out = []
    names = list(dict.fromkeys(r.provider for r in results))
    for name in names:
        rs = [r for r in results if r.provider == name]
        big = max(rs, key=lambda r: int(r.case.split("N=")[1]))
        out.append(
            f"`{name}`: up to {big.case.split('N=')[1]} atoms, {harness.fmt_time(big.median_s)} there "
            f"({harness.fmt_num(big.throughput)} atoms/s)."
        )
    return out


def read_message_passing(results) -> list[str]:
    """One sentence per case: torch.compile against eager, and the eager rate in the cost model."""
    out = []
    for case in dict.fromkeys(r.case for r in results):
        eager, comp = _by(results, "eager", case), _by(results, "compile", case)
        if eager is None:
            continue
        text = (f"{case}: eager {harness.fmt_time(eager.median_s)} ({harness.fmt_num(eager.throughput)} "
                f"{eager.unit}, {eager.extra['gflops']:.3g} GFLOP/s, {eager.extra['gbps']:.3g} GB/s by the "
                f"unfused traffic model)")
        if comp is not None:
            text += (f"; `torch.compile` {harness.fmt_time(comp.median_s)}, "
                     f"{harness.fmt_ratio(comp.ratios.get('eager'))}{_min_ratio(eager, comp)} eager's speed")
        else:
            text += "; `torch.compile` not timed (see the table's notes)"
        out.append(text + ".")
    return out


def cpu_path_text() -> str:
    """Which small-crystal path the C++ `cpu` backend took on this machine."""
    from e3relax_fast import _ext

    if _ext._C is None:
        return "the C++ extension is not built here"
    if getattr(_ext._C, "CPU_AVX512", False):
        return "the `cpu` backend ran its AVX-512 path (this CPU has AVX-512 F/DQ/VL/BW)"
    return "the `cpu` backend ran its portable path (no AVX-512 on this CPU)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    cmd = "PYTHONPATH=. python bench/run_cpu.py" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv)
    )
    info = harness.machine()
    load_start = harness.load_average()
    t0 = time.perf_counter()
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"== {cmd}\n== {harness.machine_line(info)}; load {load_start}", flush=True)

    graph_md, graph_res = bench_radius_graph.run_mix(
        args.n_graph, repeats=args.repeats, verify_n=args.verify, info=info
    )
    graph2_md, graph2_res = "", []
    if args.graph_threads:
        harness.set_threads(args.graph_threads)
        graph2_md, graph2_res = bench_radius_graph.run_mix(
            args.n_graph, repeats=max(args.repeats, 5), providers=["original", "cpu", "cpu-portable", "vesin"],
            info=info,
        )
        harness.set_threads(args.threads)
    precision_md, precision_res = bench_precision.run(args.n_precision, "cpu", repeats=args.repeats, info=info)
    datagen_md, datagen_res = "", []
    if args.datagen_n:
        datagen_md, datagen_res = bench_datagen.run(args.datagen_n, info=info)
    scaling_md, scaling_res = "", []
    if args.scaling:
        scaling_md, scaling_res = bench_radius_graph.run_scaling(repeats=args.repeats, info=info)
    relax_md, relax_res = bench_relax_batch.run(
        args.n_relax, [bench_relax_batch._parse_size(s) for s in args.model_sizes],
        repeats=args.repeats, info=info,
    )
    mp_md, mp_res = "", []
    if args.message_passing:
        mp_args = bench_message_passing.parse_args(
            ["--quick", "--no-accuracy", "--device", "cpu", "--threads", str(threads)]
        )
        mp_md, mp_res = bench_message_passing.run(mp_args, info)
        lattice_md, _ = bench_lattice_message.run(200, [64, 512], "cpu", repeats=max(args.repeats, 5), info=info)
        mp_md += "\n" + lattice_md
    correctness_md, correctness_summary = kernel_correctness()
    print(f"== kernel correctness: {correctness_summary}", flush=True)
    load_end = harness.load_average()
    wall = time.perf_counter() - t0

    mix = mp_like.mp_like_mix(args.n_graph)
    bullets = lambda lines: "\n".join(f"- {x}" for x in lines) or "- (no results)"  # noqa: E731
    spread = [r.median_s / r.extra["min_s"] for r in graph_res + relax_res if r.extra.get("min_s")]
    if threads == 1:
        threads_text = (
            "torch (and vesin) ran on one thread (`--threads 1`, the default of this script): numbers "
            "are per core, directly comparable with the single-threaded pymatgen/matscipy/ASE, and "
            "robust to other jobs on this shared machine, where two torch threads per process were "
            "measured 5–10× *slower* than one on small batches (parallel regions stall on a "
            "descheduled thread). Rerun with `--threads 0` for torch's default."
        )
    else:
        threads_text = (
            f"torch (and vesin) ran on {threads} threads; pymatgen/matscipy/ASE are single-threaded. "
            "On a busy machine several torch threads per process can be far slower than one."
        )
    mp_reading = ""
    if mp_res:
        mp_reading = (
            "\nMessage passing, CPU (`bench/bench_message_passing.py --quick`: eager reference vs "
            "`torch.compile`, float32 forward, first 8 crystals of the mix):\n\n"
            + bullets(read_message_passing(mp_res)) + "\n"
        )
    graph2_reading = ""
    if graph2_res:
        graph2_reading = (
            f"\nGraph building again on {args.graph_threads} threads (our `cpu` backend and vesin; the original "
            f"pipeline is single-threaded), same mix; {cpu_path_text()}:\n\n" + bullets(read_graph(graph2_res)) + "\n"
        )
    datagen_reading = ""
    if datagen_res:
        base, fast = _by(datagen_res, "ase_fire"), _by(datagen_res, "batched_fire")
        datagen_reading = (
            f"\nPair generation (`bench/bench_datagen.py`, CHGNet, one core): batched FIRE "
            f"{fast.throughput:,.0f} pairs/hour, {harness.fmt_ratio(fast.ratios.get('ase_fire'))} ASE FIRE one "
            f"structure at a time ({base.throughput:,.0f} pairs/hour); {fast.extra['energy_agreement']}.\n"
        )
    precision_reading = ""
    if precision_res:
        f32, bf = _by(precision_res, "float32"), _by(precision_res, "bf16")
        precision_reading = (
            f"\nInference precision (`bench/bench_precision.py`, shipped model, CPU): float32 moves atoms by at most "
            f"{f32.extra['max_dpos']:.1e} Å from float64; bf16 autocast by at most {bf.extra['max_dpos']:.1e} Å (mean "
            f"{bf.extra['mean_dpos']:.1e} Å), coordinate MAE {bf.extra['coord_mae']:.4f} vs "
            f"{f32.extra['coord_mae']:.4f} Å in float32, at {harness.fmt_ratio(bf.ratios.get('float32'))} "
            "float32's speed. TF32: not yet measured on GPU.\n"
        )
    scaling_reading = ""
    if scaling_res:
        scaling_reading = "\nGraph scaling series (diamond supercells):\n\n" + bullets(read_scaling(scaling_res)) + "\n"
    report = f"""# e3relax-fast benchmark results (CPU)

Generated by `bench/run_cpu.py`; do not edit by hand — rerun the command instead.

- command: `cd <repo root> && {cmd}`
- date: {started} (took {wall / 60:.1f} min)
- machine: {harness.machine_line(info)}; {info['os']}
- load average (1/5/15 min): {load_start} at start, {load_end} at end
- inputs: the deterministic MP-like mix of `bench/mp_like.py` ({mp_like.describe(mix)}),
  seed 0; the relax benchmark uses its first {args.n_relax} crystals.

**Threads: {threads}.** {threads_text}

**Noise warning.** This machine is shared with other developers running tests; with
{info['cores']} cores, a load average above {info['cores']} means our timings were competing for the CPU.
Providers are timed in interleaved rounds so the load spreads over all of them, tables show the
median and (in brackets) the fastest call, and the median/fastest ratio here spans
{min(spread, default=1):.2f}–{max(spread, default=1):.2f}. Between whole runs a few minutes apart the same
measurement has differed by up to ~4× here (e.g. H=512 batched `relax_batch` 3.0 s in one run,
11.8 s in another), so compare ratios within one report rather than absolute numbers across
reports, and treat ratios within ~2× of 1 as ties unless they reproduce on a quiet machine.

## Reading

Graph building (radius 6 Å, top-50, 6 self-image edges):

{bullets(read_graph(graph_res))}
{graph2_reading}{datagen_reading}{precision_reading}
`relax_batch` (untrained seeded models, CPU, float32):

{bullets(read_relax(relax_res))}
{scaling_reading}{mp_reading}
## Tables

{graph_md}
{graph2_md}
{datagen_md}
{precision_md}
{scaling_md}
{relax_md}
{mp_md}
{correctness_md}
## GPU

GPU: not yet measured on GPU. This command hides CUDA and reports CPU numbers only; every table
above is CPU. On a machine with a GPU, `bash bench/gpu_check.sh` builds the extension, runs the GPU
tests and both GPU benchmarks in one go (results under `${{OUT:-bench/out/gpu}}`, summary in
`gpu_summary.md`): `bench/bench_radius_graph.py` adds `reference@cuda` and any registered `cuda` /
`triton` graph backends as extra providers, and `bench/bench_message_passing.py` times the message
op, one layer and the model with the `triton` (and any `cuda` / `cueq`) backends beside eager and
`torch.compile`, against the card's measured peak bandwidth and FLOP rate, plus the
float32/TF32/bf16 accuracy of the model output against float64. `bench/bench_relax_batch.py
--device cuda` times `relax_batch` there (`harness.measure` synchronises CUDA around every timed call).

## Caveats

- `original` is our reimplementation of the original pipeline's graph step from its description
  (pymatgen `get_neighbor_list(r=6, numerical_tol=0, exclude_self=True)` + per-centre Python
  top-50), not the authors' code. It keeps pymatgen's rounding artefact (the "49-slot effect",
  spec §3.2), hence its slightly smaller edge count; the check line above shows that, with that
  effect emulated through `reserved`, its edge sets equal the reference builder's.
- `vesin`, `matscipy` and `ase` only list neighbours within 6 Å (no top-50, no self-image edges):
  they do less work than the graph builders and are shown for scale only.
- Threads: the e3relax_fast backends and vesin use {threads} thread(s); pymatgen, matscipy and
  ASE are single-threaded whatever the setting.
- Format conversion (numpy → torch tensors / pymatgen `Structure` / ASE `Atoms`) is done once per
  provider before timing and is not included, except in `relax_batch` end to end.
- The models are untrained (`torch.manual_seed(0)`); speed does not depend on the weights.
- `relax_batch` one-at-a-time calls `relax_batch([s])` per structure, so it includes the
  per-call overhead a naive loop would pay.
- Message passing on CPU is the `--quick` form: 8 crystals, and `torch.compile` only until 45 s of
  compile time are spent (later cases show eager alone). Its FLOP and byte counts are the spec §14
  cost model, not measurements; GB/s is the eager-equivalent (unfused) traffic rate for both rows.
"""
    args.out.write_text(report)
    print(f"\nwrote {args.out} ({wall / 60:.1f} min); CSV rows in {harness.OUT_DIR}/", flush=True)


if __name__ == "__main__":
    main()
