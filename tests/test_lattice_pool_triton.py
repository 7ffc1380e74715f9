"""The Triton per-crystal mean (Step 0 centres, Step E pooling) against its reference twin.

Without a GPU the kernel runs on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py); shapes are kept small.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, require_triton_backend

require_triton_backend("lattice_pool")

from e3relax_fast.kernels import lattice_pool as kp  # noqa: E402
from e3relax_fast.kernels import utils as ku  # noqa: E402

from e3relax_fast import ops  # noqa: E402
from e3relax_fast.reference.lattice_pool import lattice_pool as reference_op  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Empty crystals first, in the middle and last; 1-atom crystals; one larger than a 64-atom tile.
SIZES = (0, 1, 5, 0, 70, 1, 3, 0)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernel must fill starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(ku, "POISON_OUTPUTS", True)


def csr(sizes):
    counts = torch.tensor(sizes, dtype=torch.int64)
    ptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    graph_index = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    return ptr.to(DEVICE), graph_index.to(DEVICE)


def run(op, x, ptr, graph_index, seed=1, **kwargs):
    """Forward and the gradient of a random linear functional of the means."""
    x = x.detach().clone().requires_grad_(True)
    out = op(x, ptr, graph_index, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad




def test_registered():
    name, fn = ops.resolve("lattice_pool", "triton", DEVICE.type)
    assert name == "triton" and fn is kp.lattice_pool


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
@pytest.mark.parametrize("trailing", [(3,), (8,), (3, 8)])
def test_matches_reference(dtype, rel, trailing):
    ptr, graph_index = csr(SIZES)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(sum(SIZES), *trailing, generator=gen, dtype=torch.float64) + 2.0).to(DEVICE, dtype)
    out0, grad0 = run(reference_op, x, ptr, graph_index)
    out1, grad1 = run(kp.lattice_pool, x, ptr, graph_index)
    assert_close(out1, out0, rel, "mean")
    assert_close(grad1, grad0, rel, "d/dx")
    assert (out1[ptr[1:] == ptr[:-1]] == 0).all()  # empty crystals


def test_small_tiles_float64():
    """Several atom steps per crystal (blocks of 16) and feature blocks (24 features in blocks of 8)."""
    ptr, graph_index = csr(SIZES)
    x = torch.randn(sum(SIZES), 3, 8, dtype=torch.float64, device=DEVICE)
    out0, grad0 = run(reference_op, x, ptr, graph_index)
    out1, grad1 = run(kp.lattice_pool, x, ptr, graph_index, config=kp.PoolConfig(block_a=16, block_f=8))
    assert_close(out1, out0, 1e-10, "mean")
    assert_close(grad1, grad0, 1e-10, "d/dx")


def test_deterministic():
    ptr, graph_index = csr(SIZES)
    x = torch.randn(sum(SIZES), 3, 8, dtype=torch.float32, device=DEVICE)
    first = kp.lattice_pool(x, ptr, graph_index)
    assert torch.equal(first, kp.lattice_pool(x, ptr, graph_index))


def test_no_atoms_and_no_crystals():
    ptr, graph_index = csr((0, 0, 0))
    x = torch.zeros(0, 3, 8, dtype=torch.float64, device=DEVICE)
    out0, grad0 = run(reference_op, x, ptr, graph_index)
    out1, grad1 = run(kp.lattice_pool, x, ptr, graph_index)
    assert out1.shape == (3, 3, 8) and (out1 == 0).all() and grad1.shape == grad0.shape
    ptr, graph_index = csr(())
    assert kp.lattice_pool(torch.zeros(0, 3, dtype=torch.float64, device=DEVICE), ptr, graph_index).shape == (0, 3)


def test_gradcheck_and_gradgradcheck_float64():
    """The backward is a gather in PyTorch, so it is itself differentiable."""
    ptr, graph_index = csr((1, 0, 3))
    x = torch.randn(4, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def op(t):
        return kp.lattice_pool(t, ptr, graph_index)

    assert torch.autograd.gradcheck(op, [x], eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(op, [x], eps=1e-6, atol=1e-8, rtol=1e-6)


def test_rejects_integer_features():
    ptr, graph_index = csr((2,))
    with pytest.raises(TypeError, match="float32 and float64"):
        kp.lattice_pool(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE), ptr, graph_index)
