"""Op ``message_passing``: the fused atom–atom message (spec §6 Step B, §13.8) of every backend
against its reference twin (e3relax_fast/reference/message_passing.py), and through the model.

Backends (``backend`` parameter, each skipped with the reason when it cannot run here):

* ``cpu``: the fused C++ backend (csrc/fused_cpu.h; its backward in
  csrc/message_passing_backward_cpu.cpp), its radial projection on the window of the basis (its own
  tests, with the exact mode and both paths, are at the end);
* ``cuda_emulated``: not an op-table backend but the C++ CPU launcher
  (``ops.compiled.message_passing_cpu``), which calls the CUDA kernel's header functions
  (csrc/message_passing.h) in the same order, so the kernel's logic is tested without a GPU;
* ``cuda``: the CUDA kernel (forward only; marker ``gpu``);
* ``triton``: kernels/message_passing.py (without a GPU on Triton's CPU interpreter: small shapes);
* ``cueq``: cuequivariance (its naive PyTorch method on CPU, ``uniform_1d`` on CUDA).

Unwritten outputs fail: Triton's buffers start NaN-poisoned, the C++/CUDA launchers write into
NaN-filled ``out`` buffers; cueq allocates no buffer of its own (cuequivariance returns
zero-initialised scattered outputs), so receivers without edges are checked to be exact zeros.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CUDA_EMULATED,
    INTERPRET,
    TOLERANCES,
    assert_close,
    backend_device,
    backend_only,
    backend_params,
    golden_batch,
    golden_model_instance,
    model_trains,
    nvcc_present,
    run_with_grads,
    to_device,
    triton_module,
)

from e3relax_fast import ops
from e3relax_fast.model import E3Relax
from e3relax_fast.ops import compiled
from e3relax_fast.reference.message_passing import message_passing as reference_op
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient
from e3relax_fast.training.loss import layerwise_loss

OP = "message_passing"
ALL = backend_params(OP, "cpu", CUDA_EMULATED, "cuda", "triton", "cueq")
DIFFERENTIABLE = backend_params(OP, "triton", "cueq")
UNORDERED = backend_params(OP, "cpu", CUDA_EMULATED, "cuda", "cueq")  # edges in any order, no rowptr needed
MODEL = backend_params(OP, "cpu", "cuda", "triton", "cueq")
INPUTS = ("x_proj", "vec", "positions", "cells", "edge_weight", "edge_bias")
# The edge projection's gradients are sums over every edge of the batch (about 250 here), and the
# reference forms them with a BLAS product whose order of summation depends on the CPU: in float32
# two correct orders differ by up to ~6e-6 of the largest entry (seen on an AMD EPYC; 5e-6 held on
# an Intel Xeon). Their tolerance is that of such a sum, 4 x the per-dtype one (a wrong kernel is
# off by O(1)). The geometric gradients (positions, cells) are sums over an atom's or a crystal's
# edges of terms that cancel, each through the basis's derivative (2 eta (x - mu), up to ~900 per
# unit of x): in float32 the reference itself is off the float64 one by up to 1.4e-5 of the largest
# entry, and the fused CPU backward by as much, in another order (measured on SHAPES); 8 x.
SUMMED_OVER_EDGES = {"edge_weight": 4, "edge_bias": 4, "positions": 8, "cells": 8}
# (hidden, num_rbf, cutoff, seed): the paper's basis, partial tiles and a short cutoff, a cutoff
# beyond every edge, a narrow basis, and H=300 (several channel groups per CUDA block).
SHAPES = [(32, 128, 6.0, 0), (40, 20, 4.0, 1), (8, 128, 30.0, 2), (16, 32, 6.0, 3), (300, 128, 6.0, 8)]


def make_case(dtype, device, hidden=32, num_rbf=128, cutoff=6.0, seed=0, sizes=(1, 5, 1, 7, 3)):
    """``(kwargs of the op, rowptr)`` on ``device``: a random receiver-sorted batch of crystals of ``sizes``.

    In-degrees are random in 1..24 except: the first 1-atom crystal has 6 edges and the last 56
    (periodic self-image edges only), the first atom of every larger crystal none and the second
    atom of the last one 56. Offsets in [-2, 2]^3 on ~3.5 Å cells: some edges are longer than ``cutoff``.
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
    for g in larger:
        degree[starts[g]] = 0
    if larger:
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
    return to_device(kwargs, device), rowptr.to(device)


def on_cpu(args):
    """The reference runs on the CPU, whatever the device of the backend under test."""
    return to_device(args, "cpu")


def without_edges(args):
    return dict(args, edge_index=args["edge_index"][:, :0], cell_offsets=args["cell_offsets"][:0],
                edge_graph=args["edge_graph"][:0])


def poisoned(args):
    n, h = args["vec"].shape[0], args["vec"].shape[2]
    like = dict(dtype=args["x_proj"].dtype, device=args["x_proj"].device)
    return torch.full((n, h), math.nan, **like), torch.full((n, 3, h), math.nan, **like)


def forward(backend, args, rowptr=None, **kw):
    """The backend's ``(ds, dv)``; forward-only backends run without autograd and write NaN-filled
    ``out`` buffers (checked to be the ones returned)."""
    if backend.differentiable:
        return backend.fn(**args, rowptr=rowptr, **kw)
    out = poisoned(args)
    with torch.no_grad():
        ds, dv = backend.fn(**args, rowptr=rowptr, out=out, **kw)
    assert ds.data_ptr() == out[0].data_ptr() and dv.data_ptr() == out[1].data_ptr()
    return ds, dv


def run(op, args, requires=INPUTS, seed=1, **kwargs):
    """``(ds, dv, gradients)`` of a random linear functional of both outputs."""
    return run_with_grads(op, args, INPUTS, requires, seed, **kwargs)


def compare(backend, args, rowptr, rel):
    """Outputs (dtype, shape, finite, within ``rel``) and, for a differentiable backend, the gradients
    of every input agree with the reference's (run on the CPU); returns the backend's outputs."""
    if backend.differentiable:
        ds0, dv0, g0 = run(reference_op, on_cpu(args))
        ds1, dv1, g1 = run(backend.fn, args, rowptr=rowptr)
        for name in INPUTS:
            assert_close(g1[name], g0[name], rel * SUMMED_OVER_EDGES.get(name, 1), f"d/d {name}", check_dtype=True)
    else:
        ds0, dv0 = reference_op(**on_cpu(args))
        ds1, dv1 = forward(backend, args, rowptr)
    assert_close(ds1, ds0, rel, "ds", check_dtype=True)
    assert_close(dv1, dv0, rel, "dv", check_dtype=True)
    return ds1, dv1


# --------------------------------------------------------------------------------------------------
# every backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", MODEL, indirect=True)
def test_registered(backend):
    from e3relax_fast.ops import cueq

    expected = {"cpu": lambda: compiled.message_passing_fused_cpu, "cuda": lambda: compiled.message_passing_cuda,
                "triton": lambda: triton_module(OP).message_passing,
                "cueq": lambda: cueq.message_passing}[backend.name]()
    name, fn = ops.resolve(OP, backend.name, backend.device.type)
    assert name == backend.name and fn is expected


@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("hidden, num_rbf, cutoff, seed", SHAPES)
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_matches_reference(backend, dtype, rel, hidden, num_rbf, cutoff, seed):
    """1-atom crystals (6 and 56 self-image edges), receivers without edges and with 56, edges beyond
    the basis cutoff: outputs and (differentiable backends) every input's gradient."""
    if backend.name == "triton" and INTERPRET and hidden == 300:
        pytest.skip("H=300 takes 15-30 s per dtype on Triton's CPU interpreter (it runs on a GPU); partial "
                    "channel blocks are covered here by test_triton_many_tiles_and_programs_float64")
    args, rowptr = make_case(dtype, backend.device, hidden, num_rbf, cutoff, seed)
    d = (rowptr[1:] - rowptr[:-1]).cpu()
    assert (d == 0).sum() >= 3 and (d == 56).sum() >= 2  # empty receivers, 56-edge ones (one a 1-atom crystal)
    ds1, dv1 = compare(backend, args, rowptr, rel)
    silent = d == 0
    assert (ds1.cpu()[silent] == 0).all() and (dv1.cpu()[silent] == 0).all()


@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("backend", UNORDERED, indirect=True)
def test_unsorted_edges_without_rowptr(backend, dtype, rel):
    args, _ = make_case(dtype, backend.device, hidden=16, num_rbf=32, seed=6)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(args["edge_index"].shape[1], generator=gen).to(backend.device)
    shuffled = dict(args, edge_index=args["edge_index"][:, perm], cell_offsets=args["cell_offsets"][perm],
                    edge_graph=args["edge_graph"][perm])
    compare(backend, shuffled, None, rel)


@pytest.mark.parametrize("hidden", [8, 32])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_no_edges(backend, hidden):
    """Exact zeros and (differentiable backends) exactly the reference's gradients."""
    args, rowptr = make_case(torch.float64, backend.device, hidden=hidden, seed=2, sizes=(1, 2))
    args, zero = without_edges(args), torch.zeros_like(rowptr)
    if backend.differentiable:
        with torch.no_grad():
            ds, dv = backend.fn(**args, rowptr=zero)
        _, _, g0 = run(reference_op, on_cpu(args))
        _, _, g1 = run(backend.fn, args, rowptr=zero)
        for name in INPUTS:
            assert torch.equal(g1[name].cpu(), g0[name]), name
    else:
        ds, dv = forward(backend, args, zero)
    assert ds.shape == (3, hidden) and dv.shape == (3, 3, hidden)
    assert (ds == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("backend", DIFFERENTIABLE, indirect=True)
def test_partial_gradients_float64(backend):
    """Only some inputs need a gradient: the kernels skip the W or the geometry terms."""
    for case in ({"seed": 5, "sizes": (1, 3)}, {"hidden": 8, "seed": 3, "sizes": (2, 1, 3)}):
        args, rowptr = make_case(torch.float64, backend.device, **case)
        for requires in (("x_proj", "vec"), ("positions",), ("cells", "edge_bias"), ("edge_weight",)):
            _, _, g0 = run(reference_op, on_cpu(args), requires=requires)
            _, _, g1 = run(backend.fn, args, requires=requires, rowptr=rowptr)
            for name in requires:
                assert_close(g1[name], g0[name], 1e-10, f"d/d {name} (requires {requires})")


@pytest.mark.parametrize("backend", backend_params(OP, "triton", "cueq", slow={"triton"}), indirect=True)
def test_gradcheck_float64(backend):
    args, rowptr = make_case(torch.float64, backend.device, hidden=16, num_rbf=16, seed=4, sizes=(1, 3))
    tensors = [args[k].detach().clone().requires_grad_(True) for k in INPUTS]

    def op(*inputs):
        kw = dict(args)
        kw.update(zip(INPUTS, inputs, strict=True))
        return backend.fn(**kw, rowptr=rowptr)

    assert torch.autograd.gradcheck(op, tensors, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
    # Full Jacobian for the geometry (the least direct part of the backward), of the outputs
    # contracted over channels to keep the number of backward passes small.
    fixed = [t.detach() for t in tensors]
    w_s = torch.randn(16, dtype=torch.float64, device=backend.device)
    w_v = torch.randn(16, dtype=torch.float64, device=backend.device)

    def op_geometry(positions, cells):
        ds, dv = op(fixed[0], fixed[1], positions, cells, *fixed[4:])
        return ds @ w_s, dv @ w_v

    assert torch.autograd.gradcheck(op_geometry, tensors[2:4], eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# through the model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", DIFFERENTIABLE, indirect=True)
def test_model_golden_parity_paper_float64(golden_model, backend):
    """E3Relax(H=32) with the golden weights in paper mode: the backend reproduces the golden outputs,
    loss and gradients (same tolerances as the reference) and agrees with the reference backend
    (outputs 1e-12, gradients 1e-10)."""
    outs, grads = {}, {}
    for name, device in (("reference", torch.device("cpu")), (backend.name, backend.device)):
        model = golden_model_instance(golden_model, paper_compat=True).to(device)
        model.backend = name
        batch = golden_batch(golden_model).to(device)
        batch.positions.requires_grad_(True)
        batch.cells.requires_grad_(True)
        out = model(batch)
        targets = (torch.from_numpy(golden_model["in/pos_r"]).to(device),
                   torch.from_numpy(golden_model["in/cell_r"]).to(device))
        loss = layerwise_loss(out, *targets)
        loss.total.backward()
        outs[name] = (out, loss)
        grads[name] = {p_name: p.grad.cpu() for p_name, p in model.named_parameters()}
        grads[name]["pos_u"] = batch.positions.grad.cpu()
        grads[name]["cell_u"] = batch.cells.grad.cpu()
    out, loss = outs[backend.name]
    for n in range(4):
        np.testing.assert_allclose(out.positions[n].detach().cpu().numpy(), golden_model[f"out/pos_L{n}"],
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.cells[n].detach().cpu().numpy(), golden_model[f"out/cell_L{n}"],
                                   rtol=0, atol=1e-12)
    assert abs(loss.total.item() - golden_model["loss/total"]) < 1e-12
    for key in golden_model:
        name = key.removeprefix("grad/")
        if key.startswith("grad/") and name in grads[backend.name]:
            expected = golden_model[key]
            err = np.abs(grads[backend.name][name].numpy() - expected).max()
            assert err <= 1e-10 * np.abs(expected).max(), name
    ref_out, _ = outs["reference"]
    for n in range(4):
        assert_close(out.positions[n], ref_out.positions[n], 1e-12, f"positions L{n}")
        assert_close(out.cells[n], ref_out.cells[n], 1e-12, f"cells L{n}")
    for name, g in grads["reference"].items():
        assert_close(grads[backend.name][name], g, 1e-10, f"grad {name}")


@pytest.mark.parametrize("backend", MODEL, indirect=True)
def test_model_float32_default_mode(golden_model, backend):
    """Default mode in float32: the backend stays within float32 rounding of the reference
    (forward-only backends run without autograd)."""
    reference = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32)
    reference.backend = "reference"
    expected = reference(golden_batch(golden_model, torch.float32))
    model = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32).to(backend.device)
    model.backend = backend.name
    with torch.set_grad_enabled(model_trains(backend.name, backend.device.type)):
        got = model(golden_batch(golden_model, torch.float32).to(backend.device))
    for n in range(4):
        assert_close(got.positions[n], expected.positions[n], 5e-6, "pos")
        assert_close(got.cells[n], expected.cells[n], 5e-6, "cell")


@pytest.mark.parametrize("name", [b for b in ops.BACKENDS if b != "auto"])
def test_model_backend_argument(name):
    assert E3Relax(hidden_channels=16, num_layers=1, backend=name).backend == name


# --------------------------------------------------------------------------------------------------
# cuda_emulated: the C++ CPU launcher of the CUDA kernel
# --------------------------------------------------------------------------------------------------
@backend_only(OP, CUDA_EMULATED)
def test_cuda_emulated_single_crystal_without_edges_and_empty_batch():
    args, rowptr = make_case(torch.float64, "cpu", sizes=(3,), seed=4)
    args = without_edges(args)
    out = poisoned(args)
    ds, dv = compiled.message_passing_cpu(**args, rowptr=torch.zeros(4, dtype=torch.int64), out=out)
    assert ds.data_ptr() == out[0].data_ptr() and dv.data_ptr() == out[1].data_ptr()
    assert (ds == 0).all() and (dv == 0).all()
    empty = dict(args, x_proj=args["x_proj"][:0], vec=args["vec"][:0], positions=args["positions"][:0])
    ds, dv = compiled.message_passing_cpu(**empty, rowptr=torch.zeros(1, dtype=torch.int64))
    assert ds.shape == (0, 32) and dv.shape == (0, 3, 32)


@backend_only(OP, CUDA_EMULATED)
def test_cuda_emulated_deterministic_over_threads_and_weight_layout():
    """Bitwise the same result for any thread count and for W passed transposed in memory (the
    layout the CUDA wrapper uses), since every sum has a fixed order."""
    args, rowptr = make_case(torch.float64, "cpu", seed=5, sizes=(1, 9, 1, 12, 4, 6))
    ds1, dv1 = compiled.message_passing_cpu(**args, rowptr=rowptr, out=poisoned(args), num_threads=1)
    ds2, dv2 = compiled.message_passing_cpu(**args, rowptr=rowptr, out=poisoned(args), num_threads=2)
    assert torch.equal(ds1, ds2) and torch.equal(dv1, dv2)
    arrays, ds, dv = compiled._mp_arrays(*(args[k] for k in ("x_proj", "vec", "positions", "cells", "edge_index",
                                                             "cell_offsets", "edge_graph", "edge_weight",
                                                             "edge_bias", "rbf_centres")),
                                         rowptr, poisoned(args), transpose_weight=True)
    assert arrays[8].stride() == (1, arrays[8].shape[0])
    compiled._C.message_passing_cuda_emulated(*arrays, args["rbf_coeff"], args["cutoff"], ds, dv, 1)
    assert torch.equal(ds, ds1) and torch.equal(dv, dv1)


@backend_only(OP, CUDA_EMULATED)
def test_cuda_emulated_rejects_invalid_edges():
    args, rowptr = make_case(torch.float64, "cpu", seed=7)
    with pytest.raises(ValueError, match="invalid edges"):  # a receiver's range holds another's edge
        bad = rowptr.clone()
        bad[3] += 1
        compiled.message_passing_cpu(**args, rowptr=bad)
    with pytest.raises(ValueError, match="invalid edges"):  # rowptr beyond E
        bad = rowptr.clone()
        bad[-1] += 5
        compiled.message_passing_cpu(**args, rowptr=bad)
    with pytest.raises(ValueError, match="invalid edges"):  # source out of range
        ei = args["edge_index"].clone()
        ei[0, 0] = 10**6
        compiled.message_passing_cpu(**dict(args, edge_index=ei), rowptr=rowptr)
    with pytest.raises(ValueError):  # shapes
        compiled.message_passing_cpu(**dict(args, edge_bias=args["edge_bias"][:-1]), rowptr=rowptr)


# --------------------------------------------------------------------------------------------------
# cuda
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(compiled._C is None, reason=f"compiled extension unavailable: {compiled.IMPORT_ERROR}")
def test_cuda_compiled_when_nvcc_present():
    if not nvcc_present():
        pytest.skip("nvcc not found (or E3RELAX_NO_CUDA set): the CUDA launcher is not built here")
    C = compiled._C
    assert C.WITH_CUDA, "nvcc is present but e3relax_fast._C was built without its CUDA part"
    assert hasattr(C, "message_passing_cuda_f32") and hasattr(C, "message_passing_cuda_f64")
    assert hasattr(C, "message_passing_cuda_emulated")
    if compiled.CUDA_UNAVAILABLE_REASON is not None:
        assert "cuda" not in ops.available(OP)
        with pytest.raises(ops.BackendUnavailableError, match="cuda"):
            ops.resolve(OP, "cuda", "cuda")
    else:
        assert "cuda" in ops.available(OP)


@backend_only(OP, "cuda")
@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("hidden, num_rbf", [(32, 128), (40, 20), (300, 128)])  # 300: channel groups
def test_cuda_deterministic_and_equal_to_its_cpu_emulation(dtype, rel, hidden, num_rbf):
    op = compiled.message_passing_cuda
    args, rowptr = make_case(dtype, "cpu", hidden, num_rbf, seed=8)
    dev = to_device(args, "cuda")
    out = poisoned(dev)
    with torch.no_grad():
        ds1, dv1 = op(**dev, rowptr=rowptr.cuda(), out=out)
        ds2, dv2 = op(**dev, rowptr=rowptr.cuda())
    assert ds1.data_ptr() == out[0].data_ptr() and dv1.data_ptr() == out[1].data_ptr()
    ds0, dv0 = reference_op(**args)
    assert_close(ds1, ds0, rel, "ds", check_dtype=True)
    assert_close(dv1, dv0, rel, "dv", check_dtype=True)
    assert torch.equal(ds1, ds2) and torch.equal(dv1, dv2)  # deterministic
    ds3, dv3 = compiled.message_passing_cpu(**args, rowptr=rowptr)  # same logic on the CPU
    assert_close(ds1.cpu(), ds3, 1e-12 if dtype == torch.float64 else 1e-6, "ds vs CPU launcher", check_dtype=True)
    assert_close(dv1.cpu(), dv3, 1e-12 if dtype == torch.float64 else 1e-6, "dv vs CPU launcher", check_dtype=True)


@backend_only(OP, "cuda")
def test_cuda_forward_only():
    args, rowptr = make_case(torch.float32, "cuda", seed=9)
    args["x_proj"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only"):
        compiled.message_passing_cuda(**args, rowptr=rowptr)
    with torch.no_grad():
        ds, _ = compiled.message_passing_cuda(**args, rowptr=rowptr)
    assert not ds.requires_grad


# --------------------------------------------------------------------------------------------------
# cpu: the fused C++ backend and its backward (the window itself: tests/ops/test_radial_window.py)
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "cpu")
@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("path", ["auto", "portable"])
@pytest.mark.parametrize("radial", ["window", "exact"])
def test_cpu_paths_and_radial_modes(dtype, rel, path, radial):
    """Both code paths (AVX-512 where the CPU has it, and the portable one) with the windowed and the
    exact radial projection; H=40 and 300 leave a partial block of channels."""
    for hidden, num_rbf, cutoff, seed in SHAPES:
        args, rowptr = make_case(dtype, "cpu", hidden, num_rbf, cutoff, seed)
        ds0, dv0 = reference_op(**args)
        with torch.no_grad():
            ds, dv = compiled.message_passing_fused_cpu(**args, rowptr=rowptr, out=poisoned(args), path=path,
                                                         radial=radial)
        assert_close(ds, ds0, rel, f"ds H={hidden}", check_dtype=True)
        assert_close(dv, dv0, rel, f"dv H={hidden}", check_dtype=True)


@backend_only(OP, "cpu")
def test_cpu_exact_mode_float64_to_rounding():
    """Without the window the op is the reference's arithmetic in another order: 1e-13."""
    args, rowptr = make_case(torch.float64, "cpu", hidden=48, cutoff=30.0, seed=11)
    ds0, dv0 = reference_op(**args)
    for path in ("auto", "portable"):
        ds, dv = compiled.message_passing_fused_cpu(**args, rowptr=rowptr, radial="exact", path=path)
        assert_close(ds, ds0, 1e-13, "ds")
        assert_close(dv, dv0, 1e-13, "dv")


@backend_only(OP, "cpu")
def test_cpu_deterministic_over_threads_and_weight_layout():
    """Bitwise the same result for any thread count and for W passed transposed in memory. (Large
    enough for 3 threads: a call gets one thread per ~8 M multiply-adds, csrc/fused_cpu.h.)"""
    args, rowptr = make_case(torch.float32, "cpu", hidden=64, seed=5, sizes=(1, 9, 1, 12) + (40,) * 30)
    ds1, dv1 = compiled.message_passing_fused_cpu(**args, rowptr=rowptr, num_threads=1)
    ds2, dv2 = compiled.message_passing_fused_cpu(**args, rowptr=rowptr, num_threads=3)
    assert torch.equal(ds1, ds2) and torch.equal(dv1, dv2)
    weight_t = args["edge_weight"].t().contiguous().t()
    ds3, dv3 = compiled.message_passing_fused_cpu(**dict(args, edge_weight=weight_t), rowptr=rowptr)
    assert torch.equal(ds1, ds3) and torch.equal(dv1, dv3)


@backend_only(OP, "cpu")
def test_cpu_rejects_invalid_input_and_gradients():
    args, rowptr = make_case(torch.float64, "cpu", seed=7)
    bad = rowptr.clone()
    bad[3] += 1  # a receiver's range holds another's edge
    with pytest.raises(ValueError, match="invalid edges"):
        compiled.message_passing_fused_cpu(**args, rowptr=bad)
    ei = args["edge_index"].clone()
    ei[0, 0] = 10**6  # source out of range
    with pytest.raises(ValueError, match="invalid edges"):
        compiled.message_passing_fused_cpu(**dict(args, edge_index=ei), rowptr=rowptr)
    with pytest.raises(ValueError, match="radial"):
        compiled.message_passing_fused_cpu(**args, rowptr=rowptr, radial="table")
    centres = args["rbf_centres"].clone().requires_grad_(True)  # the basis is fixed: no gradient to it
    with pytest.raises(RuntimeError, match="rbf_centres"):
        compiled.message_passing_fused_cpu(**dict(args, rbf_centres=centres), rowptr=rowptr)
    x_proj = args["x_proj"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="out= buffers cannot carry gradients"):
        compiled.message_passing_fused_cpu(**dict(args, x_proj=x_proj), rowptr=rowptr, out=poisoned(args))


@backend_only(OP, "cpu")
def test_cpu_is_the_default_for_inference_and_training():
    assert ops.resolve(OP, "auto", "cpu", needs_grad=False)[0] == "cpu"
    assert ops.resolve(OP, "auto", "cpu", needs_grad=True)[0] == "cpu"


@backend_only(OP, "cpu")
@pytest.mark.parametrize("radial", compiled.RADIAL_MODES)
def test_cpu_backward_against_the_float64_reference(radial):
    """The fused backward's float64 gradients of every input: the reference's within 1e-10 (window:
    the dropped Gaussians' derivatives; exact: rounding), without edges and with receivers beyond
    the basis cutoff, and the same bits whatever the forward's thread count and on both paths (the
    AVX-512 one is the portable code compiled for it, sums in the same order)."""
    args, rowptr = make_case(torch.float64, "cpu", hidden=24, num_rbf=128, cutoff=4.0, seed=11)
    _, _, expected = run(reference_op, args)
    grads = [run(compiled.message_passing_fused_cpu, args, rowptr=rowptr, radial=radial, num_threads=threads,
                 path=path)[2] for threads, path in ((1, "auto"), (2, "auto"), (1, "portable"))]
    for name in INPUTS:
        assert_close(grads[0][name], expected[name], 1e-10, f"d/d {name}", check_dtype=True)
        assert torch.equal(grads[0][name], grads[1][name]) and torch.equal(grads[0][name], grads[2][name]), name
    empty = without_edges(args)
    _, _, zero = run(compiled.message_passing_fused_cpu, empty, rowptr=torch.zeros(len(rowptr), dtype=torch.int64))
    assert all((g == 0).all() for g in zero.values())


@backend_only(OP, "cpu")
def test_cpu_backward_gradients_in_the_inputs_dtypes():
    """Inputs of mixed dtypes are computed in x_proj's; each gradient comes back in its input's dtype."""
    args, rowptr = make_case(torch.float32, "cpu", hidden=8, num_rbf=32, seed=12)
    args["positions"] = args["positions"].double()
    _, _, grads = run(compiled.message_passing_fused_cpu, args, rowptr=rowptr)
    assert grads["positions"].dtype == torch.float64 and grads["x_proj"].dtype == torch.float32


@backend_only(OP, "cpu")
def test_cpu_trains_the_golden_model(golden_model):
    """E3Relax(H=32) with the golden weights in paper mode under autograd with backend "auto" (the
    atom–atom op the fused CPU one, the lattice op the reference): the golden loss (1e-12), and the
    gradients of every parameter and of the input positions and cell those of the reference backend
    (1e-10 of the largest entry), the golden ones where the golden run kept them."""
    assert ops.resolve(OP, "auto", "cpu", needs_grad=True)[0] == "cpu"
    grads = {}
    for name in ("reference", "auto"):
        model = golden_model_instance(golden_model, paper_compat=True)
        model.backend = name
        batch = golden_batch(golden_model)
        batch.positions.requires_grad_(True)
        batch.cells.requires_grad_(True)
        loss = layerwise_loss(model(batch), torch.from_numpy(golden_model["in/pos_r"]),
                              torch.from_numpy(golden_model["in/cell_r"]))
        loss.total.backward()
        assert abs(loss.total.item() - golden_model["loss/total"]) < 1e-12
        grads[name] = {p_name: p.grad for p_name, p in model.named_parameters()}
        grads[name].update(pos_u=batch.positions.grad, cell_u=batch.cells.grad)
    for name, g in grads["reference"].items():
        assert_close(grads["auto"][name], g, 1e-10, f"grad {name}")
        if f"grad/{name}" in golden_model:
            expected = golden_model[f"grad/{name}"]
            assert np.abs(grads["auto"][name].numpy() - expected).max() <= 1e-10 * np.abs(expected).max(), name


@backend_only(OP, "cpu")
@pytest.mark.parametrize("paper_compat", [True, False])
def test_cpu_model_golden_float64(golden_model, paper_compat):
    """E3Relax(H=32) with the golden weights, inference (no autograd) with backend "cpu" for both
    gated message ops (windowed projection): the golden outputs (paper mode) and the reference
    backend's outputs within 1e-12, as the reference itself."""
    outs = {}
    for name in ("reference", "cpu"):
        model = golden_model_instance(golden_model, paper_compat=paper_compat)
        model.backend = name
        with torch.inference_mode():
            outs[name] = model(golden_batch(golden_model))
    for n in range(4):
        if paper_compat:
            np.testing.assert_allclose(outs["cpu"].positions[n].numpy(), golden_model[f"out/pos_L{n}"], rtol=0,
                                       atol=1e-12)
            np.testing.assert_allclose(outs["cpu"].cells[n].numpy(), golden_model[f"out/cell_L{n}"], rtol=0,
                                       atol=1e-12)
        assert_close(outs["cpu"].positions[n], outs["reference"].positions[n], 1e-12, f"positions L{n}")
        assert_close(outs["cpu"].cells[n], outs["reference"].cells[n], 1e-12, f"cells L{n}")


@backend_only(OP, "cpu")
def test_cpu_batches_of_relax_batch():
    """relax_batch's default atom budget on CPU follows the message ops: larger batches with the fused
    backend (which keeps no edge tensors), small ones with the reference's."""
    from e3relax_fast import relax

    model = E3Relax(hidden_channels=16, num_layers=1)
    assert relax._atom_budget(model, torch.device("cpu"), 50) == relax.DEFAULT_MAX_ATOMS["cpu"]
    model.backend = "reference"
    assert relax._atom_budget(model, torch.device("cpu"), 50) == relax.DEFAULT_MAX_ATOMS_REFERENCE_OPS
    assert relax.DEFAULT_MAX_ATOMS_REFERENCE_OPS < relax.DEFAULT_MAX_ATOMS["cpu"]


@pytest.mark.parametrize("op", [OP, "lattice_message"])
def test_cpu_unavailable_says_why(monkeypatch, op):
    """Without the extension, or with one built from older sources, backend cpu is unavailable with
    the reason (auto then falls back to the reference), not broken."""
    monkeypatch.setattr(compiled, "_C", types.SimpleNamespace())
    with pytest.raises(ops.BackendUnavailableError, match="older sources"):
        ops.OPS[op].impls["cpu"].load()
    monkeypatch.setattr(compiled, "_C", None)
    monkeypatch.setattr(compiled, "IMPORT_ERROR", "e3relax_fast._C is not importable (test)")
    with pytest.raises(ops.BackendUnavailableError, match="not importable \\(test\\)"):
        ops.OPS[op].impls["cpu"].load()


@backend_only(OP, "cpu")
def test_cpu_model_refuses_autograd(golden_model):
    """A model with backend "cpu" named takes the lattice op's fused CPU backend too, which is forward
    only: under autograd it says so (train with "auto": the atom–atom op fused, the lattice op the
    reference)."""
    model = golden_model_instance(golden_model, paper_compat=False)
    model.backend = "cpu"
    with pytest.raises(RuntimeError, match="lattice_message backend 'cpu' is forward only"):
        model(golden_batch(golden_model))


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "triton")
def test_triton_many_tiles_and_programs_float64():
    """Small tiles: several channel blocks (H=48, with a partial one), edge tiles per receiver, K
    steps (R=40, with a partial one) in the forward and the backward, receiver/source blocks and
    basis-kernel edge blocks, the last one of each partial."""
    km = triton_module(OP)
    config = km.KernelConfig(block_e=16, block_h=32, block_k=16, bwd_block_k=16, basis_block_e=16,
                             fwd_nodes_per_program=4, bwd_nodes_per_program=6)
    args, rowptr = make_case(torch.float64, backend_device("triton"), hidden=48, num_rbf=40, seed=3,
                             sizes=(1, 4, 1, 7, 2))
    ds0, dv0, g0 = run(reference_op, on_cpu(args))
    ds1, dv1, g1 = run(km.message_passing, args, rowptr=rowptr, config=config)
    assert_close(ds1, ds0, 1e-10, "ds")
    assert_close(dv1, dv0, 1e-10, "dv")
    for name in INPUTS:
        assert_close(g1[name], g0[name], 1e-10, f"d/d {name}")


@backend_only(OP, "triton")
def test_triton_source_order_cached_per_graph():
    """The backward's source-sorted permutation is built once per graph (kept on edge_index) and
    rebuilt when the graph changes in place; every layer of a model reuses it."""
    km = triton_module(OP)
    args, rowptr = make_case(torch.float64, backend_device("triton"), hidden=8, num_rbf=16, seed=7, sizes=(1, 3))
    n, edge_index = args["vec"].shape[0], args["edge_index"]
    x_proj = args["x_proj"].clone().requires_grad_(True)
    for _ in range(2):
        ds, dv = km.message_passing(**dict(args, x_proj=x_proj), rowptr=rowptr)
        (ds.sum() + dv.sum()).backward()
    cached = getattr(edge_index, km._CSR_ATTRIBUTE)  # kept by the forward that needed a backward
    perm, colptr = km.source_csr(edge_index, n)
    assert perm is cached[1]
    assert km.source_csr(edge_index, n)[0] is perm  # cached, not recomputed
    src = edge_index[0].cpu()
    assert torch.equal(src[perm.cpu()], torch.sort(src, stable=True).values)
    assert torch.equal(colptr.cpu(), torch.searchsorted(src[perm.cpu()], torch.arange(n + 1)))
    with torch.no_grad():
        edge_index[0].copy_(edge_index[0].flip(0))  # in place: a new version of the graph
    perm2, _ = km.source_csr(edge_index, n)
    assert perm2 is not perm and torch.equal(edge_index[0].cpu()[perm2.cpu()],
                                             torch.sort(edge_index[0].cpu(), stable=True).values)


@backend_only(OP, "triton")
def test_triton_tuning_configs_are_valid():
    """The autotune table's configurations (swept on hardware) all pass the config checks."""
    km = triton_module(OP)
    for dtype in (torch.float32, torch.float64):
        configs = km.tuning_configs(dtype)
        assert configs[0] == km.KernelConfig(**km.gpu_tiles(dtype, 512)) and len(set(configs)) == len(configs) > 4
        for cfg in configs:
            cfg.check(dtype, "block_e")
            cfg.check(dtype, "bwd_block_e")


@backend_only(OP, "triton")
def test_triton_rowptr_required():
    args, _ = make_case(torch.float64, backend_device("triton"), sizes=(2,))
    with pytest.raises(ValueError, match="rowptr"):
        triton_module(OP).message_passing(**args)


@backend_only(OP, "triton")
def test_triton_model_runs_under_bf16_autocast(golden_model):
    """relax_batch(precision="bf16") autocasts the model: the fused ops still get one working dtype
    (float32) and the result stays near the float32 one (bf16 only changes torch's own matmuls)."""
    device = backend_device("triton")
    batch = golden_batch(golden_model, torch.float32).to(device)
    model = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32).to(device).eval()
    model.backend = "triton"
    with torch.no_grad():
        plain = model(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            auto = model(batch)
    assert auto.positions[-1].dtype == torch.float32
    dev = float((auto.positions[-1] - plain.positions[-1]).abs().max())
    assert 0 < dev < 0.05


# --------------------------------------------------------------------------------------------------
# cueq
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "cueq")
def test_cueq_naive_method_on_cpu():
    from e3relax_fast.ops import cueq

    assert cueq.method_for(torch.device("cpu")) == "naive"


@backend_only(OP, "cueq")
def test_cueq_no_warnings_or_log_on_cpu(caplog):
    from e3relax_fast.ops import cueq

    args, _ = make_case(torch.float64, "cpu", hidden=4, seed=4, sizes=(2,))
    cueq._MODULES.clear()  # rebuild the cuequivariance module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.DEBUG):
            cueq.message_passing(**args)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@backend_only(OP, "cueq")
def test_cueq_descriptor_structure_and_equivariance():
    """The flattened polynomial has the single uniform mode ``uniform_1d`` needs, and the declared
    O(3) irreps (0e, 1o; ir_mul) make it equivariant: rotations and the inversion commute with it."""
    import cuequivariance as cue

    from e3relax_fast.ops import cueq

    h = 3
    ep = cueq.message_descriptor(h)
    flat = ep.polynomial.flatten_coefficient_modes().squeeze_modes()
    assert [o.ndim for o in flat.operands] == [1, 1, 1, 0, 1, 1]
    assert all(o.all_same_segment_shape() for o in flat.operands)
    assert {o.segment_shape for o in flat.operands if o.ndim == 1} == {(h,)}
    assert all(stp.coefficient_subscripts == "" for _, stp in flat.operations)
    assert sum(stp.num_paths for _, stp in flat.operations) == 7
    # cuequivariance's real l=1 basis is (x, y, z): a quarter turn about z maps x to y.
    np.testing.assert_allclose(cue.O3(1, -1).rotation(np.array([0.0, 0.0, 1.0]), np.pi / 2) @ [1, 0, 0],
                               [0, 1, 0], atol=1e-12)

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(rep.dim) for rep in ep.inputs]
    outs = ep(*xs)
    for inversion in (0, 1):
        alpha = rng.standard_normal(3)
        act = [rep.exp_map(alpha, np.array([inversion])) for rep in ep.operands]
        rotated = ep(*[m @ x for m, x in zip(act, xs, strict=False)])
        for m, out, got in zip(act[len(xs):], outs, rotated, strict=True):
            np.testing.assert_allclose(got, m @ out, atol=1e-12)
    # Numpy evaluation of one edge equals the formula in our (3, H) layout.
    gate, xp, vec, u = xs
    b1, b2, b3 = np.split(gate * xp / math.sqrt(3), 3)
    np.testing.assert_allclose(outs[0], b3, atol=1e-14)
    expected_dv = (b1 * vec.reshape(3, h) + u[:, None] * b2) / math.sqrt(h)
    np.testing.assert_allclose(outs[1], expected_dv.reshape(-1), atol=1e-14)


def test_package_imports_without_cuequivariance():
    """With cuequivariance unimportable the package still imports and names the missing backend."""
    code = (
        "import sys\n"
        "sys.modules['cuequivariance'] = sys.modules['cuequivariance_torch'] = None\n"
        "import e3relax_fast\n"
        "from e3relax_fast import ops\n"
        "assert 'cueq' not in ops.available('message_passing')\n"
        "try:\n"
        "    ops.resolve('message_passing', 'cueq', 'cpu')\n"
        "except e3relax_fast.BackendUnavailableError as exc:\n"
        "    assert 'cueq' in str(exc) and 'cuequivariance' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('cueq resolved')\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
