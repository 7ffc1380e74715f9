"""The radial basis (``reference/rbf.py``): no subnormal numbers, the same values otherwise."""

from __future__ import annotations

import pytest
import torch

from e3relax_fast.reference.rbf import radial_basis, radial_basis_with_subnormals, rbf_centres, rbf_coefficient

CUTOFF = 30.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_subnormal_values_and_the_normal_ones_unchanged(dtype):
    """Graph distances (up to 6 Å) and the whole range up to the cutoff: the unflushed float32 basis
    holds subnormal numbers (the far Gaussians' tails, which x86 CPUs multiply ~30x slower); the
    flushed one holds none, and every other value is the same bits."""
    centres = rbf_centres(128)
    coeff = rbf_coefficient(centres)
    distances = torch.cat([torch.linspace(0.0, 6.0, 4001, dtype=dtype), torch.linspace(6.0, CUTOFF, 2001, dtype=dtype)])
    raw = radial_basis_with_subnormals(distances, centres, coeff, CUTOFF)
    basis = radial_basis(distances, centres, coeff, CUTOFF)
    tiny = torch.finfo(dtype).tiny
    subnormal = (raw != 0) & (raw.abs() < tiny)
    if dtype == torch.float32:
        assert subnormal.float().mean() > 0.005  # what the flush is for
    assert not ((basis != 0) & (basis.abs() < tiny)).any()
    assert torch.equal(basis[~subnormal], raw[~subnormal])
    assert (basis[subnormal] == 0).all()


def test_gradient_through_the_flushed_basis_matches_the_unflushed_one():
    """The flush is invisible to training: the gradient with respect to the distances of a
    projection of the basis is the unflushed one's (float64, where the flush touches values below
    2.2e-308 only)."""
    centres = rbf_centres(128)
    coeff = rbf_coefficient(centres)
    weight = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distances = torch.linspace(0.3, 6.0, 257, dtype=torch.float64)
    grads = []
    for basis in (radial_basis, radial_basis_with_subnormals):
        d = distances.clone().requires_grad_(True)
        (basis(d, centres, coeff, CUTOFF) @ weight).square().sum().backward()
        grads.append(d.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0.0)
