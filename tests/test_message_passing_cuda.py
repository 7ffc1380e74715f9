"""The compiled fused message op (csrc/message_passing*, ``e3relax_fast._C``) against the reference.

The CUDA kernel cannot run without a GPU, so its per-receiver / per-channel logic
(csrc/message_passing.h) is checked through the C++ CPU launcher, which calls the same header
functions in the same order (edge tiles, gate rows per channel, messages in edge order):
``_ext.message_passing_cpu`` must equal the reference op to 1e-10 (float64) and 5e-6 (float32) of
the outputs' scale, on batches with 1-atom crystals (6 and 56 periodic self-image edges), a
receiver without edges and one with 56, edges beyond the basis cutoff, outputs NaN-poisoned
beforehand. The CUDA backend itself is compared with the reference when a device exists.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import shutil

import pytest
import torch
from conftest import assert_close as conftest_assert_close

from e3relax_fast import ops
from e3relax_fast.ops import compiled as _ext
from e3relax_fast.reference.message_passing import message_passing as reference_op
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient

assert_close = functools.partial(conftest_assert_close, check_dtype=True)

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.IMPORT_ERROR}")

TOLERANCES = [(torch.float64, 1e-10), (torch.float32, 5e-6)]


def make_case(dtype=torch.float64, hidden=32, num_rbf=128, cutoff=6.0, seed=0, sizes=(1, 5, 1, 7, 3)):
    """``(kwargs of the op, rowptr)``: a random receiver-sorted batch of crystals of ``sizes``.

    In-degrees are random in 1..24 except: the first 1-atom crystal has 6 edges and the last 56
    (periodic self-images only), the first atom of the first larger crystal none and the second atom
    of the last one 56. Offsets in [-2, 2]^3 on ~3.5 Å cells: some edges are longer than ``cutoff``.
    """
    gen = torch.Generator().manual_seed(seed)
    n, n_graphs = sum(sizes), len(sizes)
    starts = [sum(sizes[:g]) for g in range(n_graphs)]
    cells = 3.5 * torch.eye(3, dtype=torch.float64) + 0.4 * torch.randn(n_graphs, 3, 3, generator=gen,
                                                                         dtype=torch.float64)
    graph = torch.repeat_interleave(torch.arange(n_graphs), torch.tensor(sizes))
    positions = torch.einsum("np,npq->nq", torch.rand(n, 3, generator=gen, dtype=torch.float64), cells[graph])
    degree = torch.randint(1, 25, (n,), generator=gen)
    singles = [g for g, s in enumerate(sizes) if s == 1]
    larger = [g for g, s in enumerate(sizes) if s > 1]
    if singles:
        degree[starts[singles[0]]] = 6
        degree[starts[singles[-1]]] = 56
    if larger:
        degree[starts[larger[0]]] = 0
        degree[starts[larger[-1]] + 1] = 56
    src, dst, offsets = [], [], []
    for i in range(n):
        g = int(graph[i])
        for _ in range(int(degree[i])):
            while True:
                j = starts[g] + int(torch.randint(0, sizes[g], (1,), generator=gen))
                o = torch.randint(-2, 3, (3,), generator=gen)
                if j != i or bool(o.any()):
                    break
            src.append(j)
            dst.append(i)
            offsets.append(o)
    edge_index = torch.tensor([src, dst], dtype=torch.int64).reshape(2, -1)
    cell_offsets = torch.stack(offsets) if offsets else torch.zeros(0, 3, dtype=torch.int64)
    rowptr = torch.searchsorted(edge_index[1], torch.arange(n + 1))
    centres = rbf_centres(num_rbf)
    kwargs = dict(
        x_proj=torch.randn(n, 3 * hidden, generator=gen, dtype=torch.float64).to(dtype),
        vec=torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64).to(dtype),
        positions=positions.to(dtype),
        cells=cells.to(dtype),
        edge_index=edge_index,
        cell_offsets=cell_offsets,
        edge_graph=graph[edge_index[1]],
        edge_weight=(torch.randn(3 * hidden, num_rbf, generator=gen, dtype=torch.float64)
                     / math.sqrt(num_rbf)).to(dtype),
        edge_bias=(0.1 * torch.randn(3 * hidden, generator=gen, dtype=torch.float64)).to(dtype),
        rbf_centres=centres,
        rbf_coeff=rbf_coefficient(centres),
        cutoff=cutoff,
    )
    return kwargs, rowptr




def poisoned(kwargs):
    n, h = kwargs["vec"].shape[0], kwargs["vec"].shape[2]
    dtype = kwargs["x_proj"].dtype
    return torch.full((n, h), math.nan, dtype=dtype), torch.full((n, 3, h), math.nan, dtype=dtype)


def cpu_op(kwargs, rowptr, **kw):
    out = poisoned(kwargs)
    ds, dv = _ext.message_passing_cpu(**kwargs, rowptr=rowptr, out=out, **kw)
    assert ds.data_ptr() == out[0].data_ptr() and dv.data_ptr() == out[1].data_ptr()
    return ds, dv


# --------------------------------------------------------------------------------------------------
# CPU launcher (the CUDA kernel's logic)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("hidden, num_rbf, cutoff, seed", [(32, 128, 6.0, 0), (40, 20, 4.0, 1), (8, 128, 30.0, 2)])
def test_cpu_matches_reference(dtype, rel, hidden, num_rbf, cutoff, seed):
    kwargs, rowptr = make_case(dtype, hidden, num_rbf, cutoff, seed)
    d = (rowptr[1:] - rowptr[:-1])
    assert (d == 0).any() and (d == 56).sum() >= 2  # empty receiver, 56-edge receivers (one a 1-atom crystal)
    ds0, dv0 = reference_op(**kwargs)
    ds1, dv1 = cpu_op(kwargs, rowptr)
    assert_close(ds1, ds0, rel, "ds")
    assert_close(dv1, dv0, rel, "dv")
    empty = int(torch.nonzero(d == 0)[0])
    assert (ds1[empty] == 0).all() and (dv1[empty] == 0).all()


def test_cpu_single_crystal_without_edges_and_empty_batch():
    kwargs, rowptr = make_case(sizes=(3,), seed=4)
    kwargs = dict(kwargs, edge_index=kwargs["edge_index"][:, :0], cell_offsets=kwargs["cell_offsets"][:0],
                  edge_graph=kwargs["edge_graph"][:0])
    ds, dv = cpu_op(kwargs, torch.zeros(4, dtype=torch.int64))
    assert (ds == 0).all() and (dv == 0).all()
    empty = dict(kwargs, x_proj=kwargs["x_proj"][:0], vec=kwargs["vec"][:0], positions=kwargs["positions"][:0])
    ds, dv = _ext.message_passing_cpu(**empty, rowptr=torch.zeros(1, dtype=torch.int64))
    assert ds.shape == (0, 32) and dv.shape == (0, 3, 32)


def test_cpu_deterministic_over_threads_and_weight_layout():
    """Bitwise the same result for any thread count and for W passed transposed in memory (the
    layout the CUDA wrapper uses), since every sum has a fixed order."""
    kwargs, rowptr = make_case(torch.float64, seed=5, sizes=(1, 9, 1, 12, 4, 6))
    ds1, dv1 = cpu_op(kwargs, rowptr, num_threads=1)
    ds2, dv2 = cpu_op(kwargs, rowptr, num_threads=2)
    assert torch.equal(ds1, ds2) and torch.equal(dv1, dv2)
    arrays, ds, dv = _ext._mp_arrays(*(kwargs[k] for k in ("x_proj", "vec", "positions", "cells", "edge_index",
                                                           "cell_offsets", "edge_graph", "edge_weight",
                                                           "edge_bias", "rbf_centres")),
                                     rowptr, poisoned(kwargs), transpose_weight=True)
    assert arrays[8].stride() == (1, arrays[8].shape[0])
    _ext._C.message_passing_cpu(*arrays, kwargs["rbf_coeff"], kwargs["cutoff"], ds, dv, 1)
    assert torch.equal(ds, ds1) and torch.equal(dv, dv1)


def test_cpu_unsorted_edges_without_rowptr():
    kwargs, _ = make_case(torch.float64, seed=6)
    perm = torch.randperm(kwargs["edge_index"].shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = dict(kwargs, edge_index=kwargs["edge_index"][:, perm], cell_offsets=kwargs["cell_offsets"][perm],
                    edge_graph=kwargs["edge_graph"][perm])
    ds0, dv0 = reference_op(**kwargs)
    ds1, dv1 = _ext.message_passing_cpu(**shuffled)
    assert_close(ds1, ds0, 1e-10, "ds")
    assert_close(dv1, dv0, 1e-10, "dv")


def test_cpu_rejects_invalid_edges():
    kwargs, rowptr = make_case(torch.float64, seed=7)
    with pytest.raises(ValueError, match="invalid edges"):  # a receiver's range holds another's edge
        bad = rowptr.clone()
        bad[3] += 1
        _ext.message_passing_cpu(**kwargs, rowptr=bad)
    with pytest.raises(ValueError, match="invalid edges"):  # rowptr beyond E
        bad = rowptr.clone()
        bad[-1] += 5
        _ext.message_passing_cpu(**kwargs, rowptr=bad)
    with pytest.raises(ValueError, match="invalid edges"):  # source out of range
        ei = kwargs["edge_index"].clone()
        ei[0, 0] = 10**6
        _ext.message_passing_cpu(**dict(kwargs, edge_index=ei), rowptr=rowptr)
    with pytest.raises(ValueError):  # shapes
        _ext.message_passing_cpu(**dict(kwargs, edge_bias=kwargs["edge_bias"][:-1]), rowptr=rowptr)


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
def _nvcc_present() -> bool:
    if os.environ.get("E3RELAX_NO_CUDA", "").strip() not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool((home and os.path.isfile(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
                or os.path.isfile("/usr/local/cuda/bin/nvcc") or glob.glob("/usr/local/cuda-*/bin/nvcc"))


def test_cuda_compiled_when_nvcc_present():
    if not _nvcc_present():
        pytest.skip("nvcc not found (or E3RELAX_NO_CUDA set): the CUDA launcher is not built here")
    C = _ext._C
    assert C.WITH_CUDA, "nvcc is present but e3relax_fast._C was built without its CUDA part"
    assert hasattr(C, "message_passing_cuda_f32") and hasattr(C, "message_passing_cuda_f64")
    assert hasattr(C, "message_passing_cpu")
    if _ext.CUDA_UNAVAILABLE_REASON is not None:
        assert "cuda" not in ops.available("message_passing")
        with pytest.raises(ops.BackendUnavailableError, match="cuda"):
            ops.resolve("message_passing", "cuda", "cuda")
    else:
        assert "cuda" in ops.available("message_passing")
    assert "cpu" not in ops.available("message_passing")  # the reference is the CPU choice


def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if "cuda" not in ops.available("message_passing"):
        pytest.skip(f"cuda backend unavailable: {_ext.CUDA_UNAVAILABLE_REASON}")
    return ops.resolve("message_passing", "cuda", "cuda")[1]


@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("hidden, num_rbf", [(32, 128), (40, 20), (300, 128)])  # 300: channel groups
def test_cuda_matches_reference(dtype, rel, hidden, num_rbf):
    op = _cuda_backend()
    kwargs, rowptr = make_case(dtype, hidden, num_rbf, seed=8)
    ds0, dv0 = reference_op(**kwargs)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out = (torch.full(ds0.shape, math.nan, dtype=dtype, device="cuda"),
           torch.full(dv0.shape, math.nan, dtype=dtype, device="cuda"))
    with torch.no_grad():
        ds1, dv1 = op(**dev, rowptr=rowptr.cuda(), out=out)
        ds2, dv2 = op(**dev, rowptr=rowptr.cuda())
    assert_close(ds1.cpu(), ds0, rel, "ds")
    assert_close(dv1.cpu(), dv0, rel, "dv")
    assert torch.equal(ds1, ds2) and torch.equal(dv1, dv2)  # deterministic
    ds3, dv3 = _ext.message_passing_cpu(**kwargs, rowptr=rowptr)  # same logic on the CPU
    assert_close(ds1.cpu(), ds3, 1e-12 if dtype == torch.float64 else 1e-6, "ds vs CPU launcher")
    assert_close(dv1.cpu(), dv3, 1e-12 if dtype == torch.float64 else 1e-6, "dv vs CPU launcher")


def test_cuda_forward_only():
    op = _cuda_backend()
    kwargs, rowptr = make_case(torch.float32, seed=9)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    dev["x_proj"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only"):
        op(**dev, rowptr=rowptr.cuda())
    with torch.no_grad():
        ds, _ = op(**dev, rowptr=rowptr.cuda())
    assert not ds.requires_grad
