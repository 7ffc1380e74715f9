"""Benchmark: building the E3Relax graph (radius 6 Å, top-50 per centre, + 6 self-image edges).

Providers (all get the same ``(z, positions, cell)`` triples; format conversion is untimed):

* ``original`` — the original pipeline's approach, reimplemented here: per structure, pymatgen
  ``Structure.get_neighbor_list(r=6.0, numerical_tol=0, exclude_self=True)``, then a per-centre
  Python loop (argsort the centre's candidates by distance, keep 50, drop ``j == i``), then the
  6 self-image edges per atom. Baseline.
* ``reference`` — ``e3relax_fast.build_graph(..., backend="reference")`` on the whole mix,
  batched in chunks of about ``--chunk-atoms`` atoms. Second baseline.
* ``cpu`` / ``cuda`` / ``triton`` — further e3relax_fast backends, added automatically when
  ``e3relax_fast.ops.available(ops.RADIUS_GRAPH)`` lists them (``cuda``/``triton`` only when
  CUDA is available). Where ``cpu`` runs its AVX-512 paths, ``cpu-portable`` is the same backend
  without them (``path="portable"``: what CPUs without AVX-512 run).
* ``vesin``, ``matscipy``, ``ase`` — radius-only neighbour lists (full list, per structure).
  They do **less work**: no top-K selection, no fixed self-image edges.

Throughput: structures/s, atoms/s and pairs/s, where *pairs* is the number of candidate pairs
within 6 Å in the inputs (periodic self-images included, the zero-offset self pair excluded),
counted once and identical for every provider. Ratios are ``baseline_s / provider_s``.

    python -m bench.bench_radius_graph               # ~1,000-crystal MP-like mix
    python -m bench.bench_radius_graph --n 5000      # bigger mix
    python -m bench.bench_radius_graph --scaling     # 8 .. 20,000 atoms
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from . import harness, inputs, report

BENCH = "radius_graph"
RADIUS = 6.0
MAX_NEIGHBORS = 50
SELF_IMAGES = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# original: pymatgen neighbour list + per-centre Python top-K (reimplemented from its description)
# --------------------------------------------------------------------------------------------
def original_graph(structure, radius: float = RADIUS, max_neighbors: int = MAX_NEIGHBORS):
    """``(edge_index (2, E), cell_offsets (E, 3))`` of one pymatgen Structure, original style."""
    centers, neighbors, images, dists = structure.get_neighbor_list(
        r=radius, numerical_tol=0, exclude_self=True
    )
    n = len(structure)
    # Group candidates by centre once (a stable sort keeps pymatgen's order within a centre).
    order = np.argsort(centers, kind="stable")
    bounds = np.searchsorted(centers[order], np.arange(n + 1))
    src, dst, off = [], [], []
    for i in range(n):
        cand = order[bounds[i] : bounds[i + 1]]
        keep = cand[np.argsort(dists[cand])[:max_neighbors]]
        keep = keep[neighbors[keep] != i]
        src.append(neighbors[keep])
        dst.append(np.full(len(keep), i, dtype=np.int64))
        off.append(images[keep])
    atoms = np.arange(n, dtype=np.int64)
    src.append(np.repeat(atoms, 6))
    dst.append(np.repeat(atoms, 6))
    off.append(np.tile(SELF_IMAGES, (n, 1)))
    edge_index = np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64)
    return edge_index, np.concatenate(off).astype(np.int64)


def _make_original(_pymatgen) -> harness.Provider:
    from pymatgen.core import Lattice, Structure

    def prepare(triples):
        return [Structure(Lattice(c), z, p, coords_are_cartesian=True) for z, p, c in triples]

    def run(structures):
        return sum(original_graph(s)[0].shape[1] for s in structures)

    return harness.Provider("original", "pymatgen", "cpu", prepare, run, threads="1")


# --------------------------------------------------------------------------------------------
# e3relax_fast backends (reference, and cpu/cuda/triton when registered)
# --------------------------------------------------------------------------------------------
def _make_ours(e3r, chunk_atoms: int) -> list[harness.Provider]:
    import torch

    from e3relax_fast import ops
    from e3relax_fast.ops import compiled

    names = ops.available(ops.RADIUS_GRAPH)
    out = []
    for backend in names:
        devices = []
        if backend in ("reference", "cpu"):
            devices.append("cpu")
        if torch.cuda.is_available() and backend in ("reference", "cuda", "triton"):
            devices.append("cuda")
        for device in devices:

            def prepare(triples, device=device):
                batches = []
                for chunk in inputs.chunks_by_atoms(triples, chunk_atoms):
                    b = e3r.Batch.from_arrays(chunk, dtype=torch.float64).to(device)
                    batches.append((b.positions, b.cells, b.ptr))
                return batches

            def run(batches, backend=backend):
                total = 0
                for pos, cells, ptr in batches:
                    g = e3r.build_graph(pos, cells, ptr, RADIUS, MAX_NEIGHBORS, backend=backend)
                    total += g.edge_index.shape[1]
                return total

            name = backend if device == "cpu" else f"{backend}@cuda"
            threads = str(torch.get_num_threads()) if device == "cpu" else "GPU"
            out.append(harness.Provider(name, backend, device, prepare, run, threads=threads))
            if backend == "cpu" and getattr(compiled._C, "CPU_AVX512", False):
                out.append(_portable_provider(prepare, threads))
    return out


def _portable_provider(prepare, threads: str) -> harness.Provider:
    """``cpu-portable``: the `cpu` backend without its AVX-512 paths (``path="portable"``), what a CPU
    without AVX-512 (most laptops, ARM) runs; listed only where the default `cpu` takes the AVX-512 paths."""
    from e3relax_fast.ops import compiled

    def run(batches):
        total = 0
        for pos, cells, ptr in batches:
            total += compiled.radius_graph_cpu(pos, cells, ptr, RADIUS, MAX_NEIGHBORS, path="portable")[0].shape[1]
        return total

    return harness.Provider("cpu-portable", "cpu (portable)", "cpu", prepare, run, threads=threads)


# --------------------------------------------------------------------------------------------
# Radius-only neighbour lists (less work: no top-K, no fixed self-image edges)
# --------------------------------------------------------------------------------------------
RADIUS_ONLY = "radius only: no top-50, no self-image edges"


def _make_vesin(vesin) -> harness.Provider:
    import torch

    threads = torch.get_num_threads()  # same thread count as our backends

    def prepare(triples):
        nl = vesin.NeighborList(cutoff=RADIUS, full_list=True, n_threads=threads)
        return nl, [(p, c) for _, p, c in triples]

    def run(state):
        nl, systems = state
        return sum(len(nl.compute(p, c, True, quantities="ijSd")[0]) for p, c in systems)

    return harness.Provider(
        "vesin", "vesin", "cpu", prepare, run, less_work=RADIUS_ONLY, threads=str(threads)
    )


def _make_matscipy(_matscipy) -> harness.Provider:
    from matscipy.neighbours import neighbour_list

    def prepare(triples):
        return [(p, c) for _, p, c in triples]

    def run(systems):
        pbc = np.array([True, True, True])
        return sum(
            len(neighbour_list("ijSd", positions=p, cell=c, pbc=pbc, cutoff=RADIUS)[0]) for p, c in systems
        )

    return harness.Provider("matscipy", "matscipy", "cpu", prepare, run, less_work=RADIUS_ONLY, threads="1")


def _make_ase(_ase) -> harness.Provider:
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    def prepare(triples):
        return [Atoms(numbers=z, positions=p, cell=c, pbc=True) for z, p, c in triples]

    def run(atoms_list):
        return sum(len(neighbor_list("ijSd", a, RADIUS)[0]) for a in atoms_list)

    return harness.Provider("ase", "ase", "cpu", prepare, run, less_work=RADIUS_ONLY, threads="1")


def build_registry(chunk_atoms: int = 2048) -> harness.Registry:
    reg = harness.Registry()
    reg.add_if("original", "pymatgen.core", _make_original)
    reg.add_if("reference", "e3relax_fast", lambda m: _make_ours(m, chunk_atoms))
    reg.add_if("vesin", "vesin", _make_vesin)
    reg.add_if("matscipy", "matscipy.neighbours", _make_matscipy)
    reg.add_if("ase", "ase.neighborlist", _make_ase)
    return reg


# --------------------------------------------------------------------------------------------
# Canonical pair count (the "pairs" of pairs/s) and edge counts for checks
# --------------------------------------------------------------------------------------------
def candidate_pairs(triple) -> int:
    """Pairs within ``RADIUS`` (periodic self-images in, zero-offset self pair out), via pymatgen
    with the zero-offset self pairs filtered explicitly (robust to its rounding)."""
    from pymatgen.core import Lattice, Structure

    z, p, c = triple
    s = Structure(Lattice(c), z, p, coords_are_cartesian=True)
    ci, ni, img, _ = s.get_neighbor_list(r=RADIUS, numerical_tol=0, exclude_self=False)
    zero_self = (ci == ni) & np.all(img == 0, axis=1)
    return int((~zero_self).sum())


def candidate_pairs_fallback(triple) -> int:
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    z, p, c = triple
    return len(neighbor_list("i", Atoms(numbers=z, positions=p, cell=c, pbc=True), RADIUS))


def candidate_pairs_ours(triples) -> int:
    """The same count from ``build_graph(...).num_candidates`` (for machines without pymatgen/ASE,
    such as the GPU machine); checked equal to the pymatgen count on 300 crystals of the mix."""
    import torch

    from e3relax_fast import Batch, build_graph

    total = 0
    for chunk in inputs.chunks_by_atoms(triples, 20000):
        b = Batch.from_arrays(chunk, dtype=torch.float64)
        total += int(build_graph(b.positions, b.cells, b.ptr, RADIUS, MAX_NEIGHBORS).num_candidates.sum())
    return total


def count_pairs(triples) -> int:
    if harness.optional_import("pymatgen.core")[1] is None:
        return sum(candidate_pairs(t) for t in triples)
    if harness.optional_import("ase")[1] is None:
        return sum(candidate_pairs_fallback(t) for t in triples)
    return candidate_pairs_ours(triples)


def check_note(provider: harness.Provider, count: int, pairs: int, edges_by: dict[str, int]) -> str:
    """Sanity check of a provider's output size against the canonical counts."""
    if provider.less_work:
        return "pairs match" if count == pairs else f"pairs differ: {count} vs {pairs}"
    ref = edges_by.get("reference", edges_by.get("original"))
    if ref is None or count == ref:
        return f"{count} edges"
    return f"{count} edges ({count - ref:+d} vs {'reference' if 'reference' in edges_by else 'original'})"


# --------------------------------------------------------------------------------------------
# Equivalence check: original (with its 49-slot effect emulated) == reference, edge for edge
# --------------------------------------------------------------------------------------------
def verify(triples) -> str:
    """Compare the ``original`` edge sets with ``build_graph(..., backend="reference")`` given the
    original's 49-slot atoms as ``reserved`` (spec §3.2). Untimed. Returns a one-line summary."""
    import torch
    from pymatgen.core import Lattice, Structure

    from e3relax_fast import build_graph

    differ = slot49 = 0
    for z, p, c in triples:
        s = Structure(Lattice(c), z, p, coords_are_cartesian=True)
        ei, off = original_graph(s)
        ci, ni, img, _ = s.get_neighbor_list(r=RADIUS, numerical_tol=0, exclude_self=True)
        reserved = np.zeros(len(z), dtype=np.int64)
        zero_self = (ci == ni) & np.all(img == 0, axis=1)
        reserved[ci[zero_self]] = 1
        slot49 += int(reserved.sum())
        g = build_graph(torch.tensor(p), torch.tensor(c)[None], torch.tensor([0, len(z)]), RADIUS,
                        MAX_NEIGHBORS, backend="reference", reserved=torch.from_numpy(reserved))
        ours = np.concatenate([g.edge_index.numpy().T, g.cell_offsets.numpy()], 1)
        theirs = np.concatenate([ei.T, off], 1)
        if set(map(tuple, ours.tolist())) != set(map(tuple, theirs.tolist())):
            differ += 1
    return (
        f"`original` vs `reference` (with `reserved` = the original's {slot49} 49-slot atoms): "
        f"{len(triples) - differ} of {len(triples)} crystals have identical edge sets"
        + (f", {differ} differ (ties at the 50th neighbour?)" if differ else "")
    )


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def _ratio(r: harness.Result, base: str) -> str:
    return report.fmt_ratio(r.ratios.get(base))


def run_mix(n: int = 1000, seed: int = 0, repeats: int = 3, warmup: int = 1, chunk_atoms: int = 2048,
            providers: list[str] | None = None, verify_n: int = 0, info: dict | None = None):
    """Benchmark on the MP-like mix. Returns ``(markdown, results)``."""
    triples = inputs.mp_like_mix(n, seed=seed)
    atoms = sum(len(t[0]) for t in triples)
    pairs = count_pairs(triples)
    case = f"mp_like n={n} seed={seed}"
    print(f"[{BENCH}] {inputs.describe(triples)}; {pairs} candidate pairs within {RADIUS} Å", flush=True)
    reg = build_registry(chunk_atoms)
    provs = reg.select(providers)
    states = {p.name: p.prepare(triples) for p in provs}
    counts = {p.name: p.run(states[p.name]) for p in provs}  # also checks that each provider runs
    fns = {p.name: (lambda p=p: p.run(states[p.name])) for p in provs}
    print(f"[{BENCH}] timing {', '.join(fns)} interleaved", flush=True)
    times = harness.measure_interleaved(fns, repeats, warmup)
    results: list[harness.Result] = []
    for prov in provs:
        ts = times[prov.name]
        t = statistics.median(ts)
        print(f"[{BENCH}] {prov.name:<10} {report.fmt_time(t):>10}  ({len(ts)} timed)", flush=True)
        results.append(harness.Result(
            BENCH, prov.name, prov.backend, prov.device, case, t, n / t, "structures/s",
            extra={"atoms_per_s": round(atoms / t, 1), "pairs_per_s": round(pairs / t, 1),
                   "output": counts[prov.name], "timed_calls": len(ts), "min_s": round(min(ts), 6),
                   "threads": prov.threads},
            note=prov.less_work or "",
        ))
    harness.add_ratios(results, ["original", "reference"])
    edges_by = {p.name: counts[p.name] for p in provs if not p.less_work}
    rows = []
    for r, prov in zip(results, provs, strict=True):
        rows.append([
            f"`{r.provider}`", r.backend, r.device, r.extra["threads"],
            "full graph" if not prov.less_work else f"**less**: {prov.less_work}",
            f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})",
            report.fmt_num(r.throughput), report.fmt_num(atoms / r.median_s),
            report.fmt_num(pairs / r.median_s), _ratio(r, "original"), _ratio(r, "reference"),
            check_note(prov, counts[r.provider], pairs, edges_by),
        ])
    table = report.markdown_table(
        ["provider", "backend", "device", "threads", "work", "median (min)", "structures/s", "atoms/s",
         "pairs/s", "× vs original", "× vs reference", "output check"],
        rows,
    )
    notes = "".join(f"\n- skipped `{name}`: {why}" for name, why in reg.skipped)
    if verify_n and "original" in counts and "reference" in counts:
        line = verify(triples[:verify_n])
        print(f"[{BENCH}] verify: {line}", flush=True)
        notes += f"\n- check (first {min(verify_n, n)} crystals): {line}"
    md = (
        f"### Graph building, MP-like mix\n\n{inputs.describe(triples)}; {pairs:,} candidate pairs "
        f"≤ {RADIUS} Å. Median of {repeats} timed calls after {warmup} warm-up call(s), providers "
        f"interleaved round-robin (a call over 5 s is timed once). Our backends (`reference`, `cpu`, ...) "
        f"build the mix in batches of ≤ {chunk_atoms} atoms, one call per batch; the others one structure at "
        f"a time. × = baseline time / provider time (> 1 is faster). pairs/s counts the same candidate pairs "
        f"for every provider.\n\n"
        f"{table}\n{notes}\n"
    )
    report.append_csv(results, BENCH, baseline="original", info=info)
    return md, results


def run_scaling(sizes=inputs.SCALING_SIZES, repeats: int = 3, warmup: int = 1, chunk_atoms: int = 2048,
                budget_s: float = 60.0, providers: list[str] | None = None, info: dict | None = None):
    """One diamond supercell per size; a provider is skipped at a size whose estimated time
    (last time × size ratio × 1.5) exceeds ``budget_s``. Returns ``(markdown, results)``."""
    series = inputs.scaling_series(tuple(sizes))
    reg = build_registry(max(chunk_atoms, max(len(t[0]) for t in series)))
    provs = reg.select(providers)
    last: dict[str, tuple[int, float]] = {}
    skipped_at: dict[str, str] = {}
    results: list[harness.Result] = []
    pair_counts = {}
    for triple in series:
        natoms = len(triple[0])
        pairs = pair_counts[natoms] = count_pairs([triple])
        case = f"diamond N={natoms}"
        fns, run_provs = {}, []
        for prov in provs:
            if prov.name in last:
                n0, t0 = last[prov.name]
                est = t0 * natoms / n0 * 1.5
                if est > budget_s:
                    why = f"skipped from N={natoms} (estimated {est:.0f} s > {budget_s:.0f} s)"
                    skipped_at.setdefault(prov.name, why)
                    continue
            state = prov.prepare([triple])
            fns[prov.name] = lambda prov=prov, state=state: prov.run(state)
            run_provs.append(prov)
        times = harness.measure_interleaved(fns, repeats, warmup)
        for prov in run_provs:
            ts = times[prov.name]
            t = statistics.median(ts)
            last[prov.name] = (natoms, t)
            print(f"[{BENCH} scaling] N={natoms:<6} {prov.name:<10} {report.fmt_time(t):>10}", flush=True)
            results.append(harness.Result(
                BENCH + "_scaling", prov.name, prov.backend, prov.device, case, t, natoms / t, "atoms/s",
                extra={"pairs_per_s": round(pairs / t, 1), "timed_calls": len(ts),
                       "min_s": round(min(ts), 6), "threads": prov.threads},
                note=prov.less_work or "",
            ))
    harness.add_ratios(results, ["original", "reference"])
    names = [p.name for p in provs]
    by = {(r.case, r.provider): r for r in results}
    rows = []
    for triple in series:
        natoms = len(triple[0])
        row = [f"{natoms:,}", f"{pair_counts[natoms]:,}"]
        for name in names:
            r = by.get((f"diamond N={natoms}", name))
            if r is None:
                row.append("skipped")
                continue
            vs = [f"{tag} {report.fmt_ratio(r.ratios[b])}" for b, tag in (("original", "o"), ("reference", "r"))
                  if b in r.ratios and b != name]
            row.append(report.fmt_time(r.median_s) + (f" ({', '.join(vs)})" if vs else ""))
        rows.append(row)
    less = [p.name for p in provs if p.less_work]
    table = report.markdown_table(["atoms", "pairs ≤ 6 Å"] + [f"`{n}`" for n in names], rows)
    notes = "".join(f"\n- `{name}`: {why}" for name, why in skipped_at.items())
    notes += "".join(f"\n- skipped `{name}`: {why}" for name, why in reg.skipped)
    md = (
        f"### Graph building, scaling series (one rattled diamond supercell per size)\n\n"
        f"Median time per structure (providers interleaved; a call over 5 s is timed once); in "
        f"brackets: o = `original` time / provider time, r = `reference` time / provider time "
        f"(> 1: faster). Radius-only (less work): "
        f"{', '.join(f'`{n}`' for n in less) or 'none'}.\n\n{table}\n{notes}\n"
    )
    report.append_csv(results, BENCH + "_scaling", baseline="reference", info=info)
    return md, results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_radius_graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="crystals in the MP-like mix (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-atoms", type=int, default=2048, help="atoms per build_graph call (ours)")
    ap.add_argument("--providers", nargs="*", help="subset of providers (default: all available)")
    ap.add_argument("--verify", type=int, default=0, metavar="N",
                    help="also check original == reference edge sets on the first N crystals (untimed)")
    ap.add_argument("--scaling", action="store_true", help="run the 8..20,000-atom scaling series instead")
    ap.add_argument("--sizes", type=int, nargs="*", default=list(inputs.SCALING_SIZES))
    ap.add_argument("--budget-s", type=float, default=60.0, help="scaling: skip a provider above this")
    ap.add_argument("--threads", type=int, default=0, help="torch (and vesin) threads; 0 = torch default")
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    info = harness.machine()
    cmd = "python -m bench.bench_radius_graph " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report.header_md("Graph building", cmd.strip(), info))
    if args.scaling:
        md, _ = run_scaling(args.sizes, args.repeats, args.warmup, args.chunk_atoms, args.budget_s,
                            args.providers, info)
    else:
        md, _ = run_mix(args.n, args.seed, args.repeats, args.warmup, args.chunk_atoms, args.providers,
                        args.verify, info)
    print(md)


if __name__ == "__main__":
    main()
