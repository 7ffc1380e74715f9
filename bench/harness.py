"""The one benchmark harness: machine description, timing, providers, result tables.

Conventions (every benchmark in ``bench/`` follows them):

* every provider gets the same inputs (built once, before timing);
* a provider's time is the **median** of ``repeats`` timed calls after ``warmup`` untimed ones
  (``torch.cuda.synchronize()`` around each call when CUDA is in use);
* ratios are ``baseline_time / provider_time`` (> 1 means faster than the baseline) against a
  baseline run in the **same process** on the same inputs;
* every result is one markdown table row and one CSV row (``bench/out/<benchmark>.csv``,
  appended, gitignored) carrying the date and the machine;
* a peer library is imported only if installed; a missing one is skipped with a printed reason.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# Machine
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def set_threads(n: int) -> int:
    """Set torch's intra-op threads to ``n`` (``0``: leave torch's default); return the count in use.

    On a shared, oversubscribed machine, several torch threads per process can be many times
    slower than one (each parallel region waits for a descheduled thread), so the benchmark
    scripts take ``--threads``; one thread also matches the single-threaded peers."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def load_average() -> str:
    """1/5/15-minute load averages (the machine may be shared: other jobs distort timings)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def cuda_in_use() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def machine() -> dict[str, Any]:
    """Facts about this machine and software stack."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
        info["torch_threads"] = None
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """Short one-line description, used in the CSV ``machine`` column and report headers."""
    m = info or machine()
    t = m["torch_threads"]
    s = f"{m['cpu']} ({m['cores']} cores), torch {m['torch']} ({t} thread{'' if t == 1 else 's'}), "
    s += f"Python {m['python']}"
    return s + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _sync() -> None:
    if cuda_in_use():
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time (s) of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    return statistics.median(measure_all(fn, repeats, warmup))


def measure_all(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Like :func:`measure` but returns every timed call (for spread reporting)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def optional_import(module: str) -> tuple[Any | None, str | None]:
    """``(module, None)`` if importable, else ``(None, reason)``."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed here"
        return None, f"{module} not importable ({type(exc).__name__}: {exc})"


@dataclass
class Provider:
    """One implementation under test.

    ``prepare(inputs) -> state`` runs untimed (format conversion); ``run(state) -> result`` is
    what gets timed. ``less_work`` says what the provider skips compared with the full task
    (shown in the tables), ``None`` if it does all of it.
    """

    name: str
    backend: str
    device: str
    prepare: Callable[[Any], Any]
    run: Callable[[Any], Any]
    less_work: str | None = None
    threads: str = ""


@dataclass
class Registry:
    """Providers in registration order, plus the ones skipped (with reasons)."""

    providers: list[Provider] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, provider: Provider) -> None:
        self.providers.append(provider)

    def skip(self, name: str, reason: str) -> None:
        print(f"[skip] {name}: {reason}", flush=True)
        self.skipped.append((name, reason))

    def add_if(self, name: str, module: str, factory: Callable[[Any], Provider | list[Provider]]) -> None:
        """Add ``factory(imported_module)`` if ``module`` imports, else record a skip."""
        mod, reason = optional_import(module)
        if mod is None:
            self.skip(name, reason or "not installed")
            return
        made = factory(mod)
        for p in made if isinstance(made, list) else [made]:
            self.add(p)

    def select(self, names: list[str] | None) -> list[Provider]:
        if not names:
            return list(self.providers)
        return [p for p in self.providers if p.name in names]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    benchmark: str
    provider: str
    backend: str
    device: str
    case: str
    median_s: float
    throughput: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # baseline name -> baseline_s / median_s
    note: str = ""


def add_ratios(
    results: list[Result], baselines: list[str], key: Callable[[Result], Any] = lambda r: r.case
) -> None:
    """Fill ``r.ratios[b] = median_s(b) / r.median_s`` for each baseline ``b`` sharing ``key``."""
    for b in baselines:
        base = {key(r): r.median_s for r in results if r.provider == b}
        for r in results:
            k = key(r)
            if k in base and r.median_s > 0:
                r.ratios[b] = base[k] / r.median_s


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
    mline = machine_line(info)
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


def header_md(title: str, command: str, info: dict | None = None) -> str:
    m = info or machine()
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"## {title}\n\n- command: `{command}`\n- date: {date}\n- machine: {machine_line(m)}\n"
        f"- OS: {m['os']}\n- load average (1/5/15 min) at start: {load_average()}\n"
    )


def measure_adaptive(
    fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, long_s: float = 5.0
) -> tuple[float, int]:
    """Median time like :func:`measure`, but if the first (warm-up) call already took more than
    ``long_s`` seconds, that call is the only measurement. Returns ``(seconds, timed_calls)``."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    if first > long_s:
        return first, 1
    for _ in range(warmup - 1):
        fn()
    return measure(fn, repeats=repeats, warmup=0), max(1, repeats)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1, long_s: float | None = 5.0
) -> dict[str, list[float]]:
    """Time several providers in interleaved rounds; returns every timed call per name.

    On a shared machine, background load comes and goes; running the providers round-robin
    (the order rotated each round) spreads it over all of them instead of penalising whichever
    ran at a bad moment. Each round calls every provider once. The first call of each provider
    is a timed warm-up: if it took more than ``long_s`` seconds it is that provider's only
    measurement (it then sits out the remaining rounds); otherwise it is discarded, ``warmup - 1``
    further untimed rounds follow, then ``repeats`` timed rounds. Use ``statistics.median``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    done: set[str] = set()

    def timed(name: str) -> float:
        _sync()
        t0 = time.perf_counter()
        fns[name]()
        _sync()
        return time.perf_counter() - t0

    for name in names:
        first = timed(name)
        if long_s is not None and first > long_s:
            times[name].append(first)
            done.add(name)
    for _ in range(max(0, warmup - 1)):
        for name in names:
            if name not in done:
                fns[name]()
    for r in range(max(1, repeats)):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            if name not in done:
                times[name].append(timed(name))
    return times


def chunks_by_atoms(triples, max_atoms: int):
    """Consecutive groups of ``(z, positions, cell)`` triples with at most ``max_atoms`` atoms each
    (a larger crystal forms a group of its own)."""
    chunk, atoms = [], 0
    for t in triples:
        if chunk and atoms + len(t[0]) > max_atoms:
            yield chunk
            chunk, atoms = [], 0
        chunk.append(t)
        atoms += len(t[0])
    if chunk:
        yield chunk
