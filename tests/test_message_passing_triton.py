"""The fused Triton message op against its reference twin (spec §6 Step B, §13.8).

Without a GPU the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before any kernel module is imported); shapes are kept small because the interpreter
costs about a millisecond per program and per interpreted operation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_close, golden_batch, golden_model_instance, require_triton_backend, run_with_grads

require_triton_backend("message_passing")

from e3relax_fast.kernels import message_passing as km  # noqa: E402
from e3relax_fast.kernels import utils as ku  # noqa: E402

from e3relax_fast import ops  # noqa: E402
from e3relax_fast.model import E3Relax  # noqa: E402
from e3relax_fast.reference.message_passing import message_passing as reference_op  # noqa: E402
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient  # noqa: E402
from e3relax_fast.training.loss import layerwise_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INPUTS = ("x_proj", "vec", "positions", "cells", "edge_weight", "edge_bias")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must fill starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(ku, "POISON_OUTPUTS", True)


def random_case(dtype, hidden=32, num_rbf=128, cutoff=6.0, seed=0, sizes=(1, 4, 1, 7, 2)):
    """Random receiver-sorted batch of crystals of the given sizes.

    In-degrees are random in 1..20 except: the 1-atom crystals get 6 and 56 periodic self-image
    edges, one receiver has none and one has 56. Offsets reach two cells, so some edges are longer
    than ``cutoff`` (envelope 0) and some shorter.
    """
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    cells = torch.eye(3, dtype=torch.float64).repeat(len(sizes), 1, 1) * 3.5
    cells = cells + 0.4 * torch.randn(len(sizes), 3, 3, generator=gen, dtype=torch.float64)
    frac = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    graph = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    positions = torch.einsum("np,npq->nq", frac, cells[graph])
    one_atom = [g for g, s in enumerate(sizes) if s == 1]
    degree = torch.randint(1, 21, (n,), generator=gen)
    big = [g for g, s in enumerate(sizes) if s > 1]
    degree[ptr[big[0]]] = 0
    degree[ptr[big[-1]] + 1] = 56
    if one_atom:
        degree[ptr[one_atom[0]]] = 6
        degree[ptr[one_atom[-1]]] = 56
    src, dst, offsets = [], [], []
    for i in range(n):
        g = int(graph[i])
        for _ in range(int(degree[i])):
            while True:
                j = int(ptr[g] + torch.randint(0, sizes[g], (1,), generator=gen))
                o = torch.randint(-2, 3, (3,), generator=gen)
                if j != i or o.abs().sum() > 0:
                    break
            src.append(j)
            dst.append(i)
            offsets.append(o)
    edge_index = torch.tensor([src, dst], dtype=torch.int64)
    rowptr = torch.searchsorted(edge_index[1], torch.arange(n + 1))
    centres = rbf_centres(num_rbf)
    args = dict(
        x_proj=torch.randn(n, 3 * hidden, generator=gen, dtype=torch.float64),
        vec=torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64),
        positions=positions,
        cells=cells,
        edge_index=edge_index,
        cell_offsets=torch.stack(offsets),
        edge_graph=graph[edge_index[1]],
        edge_weight=torch.randn(3 * hidden, num_rbf, generator=gen, dtype=torch.float64) / math.sqrt(num_rbf),
        edge_bias=torch.randn(3 * hidden, generator=gen, dtype=torch.float64) * 0.1,
        rbf_centres=centres,
        rbf_coeff=rbf_coefficient(centres),
        cutoff=cutoff,
    )
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE)
            args[name] = value.to(dtype) if value.is_floating_point() else value
    return args, rowptr.to(DEVICE)


def run(op, args, requires=INPUTS, seed=1, **kwargs):
    """``(ds, dv, gradients)`` of a random linear functional of both outputs."""
    return run_with_grads(op, args, INPUTS, requires, seed, **kwargs)




def compare(dtype, rel, config=None, **case):
    args, rowptr = random_case(dtype, **case)
    ds0, dv0, g0 = run(reference_op, args)
    ds1, dv1, g1 = run(km.message_passing, args, rowptr=rowptr, config=config)
    assert_close(ds1, ds0, rel, "ds")
    assert_close(dv1, dv0, rel, "dv")
    for name in INPUTS:
        assert_close(g1[name], g0[name], rel, f"d/d {name}")


def test_registered():
    name, fn = ops.resolve("message_passing", "triton", DEVICE.type)
    assert name == "triton" and fn is km.message_passing


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
def test_matches_reference(dtype, rel):
    compare(dtype, rel)


def test_many_tiles_and_programs_float64():
    """Small tiles: several channel blocks (H=48, with a partial one), edge tiles per receiver, K
    steps (R=40, with a partial one) and receiver/source blocks, the last one partial."""
    config = km.KernelConfig(block_e=16, block_h=32, block_k=16, fwd_nodes_per_program=4,
                             bwd_nodes_per_program=6)
    compare(torch.float64, 1e-10, config=config, hidden=48, num_rbf=40, seed=3)


def test_partial_gradients_float64():
    """Only some inputs need a gradient: the kernels skip the W or the geometry terms."""
    args, rowptr = random_case(torch.float64, seed=5, sizes=(1, 3))
    for requires in (("x_proj", "vec"), ("positions",), ("cells", "edge_bias"), ("edge_weight",)):
        _, _, g0 = run(reference_op, args, requires=requires)
        _, _, g1 = run(km.message_passing, args, requires=requires, rowptr=rowptr)
        for name in requires:
            assert_close(g1[name], g0[name], 1e-10, f"d/d {name} (requires {requires})")


def test_no_edges_and_no_grad():
    args, rowptr = random_case(torch.float64, seed=2, sizes=(1, 2))
    args["edge_index"] = args["edge_index"][:, :0]
    args["cell_offsets"] = args["cell_offsets"][:0]
    args["edge_graph"] = args["edge_graph"][:0]
    with torch.no_grad():
        ds, dv = km.message_passing(**args, rowptr=torch.zeros_like(rowptr))
    assert (ds == 0).all() and (dv == 0).all()
    ds0, dv0, g0 = run(reference_op, args)
    ds1, dv1, g1 = run(km.message_passing, args, rowptr=torch.zeros_like(rowptr))
    for name in INPUTS:
        assert torch.equal(g1[name], g0[name]), name


def test_rowptr_required():
    args, _ = random_case(torch.float64, sizes=(2,))
    with pytest.raises(ValueError, match="rowptr"):
        km.message_passing(**args)


def test_gradcheck_float64():
    args, rowptr = random_case(torch.float64, hidden=16, num_rbf=16, seed=4, sizes=(1, 3))
    tensors = [args[k].detach().clone().requires_grad_(True) for k in INPUTS]

    def op(*inputs):
        kw = dict(args)
        kw.update(zip(INPUTS, inputs, strict=True))
        return km.message_passing(**kw, rowptr=rowptr)

    assert torch.autograd.gradcheck(op, tensors, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
    # Full Jacobian for the geometry (the least direct part of the backward), of the outputs
    # contracted over channels to keep the number of backward passes small.
    fixed = [t.detach() for t in tensors]
    w_s = torch.randn(16, dtype=torch.float64, device=DEVICE)
    w_v = torch.randn(16, dtype=torch.float64, device=DEVICE)

    def op_geometry(positions, cells):
        ds, dv = op(fixed[0], fixed[1], positions, cells, *fixed[4:])
        return ds @ w_s, dv @ w_v

    assert torch.autograd.gradcheck(op_geometry, tensors[2:4], eps=1e-6, atol=1e-8, rtol=1e-6)


def test_model_golden_parity_paper_float64(golden_model):
    """E3Relax(H=32) with the golden weights: the triton backend reproduces the golden outputs,
    loss and gradients (same tolerances as the reference) and agrees with the reference backend."""
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        model = golden_model_instance(golden_model, paper_compat=True)
        model.backend = backend
        batch = golden_batch(golden_model)
        batch.positions.requires_grad_(True)
        batch.cells.requires_grad_(True)
        out = model(batch)
        targets = (torch.from_numpy(golden_model["in/pos_r"]), torch.from_numpy(golden_model["in/cell_r"]))
        loss = layerwise_loss(out, *targets)
        loss.total.backward()
        outs[backend] = (out, loss)
        grads[backend] = {name: p.grad for name, p in model.named_parameters()}
        grads[backend]["pos_u"] = batch.positions.grad
        grads[backend]["cell_u"] = batch.cells.grad
    out, loss = outs["triton"]
    for n in range(4):
        np.testing.assert_allclose(out.positions[n].detach().numpy(), golden_model[f"out/pos_L{n}"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.cells[n].detach().numpy(), golden_model[f"out/cell_L{n}"], rtol=0, atol=1e-12)
    assert abs(loss.total.item() - golden_model["loss/total"]) < 1e-12
    for key in golden_model:
        name = key.removeprefix("grad/")
        if key.startswith("grad/") and name in grads["triton"]:
            expected = golden_model[key]
            err = np.abs(grads["triton"][name].numpy() - expected).max()
            assert err <= 1e-10 * np.abs(expected).max(), name
    ref_out, _ = outs["reference"]
    for n in range(4):
        assert_close(out.positions[n].detach(), ref_out.positions[n].detach(), 1e-12, f"positions L{n}")
        assert_close(out.cells[n].detach(), ref_out.cells[n].detach(), 1e-12, f"cells L{n}")
    for name, g in grads["reference"].items():
        assert_close(grads["triton"][name], g, 1e-10, f"grad {name}")


def test_model_float32_matches_reference(golden_model):
    """Default mode in float32: the triton backend stays within float32 rounding of the reference."""
    outs = {}
    for backend in ("reference", "triton"):
        model = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32)
        model.backend = backend
        outs[backend] = model(golden_batch(golden_model, torch.float32))
    for n in range(4):
        assert_close(outs["triton"].positions[n].detach(), outs["reference"].positions[n].detach(), 5e-6, "pos")
        assert_close(outs["triton"].cells[n].detach(), outs["reference"].cells[n].detach(), 5e-6, "cell")


def test_model_runs_under_bf16_autocast(golden_model):
    """relax_batch(precision="bf16") autocasts the model: the fused ops still get one working dtype
    (float32) and the result stays near the float32 one (bf16 only changes torch's own matmuls)."""
    batch = golden_batch(golden_model, torch.float32)
    model = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32).eval()
    model.backend = "triton"
    with torch.no_grad():
        plain = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(batch)
    assert auto.positions[-1].dtype == torch.float32
    dev = float((auto.positions[-1] - plain.positions[-1]).abs().max())
    assert 0 < dev < 0.05


def test_model_backend_argument():
    model = E3Relax(hidden_channels=16, num_layers=1, backend="triton")
    assert model.backend == "triton"
