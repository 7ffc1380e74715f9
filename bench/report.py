"""Result reporting: number formats, markdown tables and headers, the CSV log (``bench/out/<benchmark>.csv``,
appended, gitignored), and the assembly of ``bench/RESULTS.md`` from a CPU run (:mod:`bench.run_cpu`).

Every result is one markdown table row and one CSV row carrying the date and the machine.
"""

from __future__ import annotations

import csv
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from . import harness
from .harness import Result

OUT_DIR = Path(__file__).resolve().parent / "out"

CSV_FIELDS = (
    "date",
    "machine",
    "benchmark",
    "provider",
    "backend",
    "device",
    "case",
    "median_s",
    "throughput",
    "unit",
    "baseline",
    "ratio",
    "extra",
)


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------
def fmt_num(x: float | None) -> str:
    """Readable throughput: ``12.3 M``, ``45.6 k``, ``789``, ``1.23``."""
    if x is None or x != x:  # None or NaN
        return "–"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.3g} M"
    if ax >= 1e4:
        return f"{x / 1e3:.3g} k"
    if ax >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def fmt_ratio(x: float | None) -> str:
    """``0.031×``, ``1.93×``, ``18.4×``, ``342×``."""
    if x is None or x != x:
        return "–"
    if x >= 100:
        return f"{x:,.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    if x >= 0.1:
        return f"{x:.2f}×"
    return f"{x:.2g}×"


def fmt_pct(part: float, whole: float) -> str:
    """``part / whole`` as ``87 %``, ``4.2 %``, ``0.3 %`` or ``< 0.1 %``."""
    x = 100 * part / whole
    return f"{x:.0f} %" if x >= 10 else f"{x:.1f} %" if x >= 0.1 else "< 0.1 %"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_csv(
    results: list[Result], name: str, baseline: str | None = None, info: dict | None = None
) -> Path:
    """Append one row per result to ``bench/out/<name>.csv`` (header written when new).

    ``baseline`` picks which of ``r.ratios`` fills the ``ratio`` column; the others go to
    ``extra`` as ``ratio_vs_<name>``.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.csv"
    new = not path.exists()
    date = _dt.datetime.now().isoformat(timespec="seconds")
    mline = harness.machine_line(info)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in results:
            extra = dict(r.extra)
            for b, v in r.ratios.items():
                if b != baseline:
                    extra[f"ratio_vs_{b}"] = round(v, 4)
            if r.note:
                extra["note"] = r.note
            w.writerow(
                {
                    "date": date,
                    "machine": mline,
                    "benchmark": r.benchmark,
                    "provider": r.provider,
                    "backend": r.backend,
                    "device": r.device,
                    "case": r.case,
                    "median_s": f"{r.median_s:.6g}",
                    "throughput": f"{r.throughput:.6g}",
                    "unit": r.unit,
                    "baseline": baseline or "",
                    "ratio": f"{r.ratios[baseline]:.4g}" if baseline in r.ratios else "",
                    "extra": ";".join(f"{k}={v}" for k, v in extra.items()),
                }
            )
    return path


# Sections of RESULTS.md written by their own commands (python -m bench.static_report, python -m
# bench.bench_original --write): each between "<!-- name -->" and "<!-- /name -->", kept when
# bench.run_cpu rewrites the rest of the file.
KEPT_SECTIONS = ("original-pipeline", "static-report", "train-step")


def splice_section(text: str, name: str, section: str) -> str:
    """``text`` with the part between ``<!-- name -->`` and ``<!-- /name -->`` replaced by ``section``
    (appended, with the markers, when they are absent)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        return text[:start] + block + text[stop + len(end):]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def section(text: str, name: str) -> str | None:
    """The body between ``<!-- name -->`` and ``<!-- /name -->`` in ``text``, or None."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    start, stop = text.find(begin), text.find(end)
    return text[start + len(begin):stop].strip() if start != -1 and stop > start else None


def header_md(title: str, command: str, info: dict | None = None) -> str:
    m = info or harness.machine()
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"## {title}\n\n- command: `{command}`\n- date: {date}\n- machine: {harness.machine_line(m)}\n"
        f"- OS: {m['os']}\n- load average (1/5/15 min) at start: {harness.load_average()}\n"
    )


# --------------------------------------------------------------------------------------------
# RESULTS.md: the kernel-correctness table
# --------------------------------------------------------------------------------------------
def correctness_md(per_file: dict[str, list], what: dict[str, str], returncode: int) -> tuple[str, str]:
    """The kernel test files' outcome as markdown. ``per_file[f] = [passed, skipped, failed, seconds,
    skip reasons]``; ``what[f]`` describes the file. Returns ``(markdown, one-line summary)``."""
    rows = [[f"`{f}`", what[f], p, sk, fl, f"{t:.0f} s", "; ".join(sorted(r))]
            for f, (p, sk, fl, t, r) in per_file.items()]
    total = [sum(r[k] for r in per_file.values()) for k in range(3)]
    summary = (f"{total[0]} passed, {total[1]} skipped, {total[2]} failed "
               f"(pytest exit code {returncode})")
    md = ("## Kernel correctness on this machine (CPU, Triton interpreter)\n\n"
          f"- command: `TRITON_INTERPRET=1 python -m pytest -q {' '.join(per_file)}`\n- result: {summary}\n\n"
          + markdown_table(["file", "what", "passed", "skipped", "failed", "time", "skip reasons"], rows)
          + "\n\nTolerances (asserted in the files): neighbour lists exact (integers equal after the canonical "
          "order); fused ops vs the float64 reference 1e-10 relative in float64 and 5e-6 in float32, forward and "
          "gradients, gradcheck in float64, outputs NaN-poisoned before each kernel run; model golden parity "
          "1e-12 (reference) and through every fused backend. GPU: not yet measured on GPU.\n")
    return md, summary


# --------------------------------------------------------------------------------------------
# RESULTS.md: sentences computed from the numbers
# --------------------------------------------------------------------------------------------
def _by(results, provider, case=None):
    for r in results:
        if r.provider == provider and (case is None or r.case == case):
            return r
    return None


def _min_ratio(base, r) -> str:
    """Ratio of the fastest calls (less sensitive to background load than the medians)."""
    if base is None or not base.extra.get("min_s") or not r.extra.get("min_s"):
        return ""
    return f" (fastest calls: {fmt_ratio(base.extra['min_s'] / r.extra['min_s'])})"


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
                f"`{r.provider}` builds the full graph at {fmt_num(r.throughput)} structures/s, "
                f"{fmt_ratio(r.ratios.get('original'))}{_min_ratio(orig, r)} the original "
                f"pipeline's {fmt_num(orig.throughput)} structures/s."
            )
    if full:
        best = max(full, key=lambda r: r.throughput)
        out.append(f"Fastest full-graph provider here: `{best.provider}`.")
        for r in less:
            out.append(
                f"`{r.provider}` (radius only, no top-50 and no self-image edges, so less work) runs at "
                f"{fmt_num(r.throughput)} structures/s, "
                f"{fmt_ratio(r.throughput / best.throughput)} `{best.provider}`."
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
                f"`relax_batch` batched: {fmt_num(b.throughput)} structures/s "
                f"({fmt_num(b.extra['atoms_per_s'])} atoms/s), "
                f"{fmt_ratio(b.ratios.get('one_at_a_time'))}{_min_ratio(one, b)} one structure "
                f"at a time ({fmt_num(one.throughput)} structures/s)"
            )
        if g is not None and m is not None:
            ref = b.median_s if b is not None else gm.median_s
            parts.append(
                f"graph building is {fmt_pct(g.median_s, ref)} and the model forward "
                f"{fmt_pct(m.median_s, ref)} of the batched time"
            )
        if b is not None and gm is not None:
            over = b.median_s - gm.median_s
            over_min = b.extra["min_s"] - gm.extra["min_s"]
            if over > 0:
                parts.append(
                    f"the rest (conversion, validation, output, and noise) is {fmt_time(over)} "
                    f"({fmt_pct(over, b.median_s)}) by medians, "
                    + (f"{fmt_time(over_min)} ({fmt_pct(over_min, b.extra['min_s'])})"
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
            f"`{name}`: up to {big.case.split('N=')[1]} atoms, {fmt_time(big.median_s)} there "
            f"({fmt_num(big.throughput)} atoms/s)."
        )
    return out


def read_message_passing(results) -> list[str]:
    """One sentence per case: torch.compile against eager, and the eager rate in the cost model."""
    out = []
    for case in dict.fromkeys(r.case for r in results):
        eager, comp = _by(results, "eager", case), _by(results, "compile", case)
        if eager is None:
            continue
        text = (f"{case}: eager {fmt_time(eager.median_s)} ({fmt_num(eager.throughput)} "
                f"{eager.unit}, {eager.extra['gflops']:.3g} GFLOP/s, {eager.extra['gbps']:.3g} GB/s by the "
                f"unfused traffic model)")
        if comp is not None:
            text += (f"; `torch.compile` {fmt_time(comp.median_s)}, "
                     f"{fmt_ratio(comp.ratios.get('eager'))}{_min_ratio(eager, comp)} eager's speed")
        else:
            text += "; `torch.compile` not timed (see the table's notes)"
        out.append(text + ".")
    return out


def cpu_path_text() -> str:
    """Which small-crystal path the C++ `cpu` backend took on this machine."""
    from e3relax_fast.ops import compiled

    if compiled._C is None:
        return "the C++ extension is not built here"
    if getattr(compiled._C, "CPU_AVX512", False):
        return "the `cpu` backend ran its AVX-512 path (this CPU has AVX-512 F/DQ/VL/BW)"
    return "the `cpu` backend ran its portable path (no AVX-512 on this CPU)"


# --------------------------------------------------------------------------------------------
# RESULTS.md: the whole report
# --------------------------------------------------------------------------------------------
Section = tuple[str, list[Result]]  # (markdown, results) as every benchmark's run() returns them
NOT_RUN: Section = ("", [])


@dataclass
class CpuRun:
    """What one :mod:`bench.run_cpu` run measured, and under which conditions."""

    command: str
    started: str  # date and time of the start
    wall_s: float
    info: dict  # harness.machine()
    load_start: str
    load_end: str
    inputs: str  # describe() of the graph benchmark's MP-like mix
    n_relax: int
    threads: int
    graph_threads: int
    graph: Section
    relax: Section
    correctness_md: str
    graph2: Section = NOT_RUN  # the graph mix again on graph_threads threads
    precision: Section = NOT_RUN
    datagen: Section = NOT_RUN
    scaling: Section = NOT_RUN
    message_passing: Section = NOT_RUN  # its markdown includes the atom–lattice table


def results_md(run: CpuRun) -> str:
    """``bench/RESULTS.md``: header, readings computed from the numbers, every table, caveats."""
    info, threads = run.info, run.threads
    graph_res, relax_res = run.graph[1], run.relax[1]
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
    if run.message_passing[1]:
        mp_reading = (
            "\nMessage passing, CPU (`python -m bench.bench_message_passing --quick`: eager reference vs "
            "`torch.compile`, float32 forward, first 8 crystals of the mix):\n\n"
            + bullets(read_message_passing(run.message_passing[1])) + "\n"
        )
    graph2_reading = ""
    if run.graph2[1]:
        graph2_reading = (
            f"\nGraph building again on {run.graph_threads} threads (our `cpu` backend and vesin; the original "
            f"pipeline is single-threaded), same mix; {cpu_path_text()}:\n\n" + bullets(read_graph(run.graph2[1]))
            + "\n"
        )
    datagen_reading = ""
    if run.datagen[1]:
        base, fast = _by(run.datagen[1], "ase_fire"), _by(run.datagen[1], "batched_fire")
        datagen_reading = (
            f"\nPair generation (`python -m bench.bench_datagen`, CHGNet, one core): batched FIRE "
            f"{fast.throughput:,.0f} pairs/hour, {fmt_ratio(fast.ratios.get('ase_fire'))} ASE FIRE one "
            f"structure at a time ({base.throughput:,.0f} pairs/hour); {fast.extra['energy_agreement']}.\n"
        )
    precision_reading = ""
    if run.precision[1]:
        f32, bf = _by(run.precision[1], "float32"), _by(run.precision[1], "bf16")
        precision_reading = (
            f"\nInference precision (`python -m bench.bench_precision`, shipped model, CPU): float32 moves atoms by "
            f"at most {f32.extra['max_dpos']:.1e} Å from float64; bf16 autocast by at most "
            f"{bf.extra['max_dpos']:.1e} Å (mean {bf.extra['mean_dpos']:.1e} Å), coordinate MAE "
            f"{bf.extra['coord_mae']:.4f} vs {f32.extra['coord_mae']:.4f} Å in float32, at "
            f"{fmt_ratio(bf.ratios.get('float32'))} float32's speed. TF32: not yet measured on GPU.\n"
        )
    scaling_reading = ""
    if run.scaling[1]:
        scaling_reading = ("\nGraph scaling series (diamond supercells):\n\n" + bullets(read_scaling(run.scaling[1]))
                           + "\n")
    return f"""# e3relax-fast benchmark results (CPU)

Generated by `python -m bench.run_cpu`; do not edit by hand — rerun the command instead.

- command: `cd <repo root> && {run.command}`
- date: {run.started} (took {run.wall_s / 60:.1f} min)
- machine: {harness.machine_line(info)}; {info['os']}
- load average (1/5/15 min): {run.load_start} at start, {run.load_end} at end
- inputs: the deterministic MP-like mix of `bench/inputs.py` ({run.inputs}),
  seed 0; the relax benchmark uses its first {run.n_relax} crystals.

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

{run.graph[0]}
{run.graph2[0]}
{run.datagen[0]}
{run.precision[0]}
{run.scaling[0]}
{run.relax[0]}
{run.message_passing[0]}
{run.correctness_md}
## GPU

GPU: not yet measured on GPU. This command hides CUDA and reports CPU numbers only; every table
above is CPU. On a machine with a GPU, `bash bench/gpu_check.sh` builds the extension, runs the GPU
tests and both GPU benchmarks in one go (results under `${{OUT:-bench/out/gpu}}`, summary in
`gpu_summary.md`): `bench.bench_radius_graph` adds `reference@cuda` and any registered `cuda` /
`triton` graph backends as extra providers, and `bench.bench_message_passing` times the message
op, one layer and the model with the `triton` (and any `cuda` / `cueq`) backends beside eager and
`torch.compile`, against the card's measured peak bandwidth and FLOP rate, plus the
float32/TF32/bf16 accuracy of the model output against float64. `python -m bench.bench_relax_batch
--device cuda` times `relax_batch` there (`bench/harness.py` synchronises CUDA around every timed call).

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
  cost model (`bench/cost_model.py`), not measurements; GB/s is the eager-equivalent (unfused) traffic
  rate for both rows.
"""
