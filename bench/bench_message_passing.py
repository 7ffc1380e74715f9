"""Benchmark: the atom–atom message op, one whole layer and the whole model (spec §6 Step B, §14).

Three parts, each at the paper size (H=512, L=4) and the shipped size (H=64, L=4), on the first
``--n`` crystals of the MP-like mix (default 160 on GPU, 8 with ``--quick``) with their E3Relax
graph (6 Å, top-50 + 6 self-image edges), forward only under ``torch.inference_mode()``:

* ``op`` — ``message_passing(x_proj, vec, positions, cells, edges..., W, b, centres, ...)`` alone,
  on receiver-sorted CSR edges as the model passes them (x_proj from a seeded ``x_proj`` MLP of
  uniform "embeddings", vec ~ N(0, 0.1²));
* ``layer`` — ``E3Relax(H, num_layers=1)`` forward with the graph given (embedding, the CSR
  set-up, steps 0, A–F of one layer);
* ``model`` — ``E3Relax(H, num_layers=L)`` forward with the graph given.

Providers (one markdown row and one CSV row each):

* ``eager`` — the pure-PyTorch reference (``backend="reference"``); the baseline of the ratios;
* ``compile`` — ``torch.compile`` of the same (the reference op function, or the whole reference
  model; ``dynamic=False``); skipped with the reason if compiling fails, and skipped once the
  compile time spent exceeds ``--compile-budget-s``;
* ``triton`` (op also ``triton-tf32x3``, ``triton-tf32`` in float32) — the fused Triton kernels
  (``backend="triton"``), **only on a CUDA device**: the Triton CPU interpreter is never timed
  (``--interpreter-check`` runs it once, untimed, for the parity column only);
* ``cuda``, ``cueq`` — when ``e3relax_fast.ops.available(ops.MESSAGE_PASSING)`` lists them;
* ``cpu`` — the fused C++ inference backend (CPU only; layer and model: both gated message ops),
  its radial projection on the basis's window (15 of 128 centres), and ``cpu-exact`` — the same
  with the projection on every centre.

Every provider's first call is checked against ``eager`` (max |Δ| column: op, largest output
difference / largest output; layer and model, final positions in Å).

Each row carries the spec §14 cost model (:mod:`bench.cost_model`: FLOP and DRAM bytes of the op,
a layer and the model; unfused traffic for ``eager`` and ``compile``, compulsory traffic for the
fused kernels). The FLOP are those each provider executes: ``cpu`` evaluates the radial projections
on the window's centres only, so its rows count the window (R = 15) where the others count 128.

On CPU with the ``cpu`` backend, the op part also reports the window's accuracy in float64 (max
error relative to the largest output, against the exact reference): the windowed and the exact
mode of ``cpu``, and the windowed projection W e(d) + b alone over 0-31 Å.

GFLOP/s and GB/s are these counts over the median time. The run first measures the machine's
peaks: on a GPU bandwidth by a 1 GiB device-to-device copy (read + write), FLOP rates by 8192³
matmuls in float32 (TF32 off), TF32, bf16 and float64; on CPU the same at small sizes (64 MiB,
768³) with the run's threads. The "% peak FLOP" column (the roofline: how far the arithmetic is
from what a matmul reaches here) uses the peak of the provider's arithmetic (float32 IEEE, TF32,
float64). With a GPU (or ``--accuracy``) it also reports the model's accuracy: max |Δ| of
the final positions and cells against the float64 reference, for float32, TF32 matmuls, bf16
autocast and every kernel backend (run before the timings, on the first min(--n, 64) crystals, so
that a run cut short by a time limit keeps it; ``--md`` is rewritten after every step).

    python -m bench.bench_message_passing --quick        # CPU, < 2 min
    python -m bench.bench_message_passing                # GPU: all parts, 160 crystals
    python -m bench.bench_message_passing --parts op --sizes 512x4 --md out.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import harness, report
from .cost_model import cost
from .inputs import describe, mp_like_mix

BENCH = "message_passing"
RADIUS, MAX_NEIGHBORS = 6.0, 50
WINDOW_CENTRES = 15  # centres of the radial window of backend cpu (reference/radial_window.py, K = 7)
PARTS = ("op", "layer", "model")
INTERPRETER_MAX_H = 64  # --interpreter-check: larger hidden sizes take too long on the CPU interpreter


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    batch: object  # e3relax_fast.Batch with its graph, on the device, in the working dtype
    n_atoms: int
    n_edges: int
    n_graphs: int
    describe: str


def make_inputs(n: int, dtype, device) -> Inputs:
    import torch

    import e3relax_fast as e3r

    triples = mp_like_mix(n)
    batch = e3r.Batch.from_arrays(triples, dtype=torch.float64).to(device)
    try:  # graph from float64, as relax_batch builds it
        batch = batch.with_graph(RADIUS, MAX_NEIGHBORS).to(dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - a broken accelerated graph backend must not stop the benchmark
        print(f"[{BENCH}] build_graph(backend='auto') failed ({_short(exc)}); using the reference", flush=True)
        batch = batch.with_graph(RADIUS, MAX_NEIGHBORS, backend="reference").to(dtype=dtype)
    e = int(batch.edge_index.shape[1])
    return Inputs(batch, batch.num_atoms, e, batch.num_graphs,
                  f"{describe(triples)}; {e:,} edges ({e / batch.num_atoms:.1f} per atom)")


def op_arguments(inputs: Inputs, h: int, seed: int = 0) -> tuple[tuple, dict]:
    """Positional arguments and keywords of ``message_passing`` for hidden size ``h``."""
    import torch

    from e3relax_fast.batch import graph_index_from_ptr
    from e3relax_fast.model.layers import MessagePassingLayer, RadialBasis

    b = inputs.batch
    dtype, device = b.positions.dtype, b.positions.device
    torch.manual_seed(seed)
    rbf = RadialBasis(128, 30.0).to(device=device, dtype=dtype)
    mp = MessagePassingLayer(h, 128).to(device=device, dtype=dtype)
    s = (torch.rand(inputs.n_atoms, h, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
         * 2 - 1) * math.sqrt(3)
    vec = torch.randn(inputs.n_atoms, 3, h, generator=torch.Generator().manual_seed(seed + 2),
                      dtype=torch.float64) * 0.1
    s, vec = s.to(device=device, dtype=dtype), vec.to(device=device, dtype=dtype)
    with torch.no_grad():
        x_proj = mp.x_proj(s)
    graph_index = graph_index_from_ptr(b.ptr, inputs.n_atoms)
    order = torch.argsort(b.edge_index[1], stable=True)
    edge_index, offsets = b.edge_index[:, order].contiguous(), b.cell_offsets[order].contiguous()
    edge_graph = graph_index[edge_index[1]]
    rowptr = torch.searchsorted(edge_index[1], torch.arange(inputs.n_atoms + 1, device=device))
    args = (x_proj, vec, b.positions, b.cells, edge_index, offsets, edge_graph,
            mp.edge_proj.weight.detach(), mp.edge_proj.bias.detach(), rbf.rbf.offset, rbf.rbf.coeff, rbf.cutoff)
    return args, {"rowptr": rowptr}


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
@dataclass
class Prov:
    name: str
    backend: str
    precision: str  # "ieee" (the dtype's own arithmetic), "tf32", "tf32x3"
    fused: bool
    make: object  # () -> callable; may raise (the provider is then skipped with the reason)
    compiled: bool = False
    timed: bool = True  # False: parity only (Triton interpreter)
    radial_centres: int = 128  # centres each radial projection is evaluated on (the cost model's R)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _kernel_backends(device, interpreter_check: bool, h: int = 0) -> tuple[list[tuple[str, bool]],
                                                                          list[tuple[str, str]]]:
    """``[(backend, timed)]`` of the registered kernel backends usable here, and skips."""
    from e3relax_fast import ops

    names = [b for b in ops.available(ops.MESSAGE_PASSING) if b != "reference"]
    usable, skipped = [], []
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for name in names:
        devices = ops.OPS[ops.MESSAGE_PASSING].impls[name].devices()
        if device.type not in devices:
            skipped.append((name, f"takes {', '.join(sorted(devices))} tensors only"))
        elif device.type == "cuda" or name == "cpu":
            usable.append((name, True))
        elif name == "triton" and interp and interpreter_check and h <= INTERPRETER_MAX_H:
            usable.append((name, False))
        elif name == "triton" and interp and interpreter_check:
            skipped.append((name, f"Triton interpreter parity check only up to H={INTERPRETER_MAX_H} (too slow)"))
        else:
            why = ("the Triton CPU interpreter is never timed (--interpreter-check runs it once, untimed, "
                   "for the parity column)" if name == "triton" else
                   "GPU backends are timed on CUDA devices only (on CPU: eager, compile and cpu)")
            skipped.append((name, why))
    for name in ("cpu", "triton", "cuda", "cueq"):
        if name not in names:
            try:
                ops.resolve(ops.MESSAGE_PASSING, name, device.type)
                why = "not registered here"
            except ops.BackendUnavailableError as exc:
                why = str(exc).split(": ", 1)[-1].split(". Available")[0]
            skipped.append((name, f"not registered: {why}"))
    return usable, skipped


def op_providers(device, dtype, interpreter_check: bool, h: int) -> tuple[list[Prov], list[tuple[str, str]]]:
    import torch

    from e3relax_fast import ops
    from e3relax_fast.reference.message_passing import message_passing as reference

    provs = [Prov("eager", "reference", "ieee", False, lambda: reference),
             Prov("compile", "reference", "ieee", False,
                  lambda: torch.compile(reference, dynamic=False), compiled=True)]
    usable, skipped = _kernel_backends(device, interpreter_check, h)
    for name, timed in usable:
        fn = ops.resolve(ops.MESSAGE_PASSING, name, device.type)[1]
        if name == "cpu":
            provs.append(Prov(name, name, "ieee", True, lambda fn=fn: fn, radial_centres=WINDOW_CENTRES))
            provs.append(Prov("cpu-exact", name, "ieee", True, lambda fn=fn: functools.partial(fn, radial="exact")))
            continue
        provs.append(Prov(name, name, "ieee", True, lambda fn=fn: fn, timed=timed))
        if name == "triton" and dtype == torch.float32 and timed:
            from e3relax_fast.kernels.message_passing import KernelConfig

            for prec in ("tf32x3", "tf32"):
                provs.append(Prov(f"triton-{prec}", name, prec, True,
                                  lambda fn=fn, prec=prec: functools.partial(
                                      fn, config=KernelConfig(input_precision=prec))))
    return provs, skipped


def model_providers(device, interpreter_check: bool, h: int) -> tuple[list[Prov], list[tuple[str, str]]]:
    provs = [Prov("eager", "reference", "ieee", False, None),
             Prov("compile", "reference", "ieee", False, None, compiled=True)]
    usable, skipped = _kernel_backends(device, interpreter_check, h)
    for name, timed in usable:
        if name == "cpu":
            provs += [Prov(name, name, "ieee", True, None, radial_centres=WINDOW_CENTRES),
                      Prov("cpu-exact", name, "ieee", True, None)]
        else:
            provs.append(Prov(name, name, "ieee", True, None, timed=timed))
    return provs, skipped


def exact_radial(model):
    """``model`` with backend ``cpu``, both of whose ops evaluate the radial projection exactly."""
    from e3relax_fast import ops

    m = _with_backend(model, "cpu")
    mp, lm = (ops.OPS[op].load("cpu") for op in (ops.MESSAGE_PASSING, ops.LATTICE_MESSAGE))

    def call(batch):
        with registered(ops.MESSAGE_PASSING, "cpu", functools.partial(mp, radial="exact")), \
                registered(ops.LATTICE_MESSAGE, "cpu", functools.partial(lm, radial="exact")):
            return m(batch)

    return call


# --------------------------------------------------------------------------------------------
# One case: a part at one size; all providers timed interleaved
# --------------------------------------------------------------------------------------------
def _max_rel(out, ref) -> float:
    num = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(out, ref, strict=True))
    den = max(float(b.abs().max()) if b.numel() else 0.0 for b in ref)
    return num / den if den > 0 else num


def run_case(part: str, h: int, layers: int, inputs: Inputs, device, dtype, *, repeats: int, warmup: int,
             compile_state: dict, interpreter_check: bool, peaks: dict | None):
    """Returns ``(results, skipped)`` for one part at one size."""
    import torch

    from e3relax_fast.model import E3Relax

    case = f"{part} H={h}" + (f" L={layers}" if part == "model" else "")
    b = 8 if dtype == torch.float64 else 4
    skipped: list[tuple[str, str, str]] = []  # (case, provider, reason)
    torch._dynamo.reset()
    if part == "op":
        args, kwargs = op_arguments(inputs, h)
        provs, skips = op_providers(device, dtype, interpreter_check, h)

        def runner(fn):
            return lambda: fn(*args, **kwargs)

        def parity(out, ref):
            return _max_rel(out, ref), "rel"
    else:
        nl = 1 if part == "layer" else layers
        torch.manual_seed(0)
        model = E3Relax(h, nl, backend="reference").to(device=device, dtype=dtype).eval()
        provs, skips = model_providers(device, interpreter_check, h)
        for p in provs:
            if p.compiled:
                p.make = lambda: torch.compile(model, dynamic=False)
            elif p.name == "cpu-exact":
                p.make = functools.partial(exact_radial, model)
            else:
                p.make = functools.partial(_with_backend, model, p.backend)

        def runner(fn):
            return lambda: fn(inputs.batch)

        def parity(out, ref):
            return float((out.positions[-1] - ref.positions[-1]).abs().max()), "Å"

    skipped += [(case, n, why) for n, why in skips]
    fns, outputs, meta = {}, {}, {}
    ref_out = None
    with torch.inference_mode():
        for p in provs:
            if p.compiled and compile_state["spent_s"] >= compile_state["budget_s"]:
                why = (f"compile budget spent ({compile_state['spent_s']:.0f} s of "
                       f"{compile_state['budget_s']:.0f} s; --compile-budget-s)")
                skipped.append((case, p.name, why))
                print(f"[skip] {case} {p.name}: {why}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                fn = runner(p.make())
                out = fn()
                harness.sync()
            except Exception as exc:  # noqa: BLE001 - a provider that cannot run is skipped, with the reason
                why = _short(exc)
                if os.environ.get("E3RELAX_BENCH_DEBUG"):
                    traceback.print_exc()
                skipped.append((case, p.name, why))
                print(f"[skip] {case} {p.name}: {why}", flush=True)
                continue
            finally:
                if p.compiled:
                    compile_state["spent_s"] += time.perf_counter() - t0
            first_s = time.perf_counter() - t0
            if p.name == "eager":
                ref_out = out
            outputs[p.name] = out
            meta[p.name] = {"first_call_s": first_s}
            if ref_out is not None:
                meta[p.name]["parity"] = parity(out, ref_out)
            if p.timed:
                fns[p.name] = fn
            else:
                d, unit = meta[p.name].get("parity", (float("nan"), ""))
                why = (f"Triton interpreter: run once for parity (max |Δ| vs eager {d:.1e}"
                       f"{' Å' if unit == 'Å' else ' rel.'}), not timed")
                skipped.append((case, p.name, why))
            if p.compiled:
                print(f"[{BENCH}] {case} {p.name}: first call (compile) {first_s:.1f} s", flush=True)
        del outputs
        print(f"[{BENCH}] {case}: timing {', '.join(fns)} interleaved", flush=True)
        times = harness.measure_interleaved(fns, repeats, warmup) if fns else {}
    results = []
    gpu = device.type == "cuda"
    for p in provs:
        if p.name not in times:
            continue
        ts = times[p.name]
        t = statistics.median(ts)
        c = cost(part, h, p.radial_centres, layers, inputs.n_atoms, inputs.n_edges, inputs.n_graphs, b, p.fused)
        gflops, gbps = c.flops / t / 1e9, c.bytes / t / 1e9
        extra = {
            "min_s": round(min(ts), 6), "timed_calls": len(ts), "precision": p.precision,
            "flop_per_edge": round(c.flops / inputs.n_edges), "bytes_per_edge": round(c.bytes / inputs.n_edges),
            "traffic_model": c.model, "gflops": round(gflops, 2), "gbps": round(gbps, 2),
            "first_call_s": round(meta[p.name]["first_call_s"], 3),
            "atoms": inputs.n_atoms, "edges": inputs.n_edges, "dtype": str(dtype).removeprefix("torch."),
        }
        if "parity" in meta[p.name]:
            extra["max_abs_diff"], extra["diff_unit"] = meta[p.name]["parity"]
        if p.radial_centres != 128:
            extra["radial_centres"] = p.radial_centres
        if peaks:
            extra["pct_peak_flops"] = round(100 * gflops / peaks[harness.peak_flops_key(p.precision, dtype)], 2)
            extra["pct_peak_bw"] = round(100 * gbps / peaks["copy_GBps"], 2)
            extra["peak_of"] = "GPU" if gpu else "CPU"
        unit, count = ("edges/s", inputs.n_edges) if part == "op" else ("atoms/s", inputs.n_atoms)
        print(f"[{BENCH}] {case:<16} {p.name:<14} {report.fmt_time(t):>10}  {gflops:8.1f} GFLOP/s "
              f"{gbps:8.1f} GB/s", flush=True)
        results.append(harness.Result(BENCH, p.name, p.backend, device.type, case, t, count / t, unit,
                                      extra=extra))
    harness.add_ratios(results, ["eager"])
    if gpu:
        torch.cuda.empty_cache()
    return results, skipped


# --------------------------------------------------------------------------------------------
# Accuracy of the model output against float64
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def registered(op: str, backend: str, fn):
    """Temporarily make ``fn`` the implementation of ``backend`` (restores the previous one).

    The op table has no public registration: each backend is loaded once and kept in
    ``Op._loaded``, so the model picks up whatever that entry holds (the tests swap it the same way)."""
    from e3relax_fast import ops

    table = ops.OPS[op]
    old = table.load(backend)
    table._loaded[backend] = fn
    try:
        yield
    finally:
        table._loaded[backend] = old


def _with_backend(model, backend: str):
    m = copy.copy(model)  # shares the parameters; only the backend differs
    m.backend = backend
    return m


def _accuracy_rows(h: int, layers: int, b64, device, usable) -> tuple[list[list[str]], str]:
    import torch

    from e3relax_fast import ops
    from e3relax_fast.model import E3Relax

    label = f"H={h} L={layers}"
    b32 = b64.to(dtype=torch.float32)
    torch.manual_seed(0)
    m64 = E3Relax(h, layers, backend="reference").to(device=device, dtype=torch.float64).eval()
    m32 = copy.deepcopy(m64).to(torch.float32)
    rows = []
    with torch.inference_mode():
        ref = m64(b64)

        def row(config, fn):
            try:
                out = fn()
                harness.sync()
                dp = float((out.positions[-1].double() - ref.positions[-1]).abs().max())
                dc = float((out.cells[-1].double() - ref.cells[-1]).abs().max())
                rows.append([label, config, f"{dp:.2e}", f"{dc:.2e}"])
            except Exception as exc:  # noqa: BLE001 - reported in the table
                rows.append([label, config, "failed", _short(exc)[:160]])

        with harness.tf32(False):
            row("reference float32", lambda: m32(b32))
        if device.type == "cuda":
            with harness.tf32(True):
                row("reference float32, TF32 matmuls", lambda: m32(b32))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            row("reference float32, bf16 autocast", lambda: m32(b32))
        for name, _timed in usable:
            row(f"{name} float64", lambda name=name: _with_backend(m64, name)(b64))
            with harness.tf32(False):
                row(f"{name} float32", lambda name=name: _with_backend(m32, name)(b32))
            if name == "triton":
                from e3relax_fast.kernels.message_passing import KernelConfig

                fn = ops.resolve(ops.MESSAGE_PASSING, "triton", device.type)[1]
                for prec in ("tf32x3", "tf32"):
                    with registered(ops.MESSAGE_PASSING, "triton",
                                    functools.partial(fn, config=KernelConfig(input_precision=prec))):
                        row(f"triton float32, kernel {prec}", lambda: _with_backend(m32, "triton")(b32))
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    row(f"{name} float32, bf16 autocast", lambda name=name: _with_backend(m32, name)(b32))
        p0, c0 = b64.positions, b64.cells
        note = (f"{label}: the float64 model moves atoms by up to "
                f"{float((ref.positions[-1] - p0).abs().max()):.3g} Å and cell entries by up to "
                f"{float((ref.cells[-1] - c0).abs().max()):.3g} Å (untrained, seeded weights)")
    return rows, note


def accuracy(inputs64: Inputs, sizes, device, interpreter_check: bool) -> tuple[list[list[str]], list[str]]:
    """Rows ``[model, configuration, max|Δpos| Å, max|Δcell| Å]`` against the float64 reference."""
    import torch

    rows, notes = [], []
    for h, layers in sizes:
        usable, _ = _kernel_backends(device, interpreter_check, h)
        r, note = _accuracy_rows(h, layers, inputs64.batch, device, usable)
        rows += r
        notes.append(note)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


def window_accuracy(inputs: Inputs, h: int) -> list[list[str]]:
    """Rows ``[H, quantity, max |Δ| / max |exact|]``: the ``cpu`` backend's radial window against the
    exact projection, in float64 on the op's inputs (cast up) and on a 0-31 Å grid of distances."""
    import torch

    from e3relax_fast import ops
    from e3relax_fast.reference.message_passing import message_passing as reference
    from e3relax_fast.reference.radial_window import radial_window, windowed_projection
    from e3relax_fast.reference.rbf import radial_basis

    args, kwargs = op_arguments(inputs, h)
    args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    fn = ops.resolve(ops.MESSAGE_PASSING, "cpu", "cpu")[1]
    with torch.inference_mode():
        exact = reference(*args, **kwargs)
        rows = [[f"H={h}", f"op, `cpu` {label}", f"{_max_rel(fn(*args, **kwargs, radial=radial), exact):.1e}"]
                for label, radial in (("windowed", "window"), ("exact mode", "exact"))]
        weight, bias, centres, coeff, cutoff = args[7:12]
        window = radial_window(centres, coeff)
        d = torch.linspace(0.0, 31.0, 4001, dtype=torch.float64)
        full = torch.nn.functional.linear(radial_basis(d, centres, coeff, cutoff), weight, bias)
        part = windowed_projection(d, weight, bias, centres, coeff, cutoff, window)
    rows.append([f"H={h}", f"W e(d) + b on {window.size} centres, 0-31 Å (bound: {window.tail:.1e} x max |W_c|)",
                 f"{_max_rel((part,), (full,)):.1e}"])
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt_diff(r: harness.Result) -> str:
    if "max_abs_diff" not in r.extra:
        return "–"
    if r.provider == "eager":
        return "(baseline)"
    unit = r.extra["diff_unit"]
    return f"{r.extra['max_abs_diff']:.1e}" + (" Å" if unit == "Å" else " (rel.)")


def results_table(results: list[harness.Result], peaks: dict | None) -> str:
    rows = []
    for r in results:
        x = r.extra
        row = [
            r.case, f"`{r.provider}`", r.device,
            x["dtype"] + ("" if x["precision"] == "ieee" else f" {x['precision']}"),
            f"{report.fmt_time(r.median_s)} ({report.fmt_time(x['min_s'])})",
            f"{report.fmt_num(r.throughput)} {r.unit.split('/')[0]}/s",
            report.fmt_ratio(r.ratios.get("eager")),
            report.fmt_num(x["flop_per_edge"]), f"{report.fmt_num(x['bytes_per_edge'])} ({x['traffic_model']})",
            report.fmt_num(x["gflops"]), report.fmt_num(x["gbps"]),
        ]
        if peaks:
            row += [f"{x['pct_peak_flops']:.3g} %", f"{x['pct_peak_bw']:.3g} %"]
        row.append(_fmt_diff(r))
        rows.append(row)
    headers = ["case", "provider", "device", "dtype", "median (min)", "throughput", "× vs eager", "FLOP/edge",
               "B/edge (traffic model)", "GFLOP/s", "GB/s"]
    if peaks:
        headers += ["% peak FLOP", "% peak BW"]
    headers.append("max |Δ| vs eager")
    return report.markdown_table(headers, rows)


def peaks_md(peaks: dict, device) -> str:
    what = "card" if device.type == "cuda" else "CPU (small sizes; this run's torch threads)"
    items = [f"bandwidth {peaks['copy_GBps']:,.0f} GB/s ({peaks['copy_desc']}, read + write)"]
    for k in ("fp32", "tf32", "bf16", "fp64"):
        if f"{k}_GFLOPs" in peaks:
            items.append(f"{k} {peaks[f'{k}_GFLOPs']:,.0f} GFLOP/s ({peaks[f'{k}_desc']})")
    return f"Measured peaks of this {what}: " + "; ".join(items) + ".\n"


def build_md(title_line: str, inputs: Inputs | None, peaks, device, dtype, results, skipped, acc, notes, args,
             wall_s: float, window_rows=()) -> str:
    parts = [title_line]
    if inputs is not None:
        parts.append(
            f"Inputs: the first {args.n} crystals of the MP-like mix ({inputs.describe}). Working dtype "
            f"{str(dtype).removeprefix('torch.')}, forward only, `torch.inference_mode()`. Median of "
            f"{args.repeats} timed calls after warm-up, providers interleaved round-robin (a call over 5 s is "
            f"timed once); `median (min)`. × = eager time / provider time (> 1: faster). FLOP and bytes "
            f"per edge are the spec §14 cost model (formulas in `bench/cost_model.py`): "
            f"op FLOP/edge = 6RH + 25H + 6R + 30; bytes/edge unfused = b(68H + 10R + 50) + 56 (eager, "
            f"compile), fused = 16 + 6b + 10Hb/k (kernels, compulsory DRAM traffic; k = edges per atom); "
            f"layer and model rows add the node GEMMs N(90H² + 18RH) + G·102H², the weights and ~500H·b "
            f"per atom of node tensors, divided by E. Took {wall_s:.0f} s.\n"
        )
    if peaks:
        parts.append(peaks_md(peaks, device))
    if results:
        parts.append(results_table(results, peaks) + "\n")
    if skipped:
        grouped: dict[tuple[str, str], list[str]] = {}
        for case, name, why in skipped:
            grouped.setdefault((name, why), []).append(case)
        lines = [f"- `{name}` ({', '.join(cases)}): {why}" for (name, why), cases in grouped.items()]
        parts.append("Not timed:\n\n" + "\n".join(lines) + "\n")
    if window_rows:
        parts.append(
            "#### Radial window of backend `cpu` against the exact projection (float64)\n\n"
            + report.markdown_table(["size", "quantity", "max |Δ| / max |exact|"], list(window_rows)) + "\n")
    if acc:
        parts.append(
            "#### Accuracy of the model output (final layer) against the float64 reference\n\n"
            "Same seeded weights, same graph; max |Δ| over all atoms (positions) and cell entries.\n\n"
            + report.markdown_table(["model", "configuration", "max |Δ positions| (Å)", "max |Δ cell| (Å)"], acc)
            + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        )
    return "\n".join(parts)


def run(args, info: dict | None = None) -> tuple[str, list[harness.Result]]:
    """Run the benchmark as configured by ``args`` (see :func:`parse_args`). Returns ``(md, results)``."""
    import torch

    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    sizes = [harness.parse_model_size(s) for s in args.sizes]
    title = f"### Message passing: op, layer, model on {device.type}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "") + "\n"
    print(f"[{BENCH}] device {device}, dtype {args.dtype}, sizes {args.sizes}, parts {args.parts}", flush=True)
    peaks = None
    if not args.no_peaks:
        peaks = harness.measure_peaks(device)
        print(f"[{BENCH}] peaks: " + ", ".join(f"{k} {v:,.0f}" for k, v in peaks.items() if k.endswith("s")),
              flush=True)
    inputs = make_inputs(args.n, dtype, device)
    print(f"[{BENCH}] inputs: {inputs.describe}", flush=True)
    compile_state = {"spent_s": 0.0, "budget_s": args.compile_budget_s}
    results: list[harness.Result] = []
    skipped: list[tuple[str, str, str]] = []
    acc_rows: list[list[str]] = []
    acc_notes: list[str] = []
    window_rows: list[list[str]] = []

    def write():
        md = build_md(title, inputs, peaks, device, dtype, results, skipped, acc_rows, acc_notes, args,
                      time.perf_counter() - t_start, window_rows)
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(md)
        return md

    if args.accuracy is None:
        do_acc = device.type == "cuda"
    else:
        do_acc = args.accuracy
    if do_acc:
        # First, so that a run stopped by a time limit still has it (the timings save as they go).
        n_acc = args.n_accuracy or min(args.n, 64)
        print(f"[{BENCH}] accuracy against float64 on {n_acc} crystals", flush=True)
        try:
            inputs64 = make_inputs(n_acc, torch.float64, device)
            acc_rows, acc_notes = accuracy(inputs64, sizes, device, args.interpreter_check)
            acc_notes.insert(0, f"inputs: the first {n_acc} crystals ({inputs64.describe})")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            acc_notes = [f"accuracy check failed: {_short(exc)}"]
        for r in acc_rows:
            print(f"[{BENCH}] accuracy {r[0]:<10} {r[1]:<40} pos {r[2]:>9}  cell {r[3]}", flush=True)
        write()
    for part in args.parts:
        for h, layers in sizes:
            try:
                res, sk = run_case(part, h, layers, inputs, device, dtype, repeats=args.repeats,
                                   warmup=args.warmup, compile_state=compile_state,
                                   interpreter_check=args.interpreter_check, peaks=peaks)
            except Exception as exc:  # noqa: BLE001 - keep the other cases (e.g. out of memory)
                traceback.print_exc()
                res, sk = [], [(f"{part} H={h}", "all", f"case failed: {_short(exc)}")]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results += res
            skipped += sk
            if part == "op" and any(r.provider == "cpu" for r in res):
                window_rows += window_accuracy(inputs, h)
                for r in window_rows[-3:]:
                    print(f"[{BENCH}] window accuracy {r[0]} {r[1]}: {r[2]}", flush=True)
            write()
    md = write()
    if results:
        report.append_csv(results, BENCH, baseline="eager", info=info)
    return md, results


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_message_passing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small CPU-friendly run: --n 8, --compile-budget-s 45 unless given (< 2 min on CPU)")
    ap.add_argument("--n", type=int, default=None, help="crystals (first n of the MP-like mix; 160, --quick 8)")
    ap.add_argument("--n-accuracy", type=int, default=None,
                    help="crystals for the accuracy check (default: min(--n, 64))")
    ap.add_argument("--sizes", nargs="*", default=["512x4", "64x4"], help="HxL (default 512x4 64x4)")
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 5 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile-budget-s", type=float, default=None,
                    help="stop compiling further cases once this much compile time is spent "
                         "(default 300 on GPU, 45 with --quick, else 600)")
    acc = ap.add_mutually_exclusive_group()
    acc.add_argument("--accuracy", dest="accuracy", action="store_true", default=None,
                     help="run the float32/TF32/bf16 accuracy check (default: on GPU only)")
    acc.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--interpreter-check", action="store_true",
                    help="CPU: run the Triton backend once under TRITON_INTERPRET=1 for the parity column "
                         "(never timed). Sets TRITON_INTERPRET=1 before e3relax_fast is imported.")
    ap.add_argument("--no-peaks", action="store_true", help="skip measuring the machine's peaks (and the % columns)")
    ap.add_argument("--md", default=None, help="also write the markdown report here (rewritten after each case)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    args = ap.parse_args(argv)
    import torch

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.n is None:
        args.n = 8 if args.quick else 160
    if args.repeats is None:
        args.repeats = 5 if gpu else 3
    if args.compile_budget_s is None:
        args.compile_budget_s = 45.0 if args.quick else (300.0 if gpu else 600.0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.interpreter_check and "e3relax_fast" not in sys.modules:
        import torch

        if not torch.cuda.is_available():  # must be set before the kernels are imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
    harness.set_threads(args.threads)
    info = harness.machine()
    cmd = "python -m bench.bench_message_passing " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report.header_md("Message passing", cmd.strip(), info), flush=True)
    md, _ = run(args, info)
    print(md)


if __name__ == "__main__":
    main()
