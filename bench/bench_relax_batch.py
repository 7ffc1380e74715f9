"""Benchmark: ``e3relax_fast.relax_batch`` throughput on the MP-like mix (CPU by default).

For each model size (untrained, seeded: ``torch.manual_seed(0)``; default the paper size
H=512, L=4 and a small H=64, L=4) on the first ``--n`` crystals of the MP-like mix:

* ``batched`` — one ``relax_batch(structures, model=..., device=..., max_atoms=--max-atoms)`` call
  (default budget: ``relax_batch``'s own for the model on the device);
* ``one_at_a_time`` — ``relax_batch([s], ...)`` for each structure in turn (baseline of the ratio);
* ``graph`` — ``build_graph`` alone (``backend="auto"``) on the same atom-budget batches
  (``e3relax_fast.relax.plan_batches`` with the same budget, i.e. ``relax_batch``'s own batches);
* ``model`` — the model forward alone (``torch.inference_mode``) on those batches, graph given;
* ``graph+model`` — the sum of the two; ``batched`` minus this is the conversion/validation/output
  overhead of ``relax_batch``.
* ``graph (1 by 1)`` / ``model (1 by 1)`` — the same split with one structure per batch.
* ``model, reference`` / ``model, cpu exact`` (and their ``(1 by 1)``) — the model forward with the
  pure-PyTorch reference ops (what ``relax_batch`` ran before backend ``cpu``), and with backend
  ``cpu`` evaluating its radial projections on every centre instead of the window (when the
  model's auto choice is ``cpu``; ``--no-backends`` leaves these out).
* ``frame`` — the canonical frame and the symmetry work of ``relax_batch`` alone: every input's
  canonical frame (symmetry search, choice, bookkeeping) as ``relax_batch`` builds them
  (``frame_workers.canonical_frames``: shared with worker processes on idle cores, started and
  ready before the timing) and, on the frame's own cell as the "prediction", the projection, the
  translation gauge and the map back (part of ``batched``); ``frame, one process`` — the same with
  ``frame_workers=0``;
  ``batched, no frame`` — ``relax_batch`` with ``frame="input", symmetry="free"``: the difference
  to ``batched`` is the frame's cost as ``relax_batch`` pays it (a note under the table: the
  median over the rounds of each round's difference and share);
  ``frame inside relax_batch`` — ``batched`` (default options) with the time it spends in the
  frame's two functions (``canonical_frames`` for every input, ``CanonicalFrame.map_back`` for
  every prediction) recorded within each call: the frame's time and its share of that same call
  (median over the calls of the per-call share; no difference of two noisy medians);
  ``frame, reference ops`` — ``frame`` with the NumPy reference twins of the two frame ops;
  ``frame search`` — the symmetry search of ``frame`` (``frame.search``: moyopy's search and
  normalizer and the conversion of their results, or for a crystal the op ``frame_p1_certificate``
  proves P1, that proof and moyopy's known answer), as ``canonical_frame`` calls it.
* ``batched max_atoms=B`` — with ``--budgets B ...``: ``relax_batch`` end to end under other atom
  budgets, to see where batching stops paying (each against ``one_at_a_time``).

The model forward's executed GFLOP/s (the spec §14 cost model, :mod:`bench.cost_model`, with the
window's 15 centres for backend ``cpu``) is reported beside this machine's measured float32 matmul
peak (``harness.measure_peaks``, with the run's threads): the roofline of the forward.

Throughput: structures/s and atoms/s. Ratio: ``one_at_a_time`` time / mode time (> 1: faster).
All modes of one model size are timed in interleaved rounds (``harness.measure_interleaved``);
a call longer than ``--long-s`` (10 s) is timed once (its warm-up call is the measurement).

    python -m bench.bench_relax_batch                 # default, < ~3 min on 2 cores
    python -m bench.bench_relax_batch --n 200 --sizes 64x4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from unittest import mock

from . import harness, inputs, report

BENCH = "relax_batch"


# Rows of the markdown table: part -> (batched mode, one-at-a-time mode).
PARTS = {
    "`relax_batch` end to end": ("batched", "one_at_a_time"),
    "`build_graph` only": ("graph", "graph (1 by 1)"),
    "model forward only": ("model", "model (1 by 1)"),
    "graph + model (sum)": ("graph+model", "graph+model (1 by 1)"),
    "model forward, `reference` ops": ("model, reference", "model, reference (1 by 1)"),
    "model forward, `cpu` exact radial": ("model, cpu exact", "model, cpu exact (1 by 1)"),
    "canonical frame + symmetry": ("frame", "frame"),
    "canonical frame + symmetry, one process (`frame_workers=0`)": ("frame, one process", "frame, one process"),
    "canonical frame + symmetry inside `relax_batch` (timed in each call; share: per-call median)": (
        "frame inside relax_batch", "frame inside relax_batch"),
    "canonical frame + symmetry, NumPy reference ops": ("frame, reference ops", "frame, reference ops"),
    "of which the symmetry search (`frame.search`: moyopy, or the P1 certificate)": ("frame search", "frame search"),
    "`relax_batch` without them (`frame=\"input\"`)": ("batched, no frame", "batched, no frame"),
}
PAIRS = {b: o for b, o in PARTS.values()}


def _cell(r: harness.Result) -> str:
    t_min = r.extra.get("min_s")
    return report.fmt_time(r.median_s) + (f" ({report.fmt_time(t_min)})" if t_min is not None else "")


def _time_model_size(hidden, layers, *, triples, atoms, singles, device, max_atoms,
                     graph_backend, repeats, warmup, long_s, backends=True, budgets=(), peaks=None
                     ) -> list[harness.Result]:
    """Time every mode for one model size, interleaved; returns the results."""
    import copy

    import moyopy
    import numpy as np
    import torch

    from e3relax_fast import E3Relax, ops, relax_batch
    from e3relax_fast import relax as relax_module
    from e3relax_fast.batch import Batch, plan_batches
    from e3relax_fast.frame import SYMPREC, CanonicalFrame, canonical_frame, search
    from e3relax_fast.frame_workers import canonical_frames
    from e3relax_fast.frame_workers import start as start_frame_workers
    from e3relax_fast.relax import _atom_budget

    from .bench_message_passing import exact_radial

    n = len(triples)
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=hidden, num_layers=layers).to(device).eval()
    mp_backend, _ = ops.resolve(ops.MESSAGE_PASSING, model.backend, torch.device(device).type)
    if max_atoms is None:  # relax_batch's own default for this model on the device
        max_atoms = _atom_budget(model, torch.device(device), 50)
    # The package's own grouping, so the split timings use relax_batch's batches.
    batches = [Batch.from_arrays([triples[k] for k in g]).to(device)
               for g in plan_batches([len(t[0]) for t in triples], None, max_atoms)]
    print(f"[{BENCH}] H={hidden}: {len(batches)} batch(es) of <= {max_atoms} atoms", flush=True)
    case = f"H={hidden} L={layers} n={n} max_atoms={max_atoms}"
    both = f"graph={graph_backend}, mp={mp_backend}"

    def graphs(bs):
        # As relax_batch does: graph from float64 inputs, then cast to the model's dtype.
        return [b.with_graph(backend="auto").to(dtype=torch.float32) for b in bs]

    def frame_work(backend="auto"):
        for triple in triples:
            frame = canonical_frame(*triple, backend=backend)
            frame.map_back(frame.positions, frame.cell, symmetrize=True, backend=backend)

    def frame_as_relax_batch(workers="auto"):
        for frame in canonical_frames(triples, SYMPREC, workers):
            frame.map_back(frame.positions, frame.cell, symmetrize=True)

    workers = start_frame_workers(timeout=60.0)  # started and ready before any timing
    print(f"[{BENCH}] frame worker processes ready: {workers}", flush=True)

    # The part of the frame that is the symmetry library's (the floor of frame_work): moyopy's search
    # and normalizer and the conversion of their results, as canonical_frame calls them.
    searches = [(np.asarray(z, dtype=np.int64), np.asarray(pos, dtype=np.float64), np.asarray(cell, dtype=np.float64))
                for z, pos, cell in triples]
    searches = [(z, pos @ np.linalg.inv(cell), pos, cell) for z, pos, cell in searches]

    def frame_search():
        for z, frac, pos, cell in searches:
            search(moyopy, z, frac, pos, cell, SYMPREC)

    inside = []  # (seconds in the frame's functions, seconds of the call) per relax_batch call

    def frame_inside_relax_batch():
        spent = [0.0]

        def timed(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - start
            return wrapper

        with (mock.patch.object(relax_module, "canonical_frames", timed(relax_module.canonical_frames)),
              mock.patch.object(CanonicalFrame, "map_back", timed(CanonicalFrame.map_back))):
            start = time.perf_counter()
            relax_batch(triples, model=model, device=device, max_atoms=max_atoms)
            inside.append((spent[0], time.perf_counter() - start))

    results = []
    with torch.inference_mode():
        with_graph, single_graph = graphs(batches), graphs(singles)
        model(with_graph[0].select([0]))  # lazy initialisation outside the timed calls
        relax_batch(triples[:2], model=model, device=device, max_atoms=max_atoms)
        fns = {
            "batched": lambda: relax_batch(triples, model=model, device=device, max_atoms=max_atoms),
            "one_at_a_time": lambda: [relax_batch([t], model=model, device=device, max_atoms=max_atoms)
                                      for t in triples],
            "graph": lambda: graphs(batches),
            "model": lambda: [model(b) for b in with_graph],
            "graph (1 by 1)": lambda: graphs(singles),
            "model (1 by 1)": lambda: [model(b) for b in single_graph],
            "frame": frame_as_relax_batch,
            "frame, one process": lambda: frame_as_relax_batch(0),
            "frame, reference ops": lambda: frame_work("reference"),
            "frame search": frame_search,
            "frame inside relax_batch": frame_inside_relax_batch,
            "batched, no frame": lambda: relax_batch(triples, model=model, device=device, max_atoms=max_atoms,
                                                     frame="input", symmetry="free"),
        }
        backend_of = {"batched": both, "one_at_a_time": both, "graph": graph_backend, "graph (1 by 1)": graph_backend,
                      "model": mp_backend, "model (1 by 1)": mp_backend,
                      "frame": f"moyopy + frame ops, {workers} worker process(es)",
                      "frame, one process": "moyopy + frame ops",
                      "frame, reference ops": "moyopy + reference", "frame search": "moyopy or the P1 certificate",
                      "frame inside relax_batch": "moyopy + frame ops, as relax_batch calls them",
                      "batched, no frame": both}
        variants = {}
        if backends:
            reference = copy.copy(model)  # shares the parameters; only the backend differs
            reference.backend = "reference"
            variants["model, reference"] = ("reference", reference)
            if mp_backend == "cpu":
                variants["model, cpu exact"] = ("cpu, radial exact", exact_radial(model))
        for mode, (label, fn) in variants.items():
            fns[mode] = lambda fn=fn: [fn(b) for b in with_graph]
            fns[f"{mode} (1 by 1)"] = lambda fn=fn: [fn(b) for b in single_graph]
            backend_of[mode] = backend_of[f"{mode} (1 by 1)"] = label
        for budget in budgets:
            fns[f"batched max_atoms={budget}"] = (
                lambda budget=budget: relax_batch(triples, model=model, device=device, max_atoms=budget))
            backend_of[f"batched max_atoms={budget}"] = both
        print(f"[{BENCH}] H={hidden} L={layers}: timing {', '.join(fns)} interleaved", flush=True)
        times = harness.measure_interleaved(fns, repeats, warmup, long_s)
    # The frame's row is its time within the calls (the warm-up calls left out, as the harness does).
    inside = inside[-len(times["frame inside relax_batch"]):]
    times["frame inside relax_batch"] = [frame_s for frame_s, _ in inside]
    inside_share = statistics.median(frame_s / call_s for frame_s, call_s in inside)
    # The frame's cost by difference, round by round (the two calls of a round meet the same load).
    paired = list(zip(times["batched"], times["batched, no frame"], strict=True))
    differences = [with_ - without for with_, without in paired]
    difference_share = statistics.median(d / with_ for d, (with_, _) in zip(differences, paired, strict=True))
    med = {}
    for mode, ts in times.items():
        t = med[mode] = statistics.median(ts)
        print(f"[{BENCH}] H={hidden:<4} {mode:<28} {report.fmt_time(t):>10}  "
              f"({len(ts)} timed, min {report.fmt_time(min(ts))})", flush=True)
        extra = {"atoms_per_s": round(atoms / t, 2), "timed_calls": len(ts), "min_s": round(min(ts), 6)}
        kind = {"model": mp_backend, "model, reference": "reference", "model, cpu exact": "cpu exact"}.get(mode)
        if kind is not None:
            extra.update(_roofline(hidden, layers, with_graph, t, kind, peaks))
        if mode == "batched":
            extra["batches"] = len(batches)
        if mode == "frame inside relax_batch":
            extra["share_of_call"] = round(inside_share, 5)
        if mode == "batched, no frame":
            extra["frame_share_by_difference"] = round(difference_share, 5)
            extra["frame_s_by_difference"] = round(statistics.median(differences), 6)
            extra["difference_range_s"] = [round(min(differences), 6), round(max(differences), 6)]
        results.append(harness.Result(BENCH, mode, backend_of[mode], device, case, t, n / t, "structures/s",
                                      extra=extra))
    for mode, parts in (("graph+model", ("graph", "model")),
                        ("graph+model (1 by 1)", ("graph (1 by 1)", "model (1 by 1)"))):
        t = med[parts[0]] + med[parts[1]]
        t_min = times[parts[0]] and min(times[parts[0]]) + min(times[parts[1]])
        results.append(harness.Result(
            BENCH, mode, both, device, case, t, n / t, "structures/s",
            extra={"atoms_per_s": round(atoms / t, 2), "min_s": round(t_min, 6)},
            note="sum of the two timed parts",
        ))
    return results


def _roofline(hidden: int, layers: int, batches, seconds: float, backend: str, peaks: dict | None) -> dict:
    """Executed GFLOP/s of a forward over ``batches`` in ``seconds`` (spec §14 cost model; backend
    ``cpu`` evaluates the radial projections on the window's centres, ``"cpu exact"`` on all) and its
    share of the fp32 peak."""
    from .bench_message_passing import WINDOW_CENTRES
    from .cost_model import cost

    centres = WINDOW_CENTRES if backend == "cpu" else 128
    flops = sum(cost("model", hidden, centres, layers, b.num_atoms, int(b.edge_index.shape[1]), b.num_graphs, 4,
                     fused=backend != "reference").flops for b in batches)
    out = {"gflops": round(flops / seconds / 1e9, 2), "radial_centres": centres}
    if peaks:
        out["pct_peak_flops"] = round(100 * out["gflops"] / peaks["fp32_GFLOPs"], 1)
    return out


def run(n: int = 48, sizes=((512, 4), (64, 4)), max_atoms: int | None = None, device: str = "cpu", seed: int = 0,
        repeats: int = 3, warmup: int = 1, long_s: float = 10.0, info: dict | None = None, backends: bool = True,
        budgets=(), peaks: bool = True, structures: str | None = None):
    """Returns ``(markdown, results)``. ``structures``: a file ASE reads (its first ``n`` crystals)
    instead of the MP-like mix."""
    import torch

    from e3relax_fast import Batch, ops

    if structures is None:
        triples, source = inputs.mp_like_mix(n, seed=seed), "MP-like mix subset"
    else:
        from ase.io import read

        triples = [(a.numbers, a.positions, a.cell.array) for a in read(structures, f":{n}")]
        source = f"the first {len(triples)} crystals of `{structures}`"
    atoms = sum(len(t[0]) for t in triples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph_backend, _ = ops.resolve(ops.RADIUS_GRAPH, "auto", torch.device(device).type)
    backend_notes = [f"note: {w.message}" for w in caught]
    singles = [Batch.from_arrays([t]).to(device) for t in triples]
    print(f"[{BENCH}] {inputs.describe(triples)}", flush=True)

    measured = harness.measure_peaks(torch.device(device)) if peaks else None
    results: list[harness.Result] = []
    ctx = dict(triples=triples, atoms=atoms, singles=singles, device=device,
               max_atoms=max_atoms, graph_backend=graph_backend, repeats=repeats, warmup=warmup, long_s=long_s,
               backends=backends, budgets=budgets, peaks=measured)
    for hidden, layers in sizes:
        results += _time_model_size(hidden, layers, **ctx)

    # Ratios: each batched part against its one-at-a-time counterpart.
    by = {(r.case, r.provider): r for r in results}
    for r in results:
        baseline = "one_at_a_time" if r.provider.startswith("batched max_atoms=") else PAIRS.get(r.provider, r.provider)
        base = by.get((r.case, baseline))
        if base is not None:
            r.ratios["one_at_a_time"] = base.median_s / r.median_s
    rows_md, roofline = [], []
    for case in dict.fromkeys(r.case for r in results):
        e2e = by[(case, "batched")]
        label = f"{case.split(' n=')[0]}, {e2e.extra['batches']} batch(es) of <= {case.split('max_atoms=')[1]} atoms"
        parts = dict(PARTS)
        parts.update({f"`relax_batch`, max_atoms={b}": (f"batched max_atoms={b}", "one_at_a_time") for b in budgets})
        for part, (batched, single) in parts.items():
            if (case, batched) not in by:
                continue
            rb, r1 = by[(case, batched)], by[(case, single)]
            if "gflops" in rb.extra:
                roofline.append(f"{case.split(' max_atoms=')[0]}, {part}: {rb.extra['gflops']:.1f} GFLOP/s executed"
                                + (f" ({rb.extra['pct_peak_flops']:.0f} % of the fp32 matmul peak)"
                                   if "pct_peak_flops" in rb.extra else ""))
            rows_md.append([
                label, part,
                _cell(rb), report.fmt_num(rb.throughput), report.fmt_num(rb.extra["atoms_per_s"]),
                _cell(r1), report.fmt_num(r1.throughput),
                report.fmt_ratio(rb.ratios.get("one_at_a_time")),
                report.fmt_pct(rb.extra["share_of_call"], 1.0) if "share_of_call" in rb.extra
                else report.fmt_pct(rb.median_s, e2e.median_s),
            ])
    table = report.markdown_table(
        ["model", "part", "batched: median (min)", "structures/s", "atoms/s", "1-by-1: median (min)",
         "structures/s", "batched speed-up", "share of batched relax_batch"],
        rows_md,
    )
    notes = "".join(f"\n- {s}" for s in backend_notes)
    for case in dict.fromkeys(r.case for r in results):
        if (case, "batched, no frame") in by:  # the frame's cost as relax_batch pays it: the difference
            without = by[(case, "batched, no frame")]
            with_frame = by[(case, "batched")].median_s
            medians = (f"medians: {report.fmt_time(with_frame)} by default, {report.fmt_time(without.median_s)} "
                       f"with `frame=\"input\", symmetry=\"free\"`")
            difference, share = without.extra["frame_s_by_difference"], without.extra["frame_share_by_difference"]
            low, high = without.extra["difference_range_s"]
            spread = (f"the rounds' differences ranged from {'-' if low < 0 else ''}{report.fmt_time(abs(low))} "
                      f"to {'-' if high < 0 else ''}{report.fmt_time(abs(high))}")
            inside = by.get((case, "frame inside relax_batch"))
            within = (f"; timed inside the calls, the frame took {report.fmt_time(inside.median_s)}, "
                      f"{report.fmt_pct(inside.extra['share_of_call'], 1.0)} of each call" if inside else "")
            if difference > 0:
                notes += (f"\n- {case.split(' n=')[0]}: by the difference of the two calls, the canonical frame + "
                          f"symmetry add {report.fmt_time(difference)} to `relax_batch`, {report.fmt_pct(share, 1.0)} "
                          f"of it (medians over the rounds; {spread}: the machine's noise, not the frame's cost, "
                          f"where that range is wider than the frame's own time{within}; {medians})")
            else:  # the two calls differ by less than their noise
                notes += (f"\n- {case.split(' n=')[0]}: no cost measurable by the difference of the two calls "
                          f"against the noise ({spread}{within}; {medians})")
    if roofline:
        peak = (f"measured float32 matmul peak {measured['fp32_GFLOPs']:,.0f} GFLOP/s ({measured['fp32_desc']}, "
                f"{torch.get_num_threads()} thread(s))" if measured else "peaks not measured")
        notes += (f"\n\nModel forward, batched, against the roofline ({peak}; FLOP from the spec §14 cost model, "
                  f"radial projections on the centres each backend evaluates):\n"
                  + "".join(f"\n- {line}" for line in roofline))
    md = (
        f"### relax_batch on {device}, {source} ({inputs.describe(triples)})\n\n"
        f"Untrained models (`torch.manual_seed(0)`), float32 parameters, `torch.inference_mode()`. "
        f"Atom budget (model column): {'--max-atoms' if max_atoms else '`relax_batch`'}'s, batches as "
        f"`relax_batch` plans them. Median of "
        f"{repeats} timed calls after {warmup} warm-up call(s), all modes interleaved round-robin; calls over "
        f"{long_s:g} s are timed once. "
        f"Batched speed-up = one-at-a-time median / batched median of the same part (> 1: batching "
        f"helps); share = the part's batched median / the batched `relax_batch` median.\n\n{table}\n{notes}\n"
    )
    report.append_csv(results, BENCH, baseline="one_at_a_time", info=info)
    return md, results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_relax_batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="crystals (first n of the MP-like mix; default 48)")
    ap.add_argument("--sizes", nargs="*", default=["512x4", "64x4"], help="model sizes HxL (default 512x4 64x4)")
    ap.add_argument("--max-atoms", type=int, default=None,
                    help="atom budget per batch (default: relax_batch's own default for the device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds (the first is timed; see harness)")
    ap.add_argument("--long-s", type=float, default=10.0, help="a call slower than this is timed once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    ap.add_argument("--budgets", type=int, nargs="*", default=[],
                    help="also time relax_batch end to end under these atom budgets")
    ap.add_argument("--no-backends", dest="backends", action="store_false",
                    help="leave out the model forward with the reference ops and with the exact radial projection")
    ap.add_argument("--no-peaks", dest="peaks", action="store_false", help="skip measuring the matmul peak")
    ap.add_argument("--structures", metavar="FILE",
                    help="crystals from this file (ASE reads it; its first --n) instead of the MP-like mix, e.g. "
                    "data/seeds/aflow_decorated.extxyz: symmetric inputs, where the frame costs more")
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    info = harness.machine()
    cmd = "python -m bench.bench_relax_batch " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report.header_md("relax_batch", cmd.strip(), info))
    md, _ = run(args.n, [harness.parse_model_size(s) for s in args.sizes], args.max_atoms, args.device, args.seed,
                args.repeats, args.warmup, args.long_s, info, args.backends, args.budgets, args.peaks, args.structures)
    print(md)


if __name__ == "__main__":
    main()
