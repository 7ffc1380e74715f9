"""The cuequivariance message op (backend "cueq") against its reference twin (spec §6 Step B).

Without a GPU (or without ``cuequivariance_ops_torch``) the polynomial runs cuequivariance's naive
PyTorch method; the structure the CUDA ``uniform_1d`` method needs is checked on the descriptor.
The op allocates no output buffer of its own (cuequivariance returns zero-initialised scattered
outputs), so there is nothing to NaN-poison; receivers without edges are checked to be exact zeros.
"""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close as conftest_assert_close
from conftest import golden_batch, golden_model_instance, run_with_grads

pytest.importorskip("cuequivariance_torch", reason="cuequivariance-torch is not installed "
                    "(pip install 'e3relax-fast[cueq]')")

import cuequivariance as cue  # noqa: E402

from e3relax_fast import ops
from e3relax_fast.model import E3Relax  # noqa: E402
from e3relax_fast.ops import cueq  # noqa: E402
from e3relax_fast.reference.message_passing import message_passing as reference_op  # noqa: E402
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient  # noqa: E402
from e3relax_fast.training.loss import layerwise_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INPUTS = ("x_proj", "vec", "positions", "cells", "edge_weight", "edge_bias")


def random_case(dtype, hidden=16, num_rbf=32, cutoff=6.0, seed=0, sizes=(1, 5, 1, 7, 2), shuffle=True):
    """Random batch of crystals of the given sizes (1-atom crystals included).

    Each atom receives 0..12 edges from random atoms of its crystal at random images (offsets in
    -2..2, so some edges exceed the cutoff); the first atom of every crystal larger than one atom
    receives none, and every 1-atom crystal has periodic self-image edges only. With ``shuffle``
    the edges are not sorted by receiver (the op must not need an order).
    """
    gen = torch.Generator().manual_seed(seed)
    n, num_graphs = sum(sizes), len(sizes)
    sizes_t = torch.tensor(sizes)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_t, 0)])
    graph = torch.repeat_interleave(torch.arange(num_graphs), sizes_t)
    cells = torch.eye(3, dtype=torch.float64) * 3.5 + 0.4 * torch.randn(num_graphs, 3, 3, generator=gen,
                                                                         dtype=torch.float64)
    positions = torch.einsum("np,npq->nq", torch.rand(n, 3, generator=gen, dtype=torch.float64), cells[graph])
    degree = torch.randint(1, 13, (n,), generator=gen)
    degree[ptr[:-1][sizes_t > 1]] = 0
    dst = torch.repeat_interleave(torch.arange(n), degree)
    g = graph[dst]
    src = ptr[g] + (torch.rand(len(dst), generator=gen) * sizes_t[g]).long()
    offsets = torch.randint(-2, 3, (len(dst), 3), generator=gen)
    self_zero = (src == dst) & (offsets.abs().sum(1) == 0)
    offsets[self_zero, 0] = 1  # no zero-length self edge
    if shuffle:
        perm = torch.randperm(len(dst), generator=gen)
        src, dst, offsets = src[perm], dst[perm], offsets[perm]
    edge_index = torch.stack([src, dst])
    centres = rbf_centres(num_rbf)
    args = dict(
        x_proj=torch.randn(n, 3 * hidden, generator=gen, dtype=torch.float64),
        vec=torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64),
        positions=positions,
        cells=cells,
        edge_index=edge_index,
        cell_offsets=offsets,
        edge_graph=graph[dst],
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
    return args


def run(op, args, requires=INPUTS, seed=1):
    """``(ds, dv, gradients)`` of a random linear functional of both outputs."""
    return run_with_grads(op, args, INPUTS, requires, seed)


assert_close = functools.partial(conftest_assert_close, check_dtype=True)




def test_registered():
    name, fn = ops.resolve("message_passing", "cueq", DEVICE.type)
    assert name == "cueq" and fn is cueq.message_passing
    assert cueq.method_for(torch.device("cpu")) == "naive"


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
def test_matches_reference(dtype, rel):
    args = random_case(dtype)
    ds0, dv0, g0 = run(reference_op, args)
    ds1, dv1, g1 = run(cueq.message_passing, args)
    assert_close(ds1, ds0, rel, "ds")
    assert_close(dv1, dv0, rel, "dv")
    for name in INPUTS:
        assert_close(g1[name], g0[name], rel, f"d/d {name}")
    silent = args["edge_index"][1].bincount(minlength=len(ds1)) == 0
    assert silent.sum() >= 3  # receivers with no edges get exact zeros
    assert (ds1[silent] == 0).all() and (dv1[silent] == 0).all()


def test_partial_gradients_and_sorted_edges():
    args = random_case(torch.float64, hidden=8, seed=3, sizes=(2, 1, 3), shuffle=False)
    for requires in (("x_proj", "vec"), ("positions",), ("cells", "edge_bias"), ("edge_weight",)):
        _, _, g0 = run(reference_op, args, requires=requires)
        _, _, g1 = run(cueq.message_passing, args, requires=requires)
        for name in requires:
            assert_close(g1[name], g0[name], 1e-10, f"d/d {name} (requires {requires})")


def test_no_edges():
    args = random_case(torch.float64, hidden=8, seed=2, sizes=(1, 2))
    args["edge_index"] = args["edge_index"][:, :0]
    args["cell_offsets"] = args["cell_offsets"][:0]
    args["edge_graph"] = args["edge_graph"][:0]
    with torch.no_grad():
        ds, dv = cueq.message_passing(**args)
    assert ds.shape == (3, 8) and dv.shape == (3, 3, 8)
    assert (ds == 0).all() and (dv == 0).all()
    _, _, g0 = run(reference_op, args)
    _, _, g1 = run(cueq.message_passing, args)
    for name in INPUTS:
        assert torch.equal(g1[name], g0[name]), name


def test_no_warnings_or_log_on_cpu(caplog):
    args = random_case(torch.float64, hidden=4, seed=4, sizes=(2,))
    cueq._MODULES.clear()  # rebuild the cuequivariance module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.DEBUG):
            cueq.message_passing(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_descriptor_structure_and_equivariance():
    """The flattened polynomial has the single uniform mode ``uniform_1d`` needs, and the declared
    O(3) irreps (0e, 1o; ir_mul) make it equivariant: rotations and the inversion commute with it."""
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


def test_model_golden_parity_paper_float64(golden_model):
    """E3Relax(H=32) with the golden weights in paper mode: backend "cueq" agrees with the reference
    backend (forward 1e-12, loss gradients 1e-10) and with the golden outputs."""
    outs, grads = {}, {}
    for backend in ("reference", "cueq"):
        model = golden_model_instance(golden_model, paper_compat=True)
        model.backend = backend
        batch = golden_batch(golden_model)
        batch.positions.requires_grad_(True)
        out = model(batch)
        targets = (torch.from_numpy(golden_model["in/pos_r"]), torch.from_numpy(golden_model["in/cell_r"]))
        layerwise_loss(out, *targets).total.backward()
        outs[backend] = out
        grads[backend] = {name: p.grad for name, p in model.named_parameters()}
        grads[backend]["pos_u"] = batch.positions.grad
    out, ref = outs["cueq"], outs["reference"]
    for n in range(4):
        assert_close(out.positions[n].detach(), ref.positions[n].detach(), 1e-12, f"positions L{n}")
        assert_close(out.cells[n].detach(), ref.cells[n].detach(), 1e-12, f"cells L{n}")
        np.testing.assert_allclose(out.positions[n].detach().numpy(), golden_model[f"out/pos_L{n}"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.cells[n].detach().numpy(), golden_model[f"out/cell_L{n}"], rtol=0, atol=1e-12)
    for name, g in grads["reference"].items():
        assert_close(grads["cueq"][name], g, 1e-10, f"grad {name}")


def test_model_float32_default_mode(golden_model):
    outs = {}
    for backend in ("reference", "cueq"):
        model = golden_model_instance(golden_model, paper_compat=False, dtype=torch.float32)
        model.backend = backend
        outs[backend] = model(golden_batch(golden_model, torch.float32))
    for n in range(4):
        assert_close(outs["cueq"].positions[n].detach(), outs["reference"].positions[n].detach(), 5e-6, "pos")
        assert_close(outs["cueq"].cells[n].detach(), outs["reference"].cells[n].detach(), 5e-6, "cell")


def test_model_backend_argument():
    assert E3Relax(hidden_channels=16, num_layers=1, backend="cueq").backend == "cueq"


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
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
