"""Op ``lattice_pool``: the per-crystal mean (Step 0 centres, Step E pooling) of every backend against
its reference twin (e3relax_fast/reference/lattice_pool.py).

Backends: ``triton`` (kernels/lattice_pool.py; without a GPU on Triton's CPU interpreter, so shapes
are small). Its output buffers start NaN-poisoned, so an element the kernel fails to write fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close, backend_device, backend_only, backend_params, triton_module

from e3relax_fast import ops
from e3relax_fast.reference.lattice_pool import lattice_pool as reference_op

OP = "lattice_pool"
BACKENDS = backend_params(OP, "triton")
# Empty crystals first, in the middle and last; 1-atom crystals; one larger than a 64-atom tile.
SIZES = (0, 1, 5, 0, 70, 1, 3, 0)


def csr(sizes, device):
    counts = torch.tensor(sizes, dtype=torch.int64)
    ptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    graph_index = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    return ptr.to(device), graph_index.to(device)


def run(op, x, ptr, graph_index, seed=1, **kwargs):
    """Forward and the gradient of a random linear functional of the means."""
    x = x.detach().clone().requires_grad_(True)
    out = op(x, ptr, graph_index, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


# --------------------------------------------------------------------------------------------------
# every backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    expected = {"triton": lambda: triton_module(OP).lattice_pool}[backend.name]()
    name, fn = ops.resolve(OP, backend.name, backend.device.type)
    assert name == backend.name and fn is expected


@pytest.mark.parametrize("dtype, rel", TOLERANCES)
@pytest.mark.parametrize("trailing", [(3,), (8,), (3, 8)])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_reference(backend, dtype, rel, trailing):
    ptr, graph_index = csr(SIZES, backend.device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(sum(SIZES), *trailing, generator=gen, dtype=torch.float64) + 2.0).to(backend.device, dtype)
    out0, grad0 = run(reference_op, x.cpu(), ptr.cpu(), graph_index.cpu())
    out1, grad1 = run(backend.fn, x, ptr, graph_index)
    assert_close(out1, out0, rel, "mean")
    assert_close(grad1, grad0, rel, "d/dx")
    assert (out1[ptr[1:] == ptr[:-1]] == 0).all()  # empty crystals


def test_model_backends_without_a_pool_kernel_take_the_reference():
    """The per-crystal mean is memory-bound and small next to the layer; backends "cpu", "cuda" and
    "cueq" have no kernel of it, and a model run with them takes the reference's."""
    for name in ("cpu", "cuda", "cueq"):
        assert ops.resolve(OP, name, "cpu")[0] == "reference"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_deterministic(backend):
    ptr, graph_index = csr(SIZES, backend.device)
    x = torch.randn(sum(SIZES), 3, 8, dtype=torch.float32, device=backend.device)
    first = backend.fn(x, ptr, graph_index)
    assert torch.equal(first, backend.fn(x, ptr, graph_index))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_no_atoms_and_no_crystals(backend):
    ptr, graph_index = csr((0, 0, 0), backend.device)
    x = torch.zeros(0, 3, 8, dtype=torch.float64, device=backend.device)
    out0, grad0 = run(reference_op, x.cpu(), ptr.cpu(), graph_index.cpu())
    out1, grad1 = run(backend.fn, x, ptr, graph_index)
    assert out1.shape == (3, 3, 8) and (out1 == 0).all() and grad1.shape == grad0.shape
    ptr, graph_index = csr((), backend.device)
    assert backend.fn(torch.zeros(0, 3, dtype=torch.float64, device=backend.device), ptr, graph_index).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gradcheck_and_gradgradcheck_float64(backend):
    """The backward is a gather in PyTorch, so it is itself differentiable."""
    ptr, graph_index = csr((1, 0, 3), backend.device)
    x = torch.randn(4, 3, 2, dtype=torch.float64, device=backend.device, requires_grad=True)

    def op(t):
        return backend.fn(t, ptr, graph_index)

    assert torch.autograd.gradcheck(op, [x], eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(op, [x], eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rejects_integer_features(backend):
    ptr, graph_index = csr((2,), backend.device)
    with pytest.raises(TypeError, match="float32 and float64"):
        backend.fn(torch.zeros(2, 3, dtype=torch.int64, device=backend.device), ptr, graph_index)


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "triton")
def test_triton_small_tiles_float64():
    """Several atom steps per crystal (blocks of 16) and feature blocks (24 features in blocks of 8)."""
    kp = triton_module(OP)
    device = backend_device("triton")
    ptr, graph_index = csr(SIZES, device)
    x = torch.randn(sum(SIZES), 3, 8, dtype=torch.float64, device=device)
    out0, grad0 = run(reference_op, x.cpu(), ptr.cpu(), graph_index.cpu())
    out1, grad1 = run(kp.lattice_pool, x, ptr, graph_index, config=kp.PoolConfig(block_a=16, block_f=8))
    assert_close(out1, out0, 1e-10, "mean")
    assert_close(grad1, grad0, 1e-10, "d/dx")
