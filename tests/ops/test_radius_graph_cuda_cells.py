"""The CUDA radius graph's launcher, cell list included, run on the CPU (``_C.radius_graph_cuda_emulated``).

csrc/radius_graph_cuda.cu is a shell around per-thread functions of csrc/radius_graph.h ("The CUDA
launcher, step by step"): prep (wrapped coordinates; in crystals with more than
``cell_list_threshold`` atoms the atom's bin and its rank, an atomic count), the per-crystal warp
scan of the bin counts, the fill of the atoms-by-bin array, the select warp (brute-force items or
cell-list bins) and the emit step. The emulation runs the same functions kernel after kernel,
thread after thread, lane after lane, so these tests check the GPU's algorithm, its cell list and its
scratch layout exactly (integers equal, distances equal to the bit) against the reference
(e3relax_fast/reference/radius_graph.py) without a GPU. The number of crystals that took the cell
list is returned, so each test also checks which path it exercised.

The last test runs the real kernels against the reference when a CUDA device is present (marker
``gpu``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GRAPH_CASES, fcc_supercell, graph_case, random_batch

from e3relax_fast.ops import compiled as _ext
from e3relax_fast.reference.radius_graph import radius_graph as reference

pytestmark = pytest.mark.skipif(_ext._C is None or not hasattr(_ext._C, "radius_graph_cuda_emulated"),
                                reason=f"compiled extension without the CUDA emulation: {_ext.IMPORT_ERROR}")

BIG = 10**9  # threshold that keeps every crystal on brute force
NAMES = ("edge_index", "cell_offsets", "rowptr", "distances", "num_candidates")


def emulated(pos, cells, ptr, radius=6.0, k=50, reserved=None, threshold=-1):
    """The emulated CUDA graph as tensors, and the number of binned crystals."""
    args = [np.ascontiguousarray(t.detach().to(torch.float64).numpy()) for t in (pos, cells.reshape(-1, 3, 3))]
    p = np.ascontiguousarray(ptr.numpy().astype(np.int64))
    res = None if reserved is None else np.ascontiguousarray(reserved.numpy().astype(np.int64))
    *out, n_binned = _ext._C.radius_graph_cuda_emulated(*args, p, float(radius), int(k), res, int(threshold))
    return tuple(torch.from_numpy(np.asarray(a)) for a in out), n_binned


def assert_same(ref, got, what):
    for name, x, y in zip(NAMES, ref, got, strict=True):
        assert x.shape == y.shape, f"{what} {name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if x.dtype == torch.float64:
            assert torch.equal(x.view(torch.int64), y.view(torch.int64)), f"{what} {name}: not bitwise equal"
        else:
            assert torch.equal(x.to(torch.int64), y.to(torch.int64)), f"{what} {name}: differs"


def crystal(rng, n, cell, unwrap=2):
    frac = rng.random((n, 3)) + rng.integers(-unwrap, unwrap + 1, (n, 3))
    return torch.tensor(frac @ cell), torch.tensor(cell)[None], torch.tensor([0, n])


SKEWED = np.array([[17.0, 0.0, 0.0], [3.5, 16.0, 0.0], [-2.0, 2.5, 17.5]])


def test_threshold_is_the_cpu_launchers_default():
    """The CUDA launcher's default (cell_list_threshold < 0) is the CPU's portable default, the
    rule the warp emulation of radius_graph_cpu also applies."""
    assert _ext._C.CUDA_CELL_LIST_THRESHOLD == 768
    rng = np.random.default_rng(5)
    pos, cells, ptr = crystal(rng, 769, SKEWED * 1.25)
    assert emulated(pos, cells, ptr)[1] == 1
    assert emulated(pos[:768], cells, torch.tensor([0, 768]))[1] == 0


@pytest.mark.parametrize("n,threshold", [(300, 0), (300, 299), (800, -1)],
                         ids=["300-forced", "300-just", "800-default"])
def test_large_crystal_cell_list_exact(n, threshold):
    """A few hundred unwrapped atoms in a skewed cell: the cell list (forced, at the threshold's edge,
    and by the default rule) equals the reference, and brute force on the same crystal too."""
    rng = np.random.default_rng(n + threshold)
    scale = 0.85 * (n / 300) ** (1 / 3)  # ~90 candidates per centre
    pos, cells, ptr = crystal(rng, n, SKEWED * scale)
    ref = reference(pos, cells, ptr)
    got, n_binned = emulated(pos, cells, ptr, threshold=threshold)
    assert n_binned == 1
    assert int(ref[4].min()) > 50  # the cut is active at every centre
    assert_same(ref, got, f"cell list n={n}")
    if n <= 300:
        got, n_binned = emulated(pos, cells, ptr, threshold=BIG)
        assert n_binned == 0
        assert_same(ref, got, f"brute force n={n}")


def test_mixed_batch_with_reserved():
    """Large and small crystals in one batch (vacuum, skewed, tiny cells), the threshold splitting them;
    a per-centre ``reserved`` cap; each crystal of the batch uses its own region of the scratch."""
    rng = np.random.default_rng(21)
    sizes = [3, 260, 1, 240, 17, 330]
    kinds = ["tiny", "gen", "gen", "vacuum", "skewed", "skewed"]
    lengths = {"general": (12.0, 16.0), "vacuum": (10.0, 13.0)}
    pos, cells, ptr = random_batch(rng, sizes, kinds, unwrap=1, lengths=lengths)
    reserved = torch.from_numpy(rng.integers(0, 3, pos.shape[0]))
    for radius, k in ((6.0, 50), (4.5, 20)):
        ref = reference(pos, cells, ptr, radius, k, reserved)
        for threshold, want in ((0, 6), (16, 4), (250, 2), (BIG, 0)):
            got, n_binned = emulated(pos, cells, ptr, radius, k, reserved, threshold)
            assert n_binned == want, (threshold, n_binned)
            assert_same(ref, got, f"r={radius} k={k} thr={threshold}")


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[f"seed{c[0]}" for c in GRAPH_CASES])
def test_random_suite_small_crystals(case):
    """The suite of random small batches, every crystal binned and every crystal brute force."""
    pos, cells, ptr, radius, k, reserved = graph_case(case)
    for res in reserved:
        ref = reference(pos, cells, ptr, radius, k, res)
        for threshold in (0, BIG):
            got, _ = emulated(pos, cells, ptr, radius, k, res, threshold)
            assert_same(ref, got, f"seed{case[0]} thr={threshold}")


def test_exact_ties_on_a_perfect_lattice():
    """A 4x4x4 fcc supercell (256 atoms): many exactly tied keys at the cut, binned and not."""
    pos, cells, ptr = fcc_supercell(3.6, 4)
    for k in (12, 50, 80):
        ref = reference(pos, cells, ptr, 6.0, k)
        for threshold, want in ((0, 1), (BIG, 0)):
            got, n_binned = emulated(pos, cells, ptr, 6.0, k, threshold=threshold)
            assert n_binned == want
            assert_same(ref, got, f"k={k} thr={threshold}")


def test_boundary_fallback_in_the_cell_list():
    """K = 6,000 in a 0.4 Å cell: the boundary histogram bin overflows and one lane selects
    sequentially, over cell-list bins as over brute-force items."""
    pos = torch.tensor([[0.05, 0.1, 0.15], [0.0, 0.0, 0.0], [0.25, 0.25, 0.25]], dtype=torch.float64)
    cells = torch.tensor(np.stack([np.eye(3) * 0.4, np.eye(3) * 0.5]))
    ptr = torch.tensor([0, 1, 3])
    ref = reference(pos, cells, ptr, 6.0, 6000)
    for threshold, want in ((0, 2), (BIG, 0)):
        got, n_binned = emulated(pos, cells, ptr, 6.0, 6000, threshold=threshold)
        assert n_binned == want
        assert_same(ref, got, f"thr={threshold}")


def test_errors_with_the_cell_list_active():
    """Invalid input is reported (no out-of-range scratch access) while crystals are binned."""
    rng = np.random.default_rng(2)
    pos, cells, ptr = random_batch(rng, [5, 3, 8], ["gen", "gen", "gen"])
    with pytest.raises(ValueError, match="ptr"):  # not monotone: crystal regions would overlap
        emulated(pos, cells, torch.tensor([0, 9, 4, 16]), threshold=0)
    with pytest.raises(ValueError, match="ptr"):
        emulated(pos, cells, torch.tensor([0, 5, 8, 15]), threshold=0)
    with pytest.raises(ValueError, match="reserved"):
        emulated(pos, cells, ptr, reserved=-torch.ones(16, dtype=torch.int64), threshold=0)
    singular = cells.clone()
    singular[1, 2] = singular[1, 1]
    with pytest.raises(ValueError, match="cell"):
        emulated(pos, singular, ptr, threshold=0)


def test_empty_inputs():
    empty = torch.zeros(0, 3, dtype=torch.float64)
    ref = reference(empty, torch.eye(3, dtype=torch.float64)[None], torch.tensor([0, 0]))
    got, n_binned = emulated(empty, torch.eye(3, dtype=torch.float64)[None], torch.tensor([0, 0]), threshold=0)
    assert n_binned == 0
    assert_same(ref, got, "empty")


@pytest.mark.gpu
def test_cuda_kernels_cell_list_against_reference():
    """On a GPU: the real kernels, binned (threshold 0) and brute force, equal the reference."""
    if _ext.CUDA_UNAVAILABLE_REASON is not None:
        pytest.skip(_ext.CUDA_UNAVAILABLE_REASON)
    rng = np.random.default_rng(9)
    pos, cells, ptr = random_batch(rng, [300, 5, 900], ["skewed", "gen", "gen"], unwrap=1,
                                   lengths={"general": (14.0, 22.0)})
    ref = reference(pos, cells, ptr)
    dev = torch.device("cuda")
    for threshold in (0, -1, BIG):
        n, k = pos.shape[0], 50
        d = dict(pos=pos.to(dev).contiguous(), cell=cells.to(dev).contiguous(), p=ptr.to(dev).contiguous())
        wfrac = torch.empty((n, 3), dtype=torch.float64, device=dev)
        shift = torch.empty((n, 3), dtype=torch.int32, device=dev)
        kept = torch.empty((n * k, 4), dtype=torch.int32, device=dev)
        kept_count, ncand = (torch.empty(n, dtype=torch.int64, device=dev) for _ in range(2))
        status = torch.zeros(1, dtype=torch.int64, device=dev)
        handle, s = _ext._stream_handles(dev)
        _ext._C.radius_graph_cuda_select(*(_ext._dl(t, s) for t in (d["pos"], d["cell"], d["p"])), 6.0, k, None,
                                         *(_ext._dl(t, s) for t in (wfrac, shift, kept, kept_count, ncand, status)),
                                         handle, threshold)
        rowptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        torch.cumsum(kept_count + 6, 0, out=rowptr[1:])
        assert int(status.item()) == 0
        e = int(rowptr[-1].item())
        edge_index = torch.empty((2, e), dtype=torch.int64, device=dev)
        offsets = torch.empty((e, 3), dtype=torch.int64, device=dev)
        dist = torch.empty(e, dtype=torch.float64, device=dev)
        _ext.cuda_emit(d["pos"], d["cell"], d["p"], k, kept, kept_count, rowptr, edge_index, offsets, dist)
        got = tuple(t.cpu() for t in (edge_index, offsets, rowptr, dist, ncand))
        assert_same(ref, got, f"cuda thr={threshold}")
