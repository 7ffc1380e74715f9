"""Benchmark: the atom–lattice ops of one layer — ``lattice_message`` (Step 0/A, the three lattice
nodes in turn) and ``lattice_pool`` (Step 0 centres + Step E pooling of s and v) — per backend.

Every provider gets the same inputs: the MP-like mix (``--n`` crystals), random node features of
width H, and the model's basis (R = 128, cutoff 30 Å); forward only, no gradients. Providers:
``reference`` (baseline), ``triton`` when registered for the device (CUDA; under the CPU
interpreter timings mean nothing, so it is left out there). Ratios are reference time / provider time.

    python -m bench.bench_lattice_message                  # CPU: reference only, H=64 and 512
    python -m bench.bench_lattice_message --device cuda --n 1000
"""

from __future__ import annotations

import argparse
import math
import statistics

from . import harness, inputs, report

BENCH = "lattice_message"


def make_case(n: int, h: int, dtype, device, seed: int = 0) -> dict:
    """Inputs of one atom–lattice step for the first ``n`` crystals of the MP-like mix."""
    import torch

    import e3relax_fast as e3r
    from e3relax_fast.batch import graph_index_from_ptr
    from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient

    batch = e3r.Batch.from_arrays(inputs.mp_like_mix(n), dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(seed)
    num_atoms, r = batch.num_atoms, 128
    mu = rbf_centres(r).to(device)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return dict(x_proj=randn(num_atoms, 3 * h), vec=randn(num_atoms, 3, h), s=randn(num_atoms, h),
                positions=batch.positions, cells=batch.cells, ptr=batch.ptr,
                graph_index=graph_index_from_ptr(batch.ptr, num_atoms),
                edge_weight=randn(3 * h, r, scale=1 / math.sqrt(r)), edge_bias=randn(3 * h, scale=0.1),
                rbf_centres=mu, rbf_coeff=rbf_coefficient(mu), cutoff=30.0, num_atoms=num_atoms)


def lattice_step(message, pool, c: dict):
    """What E3Relax.forward does with the two ops in one layer (default mode), minus the MLPs."""
    centres = pool(c["positions"], c["ptr"], c["graph_index"])
    v = c["vec"]
    for k in range(3):
        _, v = message(c["x_proj"], v, c["positions"], c["cells"], c["graph_index"], centres, k, c["edge_weight"],
                       c["edge_bias"], c["rbf_centres"], c["rbf_coeff"], c["cutoff"])
    return pool(c["s"], c["ptr"], c["graph_index"]), pool(v, c["ptr"], c["graph_index"])


def run(n: int, sizes: list[int], device: str = "cpu", repeats: int = 5, info: dict | None = None):
    """Returns ``(markdown, results)``."""
    import torch

    from e3relax_fast import ops

    dev = torch.device(device)
    providers = ["reference"]
    if dev.type == "cuda" and "triton" in ops.available(ops.LATTICE_MESSAGE):
        providers.append("triton")
    notes = [] if dev.type == "cuda" else ["`triton`: not timed on CPU (the interpreter's timings mean nothing); "
                                           "not yet measured on GPU"]
    results, rows = [], []
    for h in sizes:
        case = make_case(n, h, torch.float32, dev)
        fns = {}
        for name in providers:
            _, message = ops.resolve(ops.LATTICE_MESSAGE, name, dev.type)
            _, pool = ops.resolve(ops.LATTICE_POOL, name, dev.type)
            fns[name] = lambda message=message, pool=pool, case=case: lattice_step(message, pool, case)
        with torch.inference_mode():
            times = harness.measure_interleaved(fns, repeats=repeats, warmup=1)
        label = f"H={h} n={n} atoms={case['num_atoms']}"
        for name in providers:
            t = statistics.median(times[name])
            results.append(harness.Result(BENCH, name, name, dev.type, label, t, case["num_atoms"] / t, "atoms/s",
                                          extra={"min_s": round(min(times[name]), 6)}))
    harness.add_ratios(results, ["reference"])
    report.append_csv(results, BENCH, baseline="reference", info=info)
    for r in results:
        timing = f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})"
        rows.append([r.case, f"`{r.provider}`", timing, report.fmt_num(r.throughput),
                     report.fmt_ratio(r.ratios.get("reference"))])
    table = report.markdown_table(["case", "provider", "median (min)", "atoms/s", "× vs reference"], rows)
    md = (report.header_md(f"Atom–lattice ops ({dev.type}, float32 forward)",
                            f"python -m bench.bench_lattice_message --n {n} --device {device}", info)
          + "- work: centres (segment mean of positions), three lattice messages, pooling of s and v\n"
          + "".join(f"- {x}\n" for x in notes)
          + "\n" + table + "\n")
    return md, results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_lattice_message", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="crystals of the MP-like mix (200)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 512], help="hidden widths H (64 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    md, _ = run(args.n, args.sizes, args.device, args.repeats)
    print(md)


if __name__ == "__main__":
    main()
