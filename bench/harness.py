"""The one benchmark harness: machine description, timing, providers, results.

Conventions (every benchmark in ``bench/`` follows them):

* every provider gets the same inputs (built once, before timing);
* a provider's time is the **median** of ``repeats`` timed calls after ``warmup`` untimed ones
  (``torch.cuda.synchronize()`` around each call when CUDA is in use);
* ratios are ``baseline_time / provider_time`` (> 1 means faster than the baseline) against a
  baseline run in the **same process** on the same inputs;
* every result is one markdown table row and one CSV row (:mod:`bench.report`);
* a peer library is imported only if installed; a missing one is skipped with a printed reason.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


def parse_model_size(text: str) -> tuple[int, int]:
    """``"512x4"`` -> ``(hidden, layers) = (512, 4)``; ``"512"`` -> ``(512, 4)``."""
    h, _, l_ = text.lower().partition("x")
    return int(h), int(l_ or 4)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def sync() -> None:
    """Wait for queued CUDA work (kernels launch asynchronously), so a timer sees all of it."""
    if cuda_in_use():
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time (s) of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        sync()
        t0 = time.perf_counter()
        fns[name]()
        sync()
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


# --------------------------------------------------------------------------------------------
# Peaks of this machine (measured in the same run, the denominators of "% peak")
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 tensor-core matmuls on or off inside the block (restored after)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def measure_peaks(device) -> dict:
    """Peak bandwidth (GB/s; copy = read + write) and matmul FLOP rates (GFLOP/s) measured here."""
    import torch

    gpu = device.type == "cuda"
    peaks: dict = {}
    nbytes = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda dst=dst, src=src: dst.copy_(src), 10 if gpu else 5)
    peaks["copy_GBps"] = 2 * nbytes / t / 1e9
    peaks["copy_desc"] = f"copy of {nbytes >> 20} MiB, float32"
    del src, dst
    n = 8192 if gpu else 768
    kinds = [("fp32", torch.float32, False), ("fp64", torch.float64, False)]
    if gpu:
        kinds += [("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)]
    for name, dtype, allow in kinds:
        nn = n if (gpu or dtype != torch.float64) else n // 2
        a = torch.randn(nn, nn, device=device, dtype=dtype)
        bm = torch.randn(nn, nn, device=device, dtype=dtype)
        with tf32(allow):
            t = measure(lambda a=a, bm=bm: a @ bm, 5 if gpu else 3)
        peaks[f"{name}_GFLOPs"] = 2 * nn**3 / t / 1e9
        peaks[f"{name}_desc"] = f"{nn}³ matmul"
        del a, bm
    if gpu:
        torch.cuda.empty_cache()
    return peaks


def peak_flops_key(precision: str, dtype) -> str:
    """The key of :func:`measure_peaks` whose FLOP rate bounds arithmetic in ``precision`` / ``dtype``."""
    import torch

    if dtype == torch.float64:
        return "fp64_GFLOPs"
    return {"tf32": "tf32_GFLOPs", "tf32x3": "tf32_GFLOPs", "bf16": "bf16_GFLOPs"}.get(precision, "fp32_GFLOPs")


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
