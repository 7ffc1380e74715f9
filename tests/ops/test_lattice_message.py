"""Op ``lattice_message``: the fused lattice -> atom message (spec §6 Steps 0 and A, §13.8) of every
backend against its reference twin (e3relax_fast/reference/lattice_message.py), and the model run with
each backend's atom–lattice ops.

Backends: ``cpu`` (the fused C++ inference backend, csrc/fused_cpu.h; forward only, its radial
projection on the window of the basis; it writes into NaN-filled ``out`` buffers) and ``triton``
(kernels/lattice_message.py; without a GPU on Triton's CPU interpreter, so shapes are small; its
output buffers start NaN-poisoned). So an element a backend fails to write fails. ``cuda`` and
``cueq`` have no kernel of this op: a model run with them takes the reference.
"""

from __future__ import annotations

import functools
import math
from unittest import mock

import pytest
import torch
from helpers import (
    assert_close,
    backend_device,
    backend_only,
    backend_params,
    golden_batch,
    golden_model_instance,
    run_with_grads,
    to_device,
    triton_module,
)

from e3relax_fast import ops
from e3relax_fast.ops import compiled
from e3relax_fast.reference.lattice_message import lattice_message as reference_op
from e3relax_fast.reference.message_passing import message_passing as reference_message_passing
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient
from e3relax_fast.training.loss import layerwise_loss

OP = "lattice_message"
BACKENDS = backend_params(OP, "cpu", "triton")
DIFFERENTIABLE = backend_params(OP, "triton")
INPUTS = ("x_proj", "vec", "positions", "cells", "centres", "edge_weight", "edge_bias")


def random_case(dtype, centred, device, hidden=32, num_rbf=128, cutoff=6.0, seed=0, sizes=(1, 4, 1, 7, 2),
                on_lattice_point=True):
    """Random crystals of the given sizes (1-atom ones included), on ``device``.

    Cells are about 3.5 Å and positions lie up to one cell outside their cell, so with the 6 Å
    cutoff some atom–lattice distances are beyond it (envelope 0). With ``on_lattice_point``, atoms
    1, 2 and ptr[3] + 1 sit on lattice point 0, 1 and 2 of their crystal (q = 0 in the paper form,
    ~1e-16 Å when centred): the clamped branch of the safe norm. ``centres`` is ``None`` unless
    ``centred``; it is random, not the mean, so that its gradient is exercised independently.
    """
    gen = torch.Generator().manual_seed(seed)
    n, g = sum(sizes), len(sizes)
    graph = torch.repeat_interleave(torch.arange(g), torch.tensor(sizes))
    cells = torch.eye(3, dtype=torch.float64).repeat(g, 1, 1) * 3.5
    cells = cells + 0.4 * torch.randn(g, 3, 3, generator=gen, dtype=torch.float64)
    frac = 3 * torch.rand(n, 3, generator=gen, dtype=torch.float64) - 1
    positions = torch.einsum("np,npq->nq", frac, cells[graph])
    centres = torch.randn(g, 3, generator=gen, dtype=torch.float64) if centred else None
    if on_lattice_point:
        for k, atom in enumerate(range(1, min(4, n))):
            crystal = int(graph[atom])
            positions[atom] = cells[crystal, k] + (centres[crystal] if centred else 0.0)
    centres_rbf = rbf_centres(num_rbf)
    args = dict(
        x_proj=torch.randn(n, 3 * hidden, generator=gen, dtype=torch.float64),
        vec=torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64),
        positions=positions,
        cells=cells,
        graph_index=graph,
        centres=centres,
        edge_weight=torch.randn(3 * hidden, num_rbf, generator=gen, dtype=torch.float64) / math.sqrt(num_rbf),
        edge_bias=torch.randn(3 * hidden, generator=gen, dtype=torch.float64) * 0.1,
        rbf_centres=centres_rbf,
        rbf_coeff=rbf_coefficient(centres_rbf),
        cutoff=cutoff,
    )
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            args[name] = value.to(dtype) if value.is_floating_point() else value
    return args


def run(op, args, k, requires=INPUTS, seed=1, **kwargs):
    """``(ds, v_out, gradients)`` of a random linear functional of both outputs (inputs given as None,
    e.g. centres in the paper form, are skipped)."""
    return run_with_grads(op, args, INPUTS, requires, seed, k=k, **kwargs)


def poisoned(args):
    n, h = args["vec"].shape[0], args["vec"].shape[2]
    like = dict(dtype=args["x_proj"].dtype, device=args["x_proj"].device)
    return torch.full((n, h), math.nan, **like), torch.full((n, 3, h), math.nan, **like)


def compare(op, args, expected_args, k, rel, differentiable=True, **kwargs):
    """``op`` on ``args`` agrees with the reference (on the CPU) on ``expected_args``: outputs and, for
    a differentiable op, gradients (a forward-only op runs without autograd into NaN-filled buffers)."""
    if differentiable:
        ds0, v0, g0 = run(reference_op, to_device(expected_args, "cpu"), k)
        ds1, v1, g1 = run(op, args, k, **kwargs)
        assert set(g1) == set(g0)
        for name in g0:
            assert_close(g1[name], g0[name], rel, f"d/d {name}")
    else:
        ds0, v0 = reference_op(**to_device(expected_args, "cpu"), k=k)
        with torch.no_grad():
            ds1, v1 = op(**args, k=k, out=poisoned(args), **kwargs)
    assert_close(ds1, ds0, rel, "ds")
    assert_close(v1, v0, rel, "v_out")


# --------------------------------------------------------------------------------------------------
# every backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    expected = {"cpu": lambda: compiled.lattice_message_fused_cpu,
                "triton": lambda: triton_module(OP).lattice_message}[backend.name]()
    name, fn = ops.resolve(OP, backend.name, backend.device.type)
    assert name == backend.name and fn is expected


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_reference_float64(backend, centred, k):
    args = random_case(torch.float64, centred, backend.device, seed=k)
    compare(backend.fn, args, args, k, 1e-10, backend.differentiable)


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_float32_error(backend, centred):
    """Float32 kernel against the float64 reference on the same (float32-rounded) inputs, at the
    model's 30 Å cutoff: this measures the kernel's own float32 error. Against the float32
    reference instead, the geometry gradients would differ by up to ~3e-5 relative at a 6 Å cutoff
    (Gaussians 0.05 Å wide), where the float32 reference itself is that far from float64. No atom
    sits on a lattice point here: the direction of a q made of rounding noise is noise."""
    for k in range(3):
        args32 = random_case(torch.float32, centred, backend.device, cutoff=30.0, seed=10 + k,
                             on_lattice_point=False)
        args64 = {name: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for name, v in args32.items()}
        compare(backend.fn, args32, args64, k, 5e-6, backend.differentiable)


@pytest.mark.parametrize("backend", DIFFERENTIABLE, indirect=True)
def test_partial_gradients_float64(backend):
    """Only some inputs need a gradient: the kernel skips the W or the geometry terms."""
    args = random_case(torch.float64, True, backend.device, seed=5, sizes=(1, 3))
    for requires in (("x_proj", "vec"), ("positions",), ("cells", "edge_bias"), ("centres",), ("edge_weight",)):
        _, _, g0 = run(reference_op, to_device(args, "cpu"), 2, requires=requires)
        _, _, g1 = run(backend.fn, args, 2, requires=requires)
        for name in requires:
            assert_close(g1[name], g0[name], 1e-10, f"d/d {name} (requires {requires})")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_no_atoms_and_no_grad(backend):
    args = random_case(torch.float64, True, backend.device, sizes=(1, 2))
    with torch.no_grad():
        ds, v_out = backend.fn(**args, k=0)
        ds0, v0 = reference_op(**to_device(args, "cpu"), k=0)
    assert_close(ds, ds0, 1e-10, "ds")
    assert_close(v_out, v0, 1e-10, "v_out")
    empty = dict(args, x_proj=args["x_proj"][:0], vec=args["vec"][:0], positions=args["positions"][:0],
                 graph_index=args["graph_index"][:0])
    if backend.differentiable:
        ds0, v0, g0 = run(reference_op, to_device(empty, "cpu"), 1)
        ds1, v1, g1 = run(backend.fn, empty, 1)
        for name in g0:
            assert torch.equal(g1[name].cpu(), g0[name]), name
    else:
        with torch.no_grad():
            ds1, v1 = backend.fn(**empty, k=1)
    assert ds1.shape == (0, 32) and v1.shape == (0, 3, 32)


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("backend", DIFFERENTIABLE, indirect=True)
def test_gradcheck_float64(backend, centred):
    args = random_case(torch.float64, centred, backend.device, hidden=16, num_rbf=16, seed=4, sizes=(1, 4))
    names = [name for name in INPUTS if args[name] is not None]
    tensors = [args[name].detach().clone().requires_grad_(True) for name in names]

    def op(*inputs):
        return backend.fn(**dict(args, **dict(zip(names, inputs, strict=True))), k=1)

    assert torch.autograd.gradcheck(op, tensors, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)
    # Full Jacobian for the geometry (the least direct part of the backward), of the outputs
    # contracted over channels to keep the number of backward passes small.
    geometry = [i for i, name in enumerate(names) if name in ("positions", "cells", "centres")]
    w_s = torch.randn(16, dtype=torch.float64, device=backend.device)
    w_v = torch.randn(16, dtype=torch.float64, device=backend.device)

    def op_geometry(*geom):
        inputs = [t.detach() for t in tensors]
        for i, t in zip(geometry, geom, strict=True):
            inputs[i] = t
        ds, v_out = op(*inputs)
        return ds @ w_s, v_out @ w_v

    assert torch.autograd.gradcheck(op_geometry, [tensors[i] for i in geometry], eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# through the model
# --------------------------------------------------------------------------------------------------
def _model_run(golden, backend, device, paper_compat, dtype=torch.float64):
    """Outputs, traced intermediates and loss gradients (parameters, positions, cells; on the CPU) of
    E3Relax(H=32) with the golden weights, run with ``backend`` on ``device``."""
    model = golden_model_instance(golden, paper_compat=paper_compat, dtype=dtype).to(device)
    model.backend = backend
    batch = golden_batch(golden, dtype).to(device)
    batch.positions.requires_grad_(True)
    batch.cells.requires_grad_(True)
    trace = {}
    out = model(batch, trace=trace)
    targets = (torch.from_numpy(golden["in/pos_r"]).to(device, dtype),
               torch.from_numpy(golden["in/cell_r"]).to(device, dtype))
    layerwise_loss(out, *targets).total.backward()
    grads = {name: p.grad.cpu() for name, p in model.named_parameters()}
    grads["pos_u"], grads["cell_u"] = batch.positions.grad.cpu(), batch.cells.grad.cpu()
    return out, trace, grads


@pytest.mark.parametrize("backend", backend_params(OP, "triton", slow={"triton"}), indirect=True)
def test_model_default_mode_matches_reference_float64(golden_model, backend):
    """E3Relax(H=32), golden weights, default mode (centred geometry, the backend's pooling): the
    backend agrees with backend reference in every output, traced intermediate and gradient."""
    out0, trace0, grads0 = _model_run(golden_model, "reference", torch.device("cpu"), paper_compat=False)
    out1, trace1, grads1 = _model_run(golden_model, backend.name, backend.device, paper_compat=False)
    for n in range(4):
        assert_close(out1.positions[n], out0.positions[n], 1e-12, f"positions L{n}")
        assert_close(out1.cells[n], out0.cells[n], 1e-12, f"cells L{n}")
    assert set(trace1) == set(trace0)
    for name, value in trace0.items():
        assert (trace1[name].detach().cpu() - value.detach()).abs().max().item() <= 1e-12, name
    for name, g in grads0.items():
        assert_close(grads1[name], g, 1e-10, f"grad {name}")


def test_atom_atom_only_backends_use_reference_lattice_ops(golden_model, monkeypatch):
    """A backend that implements only the atom–atom op ("cueq", "cuda") runs the atom–lattice ops on
    the reference: stand in a "cueq" message op (the reference) and check the model runs and
    matches the reference backend exactly."""
    monkeypatch.setitem(ops.OPS["message_passing"]._loaded, "cueq", reference_message_passing)
    outs = {}
    for backend in ("reference", "cueq"):
        model = golden_model_instance(golden_model, paper_compat=False)
        model.backend = backend
        with torch.no_grad():
            outs[backend] = model(golden_batch(golden_model))
    for n in range(4):
        assert torch.equal(outs["cueq"].positions[n], outs["reference"].positions[n])
        assert torch.equal(outs["cueq"].cells[n], outs["reference"].cells[n])


# --------------------------------------------------------------------------------------------------
# cpu: the fused C++ inference backend (the window itself: tests/ops/test_radial_window.py)
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "cpu")
@pytest.mark.parametrize("path", ["auto", "portable"])
@pytest.mark.parametrize("radial", ["window", "exact"])
def test_cpu_paths_and_radial_modes(path, radial):
    """Both code paths with the windowed and the exact radial projection, both forms of the geometry,
    every lattice node; H=40 leaves a partial block of channels. float64 against the reference
    (1e-10), float32 against the float64 reference on the same inputs (5e-6, as test_float32_error)."""
    op = functools.partial(compiled.lattice_message_fused_cpu, path=path, radial=radial)
    for centred in (True, False):
        for k in range(3):
            args = random_case(torch.float64, centred, "cpu", hidden=40, cutoff=30.0 if k else 6.0, seed=20 + k)
            compare(op, args, args, k, 1e-10, differentiable=False)
            args32 = random_case(torch.float32, centred, "cpu", hidden=40, cutoff=30.0, seed=30 + k,
                                 on_lattice_point=False)
            args64 = {name: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                      for name, v in args32.items()}
            compare(op, args32, args64, k, 5e-6, differentiable=False)


@backend_only(OP, "cpu")
def test_cpu_deterministic_over_threads():
    """(Large enough for 3 threads: a call gets one thread per ~8 M multiply-adds, csrc/fused_cpu.h.)"""
    args = random_case(torch.float32, True, "cpu", hidden=64, seed=3, sizes=(1, 9, 1, 20) + (500,) * 20)
    ds1, v1 = compiled.lattice_message_fused_cpu(**args, k=1, num_threads=1)
    ds2, v2 = compiled.lattice_message_fused_cpu(**args, k=1, num_threads=3)
    assert torch.equal(ds1, ds2) and torch.equal(v1, v2)


@backend_only(OP, "cpu")
def test_cpu_rejects_invalid_input_and_gradients():
    args = random_case(torch.float64, True, "cpu", sizes=(2, 3), on_lattice_point=False)
    graph_index = args["graph_index"].clone()
    graph_index[1] = 7
    with pytest.raises(ValueError, match="crystal index out of range"):
        compiled.lattice_message_fused_cpu(**dict(args, graph_index=graph_index), k=0)
    with pytest.raises(ValueError, match="lattice node k"):
        compiled.lattice_message_fused_cpu(**args, k=3)
    vec = args["vec"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only.*vec"):
        compiled.lattice_message_fused_cpu(**dict(args, vec=vec), k=0)
    assert ops.resolve(OP, "auto", "cpu", needs_grad=False)[0] == "cpu"
    assert ops.resolve(OP, "auto", "cpu", needs_grad=True)[0] == "reference"


@backend_only(OP, "cpu")
@pytest.mark.parametrize("paper_compat", [True, False])
def test_cpu_model_matches_reference_float64(golden_model, paper_compat):
    """E3Relax(H=32), golden weights, inference with backend "cpu" for the atom–lattice ops alone (the
    atom–atom op on the reference): every output and traced intermediate within 1e-12."""
    outs, traces = {}, {}
    for name in ("reference", "cpu"):
        model = golden_model_instance(golden_model, paper_compat=paper_compat)
        model.backend = name
        traces[name] = {}
        with torch.inference_mode(), mock.patch.dict(ops.OPS["message_passing"]._loaded,
                                                     {"cpu": reference_message_passing}):
            outs[name] = model(golden_batch(golden_model), trace=traces[name])
    for n in range(4):
        assert_close(outs["cpu"].positions[n], outs["reference"].positions[n], 1e-12, f"positions L{n}")
        assert_close(outs["cpu"].cells[n], outs["reference"].cells[n], 1e-12, f"cells L{n}")
    assert set(traces["cpu"]) == set(traces["reference"])
    for name, value in traces["reference"].items():
        assert (traces["cpu"][name] - value).abs().max().item() <= 1e-12, name


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "triton")
def test_triton_many_tiles_and_programs_float64():
    """Small tiles: several atom tiles (38 atoms in tiles of 16, the last partial) with two per
    backward program (the last program partial), channel blocks (H=48 in blocks of 32) and K steps
    (R=40 in steps of 16)."""
    km = triton_module(OP)
    config = km.KernelConfig(block_n=16, block_h=32, block_k=16, bwd_tiles_per_program=2)
    for centred in (True, False):
        args = random_case(torch.float64, centred, backend_device("triton"), hidden=48, num_rbf=40, seed=3,
                           sizes=(1, 9, 1, 20, 6, 1))
        compare(km.lattice_message, args, args, 1, 1e-10, config=config)


@backend_only(OP, "triton")
def test_triton_rejects_bad_arguments():
    km = triton_module(OP)
    args = random_case(torch.float64, False, backend_device("triton"), sizes=(2,), on_lattice_point=False)
    with pytest.raises(ValueError, match="lattice node k"):
        km.lattice_message(**args, k=3)
    with pytest.raises(TypeError, match="positions"):
        km.lattice_message(**dict(args, positions=args["positions"].float()), k=0)


@backend_only(OP, "triton")
def test_triton_basis_evaluated_once_per_atom():
    """The radial basis is evaluated once per atom in the forward and once in the backward, by one
    launch of the basis kernel, whatever the number of channel blocks, atom tiles or W blocks.
    Counted on the interpreter (every lane of every exp, masked lanes included, as a GPU issues
    them): each phase evaluates at most 2 R exponentials per atom, all in ``_lm_basis_kernel``. Here
    (3 atom tiles, 3 channel blocks, 9 row blocks of W, 4 K steps) kernels that re-evaluated the
    basis per channel block and per W block would evaluate about 3.8 R per atom in the forward and
    16 R in the backward."""
    import triton.runtime.interpreter as interp
    from e3relax_fast.kernels.utils import interpreting

    if not interpreting():
        pytest.skip("counts exponentials on Triton's CPU interpreter")
    km = triton_module(OP)
    lanes: dict = {}
    launches: dict = {}
    current = [None]
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor

    def counting(name):
        orig = getattr(builder, name)

        def counted(b, arg):
            lanes[current[-1]] = lanes.get(current[-1], 0) + int(getattr(arg.data, "size", 1))
            return orig(b, arg)
        return counted

    orig_call = executor.__call__

    def call(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "?")
        launches[name] = launches.get(name, 0) + 1
        current.append(name)
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            current.pop()

    def take():
        out = (dict(lanes), dict(launches))
        lanes.clear()
        launches.clear()
        return out

    config = km.KernelConfig(block_n=16, block_h=16, block_k=16, bwd_tiles_per_program=1)
    for centred in (True, False):
        args = random_case(torch.float32, centred, backend_device("triton"), hidden=48, num_rbf=64, seed=5,
                           sizes=(3, 9, 20, 6))
        n, r = args["vec"].shape[0], args["rbf_centres"].shape[0]
        args = {name: (v.detach().clone().requires_grad_(True) if name in INPUTS and v is not None else v)
                for name, v in args.items()}
        with mock.patch.object(builder, "create_exp", counting("create_exp")), \
                mock.patch.object(builder, "create_exp2", counting("create_exp2")), \
                mock.patch.object(executor, "__call__", call):
            ds, v_out = km.lattice_message(**args, k=1, config=config)
            forward = take()
            (ds.sum() + v_out.square().sum()).backward()
            backward = take()
        assert set(forward[1]) == {"_lm_basis_kernel", "_lm_fwd_kernel"}, forward
        assert set(backward[1]) == {"_lm_basis_kernel", "_lm_bwd_kernel", "_lm_bwd_dist_kernel",
                                    "_lm_bwd_weight_kernel"}, backward
        for phase, (exps, calls) in (("forward", forward), ("backward", backward)):
            assert calls["_lm_basis_kernel"] == 1, (phase, calls)
            assert {name for name, count in exps.items() if count} == {"_lm_basis_kernel"}, (phase, exps)
            assert n * r <= exps["_lm_basis_kernel"] <= 2 * n * r, (phase, exps, n, r)
        assert all(args[name].grad.isfinite().all() for name in INPUTS if args[name] is not None)
