"""The benchmark inputs that travel with the repository (bench/data/mp_like_1000.npz).

The cached MP-like mix must load anywhere (CI and the GPU machine have neither ../shared/data
nor ASE) and must equal a fresh generation from the seed files wherever those are present.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_inputs():
    spec = importlib.util.spec_from_file_location("_bench_inputs", BENCH / "inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


inputs = _load_inputs()


def test_cache_is_small_and_complete():
    path = inputs.CACHE_PATH
    assert path.exists(), f"{path} is missing: run `python -m bench.inputs --write-cache`"
    assert path.stat().st_size < 1_000_000
    with np.load(path) as f:
        assert {"z", "positions", "cells", "ptr", "sources"} <= set(f.files)
        assert f["positions"].dtype == np.float64 and f["cells"].dtype == np.float64
        assert f["ptr"][0] == 0 and f["ptr"][-1] == len(f["z"]) == len(f["positions"])


def test_cached_mix_loads_1000_crystals_of_1_to_64_atoms():
    triples, sources = inputs.load_cache(return_sources=True)
    assert len(triples) == len(sources) == 1000
    sizes = np.array([len(z) for z, _, _ in triples])
    assert sizes.min() >= 1 and sizes.max() <= 64
    assert 15_000 < sizes.sum() < 22_000  # ~18,000 atoms (bench/README.md)
    for z, pos, cell in triples:
        assert z.dtype == np.int64 and pos.dtype == np.float64 and cell.dtype == np.float64
        assert pos.shape == (len(z), 3) and cell.shape == (3, 3)
        assert np.all((z >= 1) & (z <= 118))
        assert np.all(np.isfinite(pos)) and abs(np.linalg.det(cell)) > 1.0
    first = inputs.load_cache(10)
    for a, b in zip(first, triples[:10], strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_forced_cache_through_mp_like_mix(monkeypatch):
    monkeypatch.setenv("E3RELAX_BENCH_INPUTS", "cached")
    mix = inputs.mp_like_mix(25)
    cached = inputs.load_cache(25)
    assert len(mix) == 25
    for a, b in zip(mix, cached, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="serves only"):
        inputs.mp_like_mix(25, seed=1)


def test_scaling_series_needs_no_files():
    series = inputs.scaling_series((8, 64, 1000))
    assert [len(t[0]) for t in series] == [8, 64, 1000]


def test_cache_equals_fresh_generation():
    ok, why = inputs.seeds_available()
    if not ok:
        pytest.skip(f"cannot regenerate the mix here: {why}")
    fresh, fresh_sources = inputs._generate(inputs.CACHE_N, return_sources=True, **inputs.CACHE_ARGS)
    cached, cached_sources = inputs.load_cache(return_sources=True)
    assert fresh_sources == cached_sources
    for k, (a, b) in enumerate(zip(fresh, cached, strict=True)):
        for name, x, y in zip(("z", "positions", "cell"), a, b, strict=True):
            assert x.dtype == y.dtype and _same(x, y), f"crystal {k}: {name} differs"
    # The mix of n crystals is the first n of the 1000 (what lets the cache serve any n <= 1000).
    small = inputs._generate(40, return_sources=False, **inputs.CACHE_ARGS)
    for a, b in zip(small, cached[:40], strict=True):
        assert all(_same(x, y) for x, y in zip(a, b, strict=True))


def _same(x: np.ndarray, y: np.ndarray) -> bool:
    """Integers equal; coordinates equal to 1e-12 Å: the generator's matrix products round
    differently in the last bit across NumPy releases (seen: ≤ 3.6e-15 Å with NumPy 2.4)."""
    if x.shape != y.shape:
        return False
    if np.issubdtype(x.dtype, np.floating):
        return bool(np.all(np.abs(x - y) <= 1e-12))
    return bool(np.array_equal(x, y))
