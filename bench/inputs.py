"""Deterministic benchmark inputs built from the seed crystals in ``shared/data``.

This module imports nothing else from ``bench`` (numpy, and ASE to read the seed files), so that it
also loads on its own from its file path, as ``tests/test_bench_inputs.py`` may load it.

Two generators, both returning lists of ``(z, positions, cell)`` numpy triples
(``z``: ``(n,)`` int64; ``positions``: ``(n, 3)`` float64 Å; ``cell``: ``(3, 3)`` float64 Å, rows are
the lattice vectors):

* :func:`mp_like_mix` — an "MP-like mix" of 1–64-atom crystals. Sizes are drawn from a hand-set
  histogram that roughly follows the Materials Project's atoms-per-cell distribution below 64
  atoms (it is *not* fitted to MP); each crystal is a seed (OQMD, perov_5, carbon_24, the
  unrelaxed CHGNet-pair CIFs, or a 1–2-atom elemental cell from ASE's reference lattice
  constants), replicated into a supercell to reach the drawn size, then given a small random
  symmetric strain (|e_ij| ≤ 3 %) and rattle (σ = 0.02 Å). Positions are not wrapped.
* :func:`scaling_series` — one crystal per size, 8 to 20,000 atoms: near-cubic supercells of
  the 8-atom conventional diamond cell (0.176 atoms/Å³, denser than every seed file crystal, so
  each atom has ~160 candidates within 6 Å and the top-50 cut always bites), rattled by 0.01 Å
  so that no two candidate distances tie exactly.

Everything is seeded: the same arguments give bit-identical arrays on every machine (given the
same seed files). Run ``python -m bench.inputs`` for a summary of both sets.

**Cached inputs.** The seed files live outside the repository (``../shared/data``) and reading them
needs ASE, so machines without either (the GPU machine, CI) use ``bench/data/mp_like_1000.npz``:
the default mix (``n=1000, seed=0``, default strain and rattle) as concatenated arrays (``z`` uint8,
``positions`` and ``cells`` float64, ``ptr`` int64; plus each crystal's ``sources`` label), written by
``python -m bench.inputs --write-cache``. :func:`mp_like_mix` generates when it can and otherwise
serves the first ``n <= 1000`` crystals from the cache (the mix is generated crystal by crystal from
one RNG stream, so the first ``n`` of 1000 are the mix of ``n``). ``tests/test_bench_inputs.py``
checks that the cache equals a fresh generation. ``E3RELAX_BENCH_INPUTS=cached`` (or
``generate``) forces one source; the default is ``auto``. The scaling series needs no files.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from pathlib import Path

import numpy as np

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]

_REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("E3RELAX_DATA", _REPO.parent / "shared" / "data"))
CACHE_PATH = Path(__file__).resolve().parent / "data" / "mp_like_1000.npz"
# The generator arguments the cache was made with (the defaults of mp_like_mix), and its size.
CACHE_N = 1000
CACHE_ARGS = {"seed": 0, "max_atoms": 64, "max_strain": 0.03, "sigma": 0.02}
SEED_FILES = ("seeds/oqmd_200.extxyz", "seeds/perov_5_val.csv", "seeds/carbon_24_val.csv", "pairs/chgnet_v1/CIF")

# Hand-set size histogram (atoms per cell, inclusive bins) -> weight. Roughly MP-shaped:
# few 1–2-atom cells, most mass between 5 and 32 atoms, a tail up to 64.
SIZE_BINS: tuple[tuple[int, int, float], ...] = (
    (1, 2, 0.04),
    (3, 4, 0.09),
    (5, 8, 0.20),
    (9, 16, 0.26),
    (17, 32, 0.24),
    (33, 64, 0.17),
)

# How many crystals of each seed file enter the pool (chosen with a fixed RNG).
POOL_SIZES = {"perov_5": 150, "carbon_24": 150, "chgnet_pairs": 150}

# Default sizes of the scaling series (atoms).
SCALING_SIZES: tuple[int, ...] = (8, 64, 216, 512, 1000, 2000, 4096, 8000, 12000, 20000)


# --------------------------------------------------------------------------------------------
# Seed pool
# --------------------------------------------------------------------------------------------
def _atoms_to_triple(atoms) -> Triple:
    return (
        np.asarray(atoms.numbers, dtype=np.int64).copy(),
        np.asarray(atoms.positions, dtype=np.float64).copy(),
        np.asarray(atoms.cell[:], dtype=np.float64).copy(),
    )


def _read_cif_column(path: Path, count: int, rng: np.random.Generator) -> list[Triple]:
    import ase.io

    csv.field_size_limit(1 << 30)
    with open(path, newline="") as fh:
        cifs = [row["cif"] for row in csv.DictReader(fh)]
    picks = np.sort(rng.choice(len(cifs), size=min(count, len(cifs)), replace=False))
    return [_atoms_to_triple(ase.io.read(io.StringIO(cifs[k]), format="cif")) for k in picks]


def _elemental_cells() -> list[Triple]:
    """1- and 2-atom cells (fcc/bcc/sc primitive: 1 atom; hcp/diamond: 2) of the elements
    whose ASE reference state is one of those lattices."""
    from ase.build import bulk
    from ase.data import reference_states

    out = []
    for z, ref in enumerate(reference_states):
        if not ref or z == 0 or z > 83:
            continue
        sym = ref.get("symmetry")
        if sym not in ("fcc", "bcc", "sc", "hcp", "diamond"):
            continue
        from ase.data import chemical_symbols

        try:
            atoms = bulk(chemical_symbols[z], sym)
        except Exception:  # noqa: BLE001 - any element ASE cannot build is simply skipped
            continue
        if len(atoms) <= 2:
            out.append(_atoms_to_triple(atoms))
    return out


@functools.lru_cache(maxsize=4)
def seed_pool(data_dir: str = str(DATA_DIR)) -> dict[str, list[Triple]]:
    """Seed crystals by source. Deterministic (fixed RNG for the CSV subsets)."""
    import ase.io

    root = Path(data_dir)
    rng = np.random.default_rng(20240611)
    pool: dict[str, list[Triple]] = {}
    pool["oqmd"] = [_atoms_to_triple(a) for a in ase.io.read(root / "seeds" / "oqmd_200.extxyz", index=":")]
    pool["perov_5"] = _read_cif_column(root / "seeds" / "perov_5_val.csv", POOL_SIZES["perov_5"], rng)
    pool["carbon_24"] = _read_cif_column(root / "seeds" / "carbon_24_val.csv", POOL_SIZES["carbon_24"], rng)
    cifs = sorted((root / "pairs" / "chgnet_v1" / "CIF").glob("*_unrelaxed.cif"))
    picks = np.sort(rng.choice(len(cifs), size=min(POOL_SIZES["chgnet_pairs"], len(cifs)), replace=False))
    pool["chgnet_pairs"] = [_atoms_to_triple(ase.io.read(cifs[k], format="cif")) for k in picks]
    pool["elemental"] = _elemental_cells()
    return pool


# Probability of drawing each source (renormalised over the sources that can reach a size bin).
SOURCE_WEIGHTS = {"oqmd": 0.40, "perov_5": 0.15, "carbon_24": 0.15, "chgnet_pairs": 0.20, "elemental": 0.03}


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def near_cubic_factors(m: int) -> tuple[int, int, int]:
    """``(a, b, c)`` with ``a * b * c == m``, ``a <= b <= c`` and the smallest ``c / a``."""
    best = (1, 1, m)
    for a in range(1, int(round(m ** (1 / 3))) + 2):
        if m % a:
            continue
        rest = m // a
        for b in range(a, int(rest**0.5) + 2):
            if rest % b or rest // b < b:
                continue
            c = rest // b
            if c / a < best[2] / best[0]:
                best = (a, b, c)
    return best


def supercell(triple: Triple, reps: tuple[int, int, int]) -> Triple:
    """Replicate ``reps[k]`` times along lattice vector ``k`` (atom-major within each image)."""
    z, pos, cell = triple
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
    shifts = grid.astype(np.float64) @ cell
    new_pos = (shifts[:, None, :] + pos[None, :, :]).reshape(-1, 3)
    new_z = np.tile(z, len(grid))
    new_cell = cell * np.asarray(reps, dtype=np.float64)[:, None]
    return new_z, new_pos, new_cell


def _reps_for(cell: np.ndarray, m: int) -> tuple[int, int, int]:
    """Spread multiplier ``m`` over the lattice vectors, the largest factor on the shortest one."""
    f = sorted(near_cubic_factors(m), reverse=True)
    order = np.argsort(np.linalg.norm(cell, axis=1), kind="stable")
    reps = [1, 1, 1]
    for k, axis in enumerate(order):
        reps[int(axis)] = f[k]
    return reps[0], reps[1], reps[2]


def strain_rattle(triple: Triple, rng: np.random.Generator, max_strain: float, sigma: float) -> Triple:
    """Symmetric strain (entries in ``[-max_strain, max_strain]``) and Gaussian rattle (Å)."""
    z, pos, cell = triple
    e = rng.uniform(-max_strain, max_strain, size=(3, 3))
    deform = np.eye(3) + 0.5 * (e + e.T)
    return z.copy(), pos @ deform + rng.normal(0.0, sigma, size=pos.shape), cell @ deform


# --------------------------------------------------------------------------------------------
# Cache (for machines without the seed files or ASE)
# --------------------------------------------------------------------------------------------
def seeds_available(data_dir: str | Path = DATA_DIR) -> tuple[bool, str]:
    """``(True, "")`` if the seed files and ASE (needed to read them) are here, else ``(False, why)``."""
    root = Path(data_dir)
    missing = [f for f in SEED_FILES if not (root / f).exists()]
    if missing:
        return False, f"seed files not found under {root} ({', '.join(missing)})"
    try:
        import ase.io  # noqa: F401
    except ImportError as exc:
        return False, f"ASE is not importable ({exc}); it reads the seed files"
    return True, ""


def write_cache(path: str | Path = CACHE_PATH) -> Path:
    """Generate the default 1,000-crystal mix and store it, compressed, at ``path``."""
    triples, sources = _generate(CACHE_N, return_sources=True, **CACHE_ARGS)
    counts = np.array([len(t[0]) for t in triples], dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        z=np.concatenate([t[0] for t in triples]).astype(np.uint8),  # Z <= 118
        positions=np.concatenate([t[1] for t in triples]).astype(np.float64),
        cells=np.stack([t[2] for t in triples]).astype(np.float64),
        ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        sources=np.array(sources),
        args=np.array(repr(dict(CACHE_ARGS, n=CACHE_N))),
    )
    return path


def load_cache(n: int = CACHE_N, path: str | Path = CACHE_PATH, return_sources: bool = False):
    """The first ``n`` (<= 1000) crystals of the cached default mix, as :func:`mp_like_mix` returns them."""
    with np.load(path) as f:
        z, pos, cells, ptr = f["z"], f["positions"], f["cells"], f["ptr"]
        sources = [str(s) for s in f["sources"]]
    if n > len(cells):
        raise ValueError(f"the cache {path} holds {len(cells)} crystals, {n} were asked for")
    out = [
        (z[ptr[k]:ptr[k + 1]].astype(np.int64), pos[ptr[k]:ptr[k + 1]].copy(), cells[k].copy())
        for k in range(n)
    ]
    return (out, sources[:n]) if return_sources else out


def _input_mode() -> str:
    mode = os.environ.get("E3RELAX_BENCH_INPUTS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "cached", "generate"):
        raise ValueError(f"E3RELAX_BENCH_INPUTS={mode!r}: expected auto, cached or generate")
    return mode


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------
def mp_like_mix(
    n: int = 1000,
    seed: int = 0,
    max_atoms: int = 64,
    max_strain: float = 0.03,
    sigma: float = 0.02,
    return_sources: bool = False,
):
    """``n`` crystals of 1..``max_atoms`` atoms (see module docstring). Deterministic in ``seed``.

    With ``return_sources=True`` returns ``(triples, sources)`` where ``sources[k]`` names the seed
    file and supercell of crystal ``k`` (e.g. ``"oqmd[17]x2x1x1"``).

    Generated from the seed files when they (and ASE) are here; otherwise, for the default
    arguments and ``n <= 1000``, read from ``bench/data/mp_like_1000.npz`` (identical arrays).
    ``E3RELAX_BENCH_INPUTS=cached|generate`` forces one source.
    """
    kwargs = {"seed": seed, "max_atoms": max_atoms, "max_strain": max_strain, "sigma": sigma}
    mode = _input_mode()
    cacheable = kwargs == CACHE_ARGS and n <= CACHE_N and CACHE_PATH.exists()
    if mode == "cached" or (mode == "auto" and cacheable and not seeds_available()[0]):
        if not cacheable:
            raise ValueError(f"the cached mix {CACHE_PATH} serves only n <= {CACHE_N} with {CACHE_ARGS} "
                             f"(asked: n={n}, {kwargs}; cache present: {CACHE_PATH.exists()})")
        return load_cache(n, return_sources=return_sources)
    ok, why = seeds_available()
    if not ok:
        raise FileNotFoundError(
            f"cannot generate the MP-like mix: {why}; the cache {CACHE_PATH} covers only n <= {CACHE_N} "
            f"with {CACHE_ARGS} (set E3RELAX_DATA to the data folder)"
        )
    return _generate(n, return_sources=return_sources, **kwargs)


def _generate(n: int, seed: int, max_atoms: int, max_strain: float, sigma: float, return_sources: bool):
    pool = seed_pool()
    rng = np.random.default_rng(seed)
    bins = [(lo, min(hi, max_atoms), w) for lo, hi, w in SIZE_BINS if lo <= max_atoms]
    weights = np.array([w for _, _, w in bins])
    weights /= weights.sum()
    out: list[Triple] = []
    sources: list[str] = []
    for _ in range(n):
        lo, hi, _w = bins[rng.choice(len(bins), p=weights)]
        target = int(rng.integers(lo, hi + 1))
        # Seeds that some integer multiple brings into [lo, target].
        options: list[tuple[str, int]] = []
        opt_w: list[float] = []
        for name, crystals in pool.items():
            ok = [
                k for k, t in enumerate(crystals)
                if len(t[0]) <= target and (target // len(t[0])) * len(t[0]) >= lo
            ]
            for k in ok:
                options.append((name, k))
                opt_w.append(SOURCE_WEIGHTS[name] / len(ok))
        p = np.asarray(opt_w) / np.sum(opt_w)
        name, k = options[rng.choice(len(options), p=p)]
        base = pool[name][k]
        m = target // len(base[0])
        reps = _reps_for(base[2], m)
        crystal = supercell(base, reps) if m > 1 else base
        out.append(strain_rattle(crystal, rng, max_strain, sigma))
        sources.append(f"{name}[{k}]x{reps[0]}x{reps[1]}x{reps[2]}")
    return (out, sources) if return_sources else out


def diamond_cell(a: float = 3.567) -> Triple:
    """Conventional cubic diamond (8 C atoms), lattice constant ``a`` Å."""
    frac = np.array(
        [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
         [0.25, 0.25, 0.25], [0.25, 0.75, 0.75], [0.75, 0.25, 0.75], [0.75, 0.75, 0.25]]
    )  # fmt: skip
    cell = np.eye(3) * a
    return np.full(8, 6, dtype=np.int64), frac @ cell, cell


def scaling_series(
    sizes: tuple[int, ...] = SCALING_SIZES, seed: int = 0, sigma: float = 0.01
) -> list[Triple]:
    """One diamond supercell per entry of ``sizes`` (each rounded to a multiple of 8 atoms)."""
    rng = np.random.default_rng(seed)
    base = diamond_cell()
    out = []
    for size in sizes:
        m = max(1, int(round(size / 8)))
        z, pos, cell = supercell(base, near_cubic_factors(m))
        out.append((z, pos + rng.normal(0.0, sigma, size=pos.shape), cell))
    return out


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


def describe(triples: list[Triple]) -> str:
    """One line of size statistics."""
    n = np.array([len(t[0]) for t in triples])
    if len(n) == 0:
        return "0 crystals"
    q = np.percentile(n, [50, 90])
    return (
        f"{len(n)} crystals, {int(n.sum())} atoms; atoms/crystal min {n.min()}, median {q[0]:g}, "
        f"p90 {q[1]:g}, max {n.max()}, mean {n.mean():.1f}"
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Describe (or cache) the benchmark inputs.")
    ap.add_argument("n", nargs="?", type=int, default=1000, help="crystals in the mix (1000)")
    ap.add_argument("--write-cache", action="store_true", help=f"(re)write {CACHE_PATH.name} from the seed files")
    args = ap.parse_args()
    if args.write_cache:
        written = write_cache()
        print(f"wrote {written} ({written.stat().st_size / 1e3:.0f} kB)")
    count = args.n
    mix, src = mp_like_mix(count, return_sources=True)
    print("MP-like mix:", describe(mix), f"(seed files: {seeds_available()[1] or 'available'})")
    kinds: dict[str, int] = {}
    for s in src:
        kinds[s.split("[")[0]] = kinds.get(s.split("[")[0], 0) + 1
    print("  by source:", kinds)
    print("  supercells:", sum(1 for s in src if not s.endswith("x1x1x1")))
    print("scaling series:", [len(t[0]) for t in scaling_series()])
