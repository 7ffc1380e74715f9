"""The C++ radius graph (backend ``cpu``, csrc/, ``e3relax_fast._C``): every named path against the
reference. (Its comparison through the op table, with the other backends, is in test_radius_graph.py.)

The C++ CPU launcher must reproduce the pure-PyTorch oracle (e3relax_fast/reference/radius_graph.py)
exactly: integer outputs equal, distances equal to the bit. Every CPU path is checked:

* ``path="auto"`` (default): the symmetric image-box enumeration for small crystals, the cell list above
  ``cell_list_threshold`` atoms; on CPUs with AVX-512 both run their AVX-512 paths (8-wide distance
  masks, vectorised sqrt/quantisation, bitonic key sort in registers; the cell list then reorders
  exactly tied keys by (neighbour, offset));
* ``path="portable"``: ``"auto"`` with the portable (non-AVX-512) paths, so both are compared here;
* ``path="brute_force"``: brute force with exact per-pair image bounds (the header's ``scan_pair``), or the
  cell list;
* ``path="warp_emulation"``: the CUDA kernel's warp algorithm (histogram pass, threshold, collect pass, rank sort,
  boundary fallback) emulated lane by lane with the same header functions the kernel calls.

``cell_list_threshold=0`` forces the cell list on every crystal, a huge threshold forces brute force.
The CUDA launcher itself runs in test_radius_graph.py (marker ``gpu``); ``test_cuda_compiled_when_nvcc_present``
checks here that it was compiled in when nvcc exists.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GRAPH_CASES, fcc_supercell, graph_case, nvcc_present, random_batch

from e3relax_fast import build_graph, ops
from e3relax_fast.ops import compiled as _ext
from e3relax_fast.reference.radius_graph import radius_graph as reference

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.IMPORT_ERROR}")

BIG = 10**9  # cell_list_threshold that forces brute force
PATHS = [  # (path, cell_list_threshold)
    ("auto", None), ("auto", 0), ("auto", BIG), ("warp_emulation", 0), ("warp_emulation", BIG), ("brute_force", 0),
    ("brute_force", BIG), ("portable", BIG),
]


def assert_same(a, b, what=""):
    """Outputs equal exactly: same dtypes and shapes, integers equal, float64 equal to the bit."""
    names = ("edge_index", "cell_offsets", "rowptr", "distances", "num_candidates")
    for name, x, y in zip(names, a, b, strict=True):
        assert x.dtype == y.dtype, f"{what} {name}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{what} {name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if x.dtype == torch.float64:
            assert torch.equal(x.view(torch.int64), y.view(torch.int64)), f"{what} {name}: not bitwise equal"
        else:
            assert torch.equal(x, y), f"{what} {name}: differs"


def cpu(pos, cells, ptr, radius=6.0, k=50, reserved=None, **kw):
    return _ext.radius_graph_cpu(pos, cells, ptr, radius, k, reserved, **kw)


# --------------------------------------------------------------------------------------------------
# golden graphs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden(golden_graphs):
    arrays = golden_graphs
    n = len([k for k in arrays if k.endswith("_pos")])
    out = []
    for k in range(n):
        pos = torch.from_numpy(arrays[f"s{k}_pos"])
        out.append((pos, torch.from_numpy(arrays[f"s{k}_cell"]), torch.from_numpy(arrays[f"s{k}_zero_self"])))
    return out


@pytest.mark.parametrize("use_reserved", [False, True], ids=["plain", "reserved=zero_self"])
def test_golden_each_structure(golden, use_reserved):
    for k, (pos, cell, zero_self) in enumerate(golden):
        ptr = torch.tensor([0, pos.shape[0]])
        res = zero_self.to(torch.int64) if use_reserved else None
        ref = reference(pos, cell[None], ptr, 6.0, 50, res)
        for path, thr in PATHS:
            assert_same(ref, cpu(pos, cell[None], ptr, reserved=res, path=path, cell_list_threshold=thr),
                        f"s{k} path={path} thr={thr}")


def test_golden_batched_and_threads(golden):
    """All golden structures in one batch (1 to 90 atoms), bool `reserved`, 1 and 2 threads."""
    pos = torch.cat([p for p, _, _ in golden])
    cells = torch.stack([c for _, c, _ in golden])
    ptr = torch.tensor([0] + list(itertools.accumulate(p.shape[0] for p, _, _ in golden)))
    res = torch.cat([z for _, _, z in golden])  # bool
    ref = reference(pos, cells, ptr, 6.0, 50, res)
    for nt in (1, 2):
        assert_same(ref, cpu(pos, cells, ptr, reserved=res, num_threads=nt), f"threads={nt}")
        warp = cpu(pos, cells, ptr, reserved=res, num_threads=nt, path="warp_emulation", cell_list_threshold=16)
        assert_same(ref, warp)
    # the registered backend through the public entry point
    g = build_graph(pos, cells, ptr, 6.0, 50, backend="cpu", reserved=res)
    assert_same(ref, tuple(g))


# --------------------------------------------------------------------------------------------------
# randomized suite
# --------------------------------------------------------------------------------------------------
_batch = random_batch


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[f"seed{c[0]}" for c in GRAPH_CASES])
def test_random_suite(case):
    pos, cells, ptr, radius, k, reserved = graph_case(case)
    for res in reserved:
        ref = reference(pos, cells, ptr, radius, k, res)
        for path, thr in PATHS:
            for nt in (1, 2):
                out = cpu(pos, cells, ptr, radius, k, res, path=path, cell_list_threshold=thr, num_threads=nt)
                assert_same(ref, out, f"seed{case[0]} reserved={res is not None} path={path} thr={thr} threads={nt}")


def test_symmetric_lattice_ties():
    """Perfect fcc: many exactly tied keys at the cut (the (j, o) tie-break decides)."""
    pos, cells, ptr = fcc_supercell(3.6, 2)
    for k in (12, 50, 80):
        ref = reference(pos, cells, ptr, 6.0, k)
        for path, thr in PATHS:
            assert_same(ref, cpu(pos, cells, ptr, 6.0, k, path=path, cell_list_threshold=thr), f"{k} {path} {thr}")


def test_warp_boundary_fallback():
    """A 0.4 Å cubic cell with K = 6,000: the K-th key falls in a histogram bin holding more than
    BOUNDARY_CAP candidates, so the warp algorithm takes its sequential fallback."""
    a, radius, k = 0.4, 6.0, 6000
    g = np.arange(-16, 17)
    lat = np.array(list(itertools.product(g, g, g)), dtype=np.float64) * a
    d = np.sqrt((lat**2).sum(1))
    d = np.sort(d[(d <= radius) & (d > 0)])
    qmax = round(radius / 1e-6)
    bins = (np.round(d / 1e-6) * (_ext._C.HIST_BINS / (qmax + 1.0))).astype(np.int64)
    assert np.sum(bins == bins[k - 1]) > _ext._C.BOUNDARY_CAP  # the case is the intended one
    pos = torch.tensor([[0.05, 0.1, 0.15], [0.0, 0.0, 0.0], [0.25, 0.25, 0.25]], dtype=torch.float64)
    cells = torch.tensor(np.stack([np.eye(3) * a, np.eye(3) * 0.5]))
    ptr = torch.tensor([0, 1, 3])
    ref = reference(pos, cells, ptr, radius, k)
    for path, thr in PATHS:
        assert_same(ref, cpu(pos, cells, ptr, radius, k, path=path, cell_list_threshold=thr), f"{path} {thr}")


def _oracle_centre(pos, cell, i, radius, k):
    """Independent NumPy oracle for one centre of a one-crystal input: every (j, o) in a generous
    image box, lengths in the documented float64 order, key sort, cap, self-images dropped.
    Returns (E_i, 5) rows (j, o0, o1, o2, distance bits) and the candidate count."""
    inv = np.linalg.inv(cell)
    reach = radius * np.linalg.norm(inv, axis=0) + 1.0
    span = [np.arange(-int(np.ceil(r)) - 1, int(np.ceil(r)) + 2) for r in reach]
    frac = pos @ inv
    shift = np.floor(frac).astype(np.int64)
    imgs = np.array(list(itertools.product(*span)), dtype=np.int64)  # wrapped-frame images
    n = pos.shape[0]
    j = np.repeat(np.arange(n), len(imgs))
    o = np.tile(imgs, (n, 1)) - shift[j] + shift[i]
    of = o.astype(np.float64)
    shift_c = of[:, 0:1] * cell[0]
    shift_c = shift_c + of[:, 1:2] * cell[1]
    shift_c = shift_c + of[:, 2:3] * cell[2]
    r = (pos[j] - pos[i]) + shift_c
    d = np.sqrt(r[:, 0] * r[:, 0] + r[:, 1] * r[:, 1] + r[:, 2] * r[:, 2])
    keep = (d <= radius) & ~((j == i) & (o == 0).all(axis=1))
    j, o, d = j[keep], o[keep], d[keep]
    q = np.round(d / 1e-6).astype(np.int64)
    order = np.lexsort((o[:, 2], o[:, 1], o[:, 0], j, q))[:k]
    sel = order[j[order] != i]
    return np.column_stack([j[sel], o[sel], d[sel].view(np.int64)]), int(keep.sum())


@pytest.mark.slow
def test_large_crystal_cell_list_vs_brute_force():
    """2,000 atoms (unwrapped, skewed cell): the cell list (default), forced brute force, the
    hierarchical path and the emulated warp algorithm all equal the reference exactly, and sampled
    centres also match an independent NumPy oracle."""
    rng = np.random.default_rng(7)
    cell = np.array([[22.0, 0.0, 0.0], [4.0, 21.0, 0.0], [2.0, 3.0, 23.0]])
    frac = rng.random((2000, 3)) + rng.integers(-2, 3, (2000, 3))
    pos = torch.tensor(frac @ cell)
    cells = torch.tensor(cell)[None]
    ptr = torch.tensor([0, 2000])
    base = cpu(pos, cells, ptr)  # default: cell list (2,000 > threshold)
    assert_same(reference(pos, cells, ptr), base, "reference")
    for path, thr in [("auto", BIG), ("brute_force", 0), ("brute_force", BIG), ("warp_emulation", 0),
                      ("auto", 0), ("portable", 0), ("portable", BIG)]:
        assert_same(base, cpu(pos, cells, ptr, path=path, cell_list_threshold=thr, num_threads=2), f"{path} {thr}")
    edge_index, offsets, rowptr, dist, ncand = base
    for i in rng.choice(2000, 6, replace=False):
        rows, count = _oracle_centre(pos.numpy(), cell, int(i), 6.0, 50)
        a, b = int(rowptr[i]), int(rowptr[i + 1]) - 6
        got = np.column_stack([edge_index[0, a:b].numpy(), offsets[a:b].numpy(), dist[a:b].numpy().view(np.int64)])
        assert np.array_equal(got, rows), f"centre {i}"
        assert int(ncand[i]) == count


def test_mixed_sizes_threshold_switch():
    """Small and large crystals in one batch, the threshold splitting them both ways."""
    rng = np.random.default_rng(11)
    pos, cells, ptr = _batch(rng, [3, 150, 1, 120, 17], ["tiny", "gen", "gen", "vacuum", "skewed"], unwrap=1)
    ref = reference(pos, cells, ptr, 5.0, 40)
    for thr in (0, 2, 16, 130, BIG):
        for path in _ext.GRAPH_PATHS:
            assert_same(ref, cpu(pos, cells, ptr, 5.0, 40, path=path, cell_list_threshold=thr), f"{path} {thr}")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_avx512_path_taken_where_available():
    """On a CPU with AVX-512 F/DQ/VL/BW the default small-crystal path is the AVX-512 one (so the
    comparisons of "auto" with "portable" in this file test two different code paths)."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    want = {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags
    assert bool(_ext._C.CPU_AVX512) == want


def test_long_radius_64bit_keys():
    """Radius 34 Å (q >= 2^25): the AVX-512 path sorts 64-bit keys at every width (shorter radii
    pack them into 32 bits); sparse 20-25 Å cells give centres with 6 to 81 candidates, every
    network width from 8 to 128."""
    rng = np.random.default_rng(34)
    cells = np.stack([np.diag(d) for d in ([25.0, 25.0, 25.0], [24.0, 24.0, 25.5], [22.0, 22.0, 22.0],
                                           [24.0, 20.0, 23.0], [21.0, 20.0, 20.0])])
    sizes = [1, 1, 1, 2, 4]
    pos = np.concatenate([rng.random((n, 3)) @ c for n, c in zip(sizes, cells, strict=True)])
    pos, cells, ptr = torch.tensor(pos), torch.tensor(cells), torch.tensor(np.cumsum([0] + sizes))
    ref = reference(pos, cells, ptr, 34.0, 50)
    widths = {max(8, 1 << (int(c) - 1).bit_length()) for c in ref[4].tolist()}
    assert widths == {8, 16, 32, 64, 128}, widths
    for path in ("auto", "portable"):
        assert_same(ref, cpu(pos, cells, ptr, 34.0, 50, path=path, cell_list_threshold=BIG), f"path={path}")


@pytest.mark.parametrize("radius", [2.0, 3.0, 3.8, 4.6, 5.4, 6.5, 8.0])
def test_candidate_counts_across_sort_widths(radius):
    """Radii from 2 to 8 Å over small dense and sparse crystals give centres with 1 to several
    hundred candidates: every width of the AVX-512 path's sorting network (8 .. 128 keys, padded)
    and its counting-sort fallback above 128, against the reference and the portable path."""
    rng = np.random.default_rng(int(radius * 10))
    pos, cells, ptr = _batch(rng, [1, 2, 5, 9, 16, 24], ["tiny", "gen", "skewed", "gen", "vacuum", "gen"], unwrap=1)
    for k in (50, 1000):
        ref = reference(pos, cells, ptr, radius, k)
        counts = ref[4]
        assert int(counts.max()) > 0
        for path in ("auto", "portable"):
            assert_same(ref, cpu(pos, cells, ptr, radius, k, path=path, cell_list_threshold=BIG), f"{path} k={k}")


# --------------------------------------------------------------------------------------------------
# API behaviour
# --------------------------------------------------------------------------------------------------
def test_empty_and_errors():
    """Every path on an empty batch; a ptr that is no CSR over the atoms. (Empty inputs, singular
    cells and negative ``reserved`` for every backend: test_radius_graph.py.)"""
    for path in _ext.GRAPH_PATHS:
        out = cpu(torch.zeros(0, 3), torch.eye(3)[None], torch.tensor([0, 0]), path=path)
        assert_same(reference(torch.zeros(0, 3), torch.eye(3)[None], torch.tensor([0, 0])), out, path)
    pos = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="ptr"):
        cpu(pos, torch.eye(3)[None] * 5, torch.tensor([0, 3]))


def test_out_of_memory_is_a_clear_error():
    """Outputs that cannot be allocated (2,000 atoms with K = 2^24: room for 3.4e10 edges) raise
    MemoryError naming the problem, not a crash."""
    try:
        overcommit = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        overcommit = ""
    if overcommit != "0":
        pytest.skip(f"needs the kernel's heuristic overcommit (vm.overcommit_memory=0), here {overcommit!r}")
    rng = np.random.default_rng(3)
    pos, cells, ptr = _batch(rng, [2000], ["gen"])
    with pytest.raises(MemoryError, match="out of memory"):
        cpu(pos, cells, ptr, 6.0, 2**24, num_threads=1)


def test_registration_and_auto():
    assert "cpu" in ops.available("radius_graph")
    name, fn = ops.resolve("radius_graph", "auto", "cpu")
    assert name == "cpu" and fn is _ext.radius_graph_cpu


# --------------------------------------------------------------------------------------------------
# CUDA part (compile-time check; the launcher runs in test_radius_graph.py)
# --------------------------------------------------------------------------------------------------
def test_cuda_compiled_when_nvcc_present():
    if not nvcc_present():
        pytest.skip("nvcc not found (or E3RELAX_NO_CUDA set): the CUDA launcher is not built here")
    C = _ext._C
    assert C.WITH_CUDA, "nvcc is present but e3relax_fast._C was built without its CUDA part"
    assert hasattr(C, "radius_graph_cuda_select") and hasattr(C, "radius_graph_cuda_emit")
    status = C.cuda_status()  # never raises, with or without a driver
    assert isinstance(status, str) and status
    if not (torch.cuda.is_available() and C.cuda_available()):
        assert "cuda" not in ops.available("radius_graph")
        assert _ext.CUDA_UNAVAILABLE_REASON
