"""The radial basis (``reference/rbf.py``): no subnormal numbers, the same values otherwise."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from e3relax_fast.reference.rbf import (
    nonzero_window,
    radial_basis,
    radial_basis_with_subnormals,
    rbf_centres,
    rbf_coefficient,
)

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


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(0.0, 32.0), span=st.floats(0.0, 12.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_window_holds_every_nonzero_column(lo, span, dtype):
    """Outside :func:`nonzero_window` the basis is exactly 0, for any range of distances (beyond the
    cutoff too: the layers move atoms)."""
    centres = rbf_centres(128)
    coeff = rbf_coefficient(centres)
    distances = torch.linspace(lo, lo + span, 301, dtype=dtype)
    window = nonzero_window(distances, centres, coeff, CUTOFF)
    basis = radial_basis(distances, centres, coeff, CUTOFF)
    outside = torch.ones(128, dtype=torch.bool)
    outside[window] = False
    assert (basis[:, outside] == 0).all()
    assert torch.equal(radial_basis(distances, centres[window], coeff, CUTOFF), basis[:, window])


def test_the_window_of_graph_edges_is_a_third_of_the_basis():
    """What the window is for: edges of the 6 Å graph need 39 of the 128 float32 centres (within
    3.1 Å of 6 Å), 64 in float64 (8.9 Å); on a GPU, no distances, a NaN distance, or traced by
    ``torch.compile``: all of them."""
    centres = rbf_centres(128)
    coeff = rbf_coefficient(centres)
    edges = torch.linspace(0.7, 6.0, 50)
    assert nonzero_window(edges, centres, coeff, CUTOFF) == slice(0, 39)
    assert nonzero_window(edges.double(), centres, coeff, CUTOFF) == slice(0, 64)
    assert nonzero_window(torch.tensor([25.0]), centres, coeff, CUTOFF) == slice(93, 120)  # 21.9-28.1 Å
    assert nonzero_window(torch.empty(0), centres, coeff, CUTOFF) == slice(None)
    assert nonzero_window(torch.tensor([1.0, float("nan")]), centres, coeff, CUTOFF) == slice(None)
    assert nonzero_window(edges.to("meta"), centres, coeff, CUTOFF) == slice(None)

    def width(d):
        return radial_basis(d, centres[nonzero_window(d, centres, coeff, CUTOFF)], coeff, CUTOFF).shape[-1]

    assert width(edges) == 39
    assert torch.compile(width, backend="eager", fullgraph=True)(edges) == 128


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_the_model_with_the_window_is_the_model_without_it(golden_model, monkeypatch, dtype, rel):
    """Forward outputs and every gradient of the layer-wise loss (weights, input positions and cell)
    of the golden model, the reference ops projecting only the window or the whole basis."""
    from helpers import golden_batch, golden_model_instance

    from e3relax_fast.reference import lattice_message, message_passing
    from e3relax_fast.training.loss import layerwise_loss

    def run():
        model = golden_model_instance(golden_model, paper_compat=False, dtype=dtype)
        batch = golden_batch(golden_model, dtype)
        batch.positions.requires_grad_(True)
        batch.cells.requires_grad_(True)
        out = model(batch)
        targets = [torch.from_numpy(golden_model[k]).to(dtype) for k in ("in/pos_r", "in/cell_r")]
        layerwise_loss(out, *targets).total.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out, grads | {"positions": batch.positions.grad, "cells": batch.cells.grad}

    windowed, windowed_grads = run()
    for module in (message_passing, lattice_message):
        monkeypatch.setattr(module, "nonzero_window", lambda *args: slice(None))
    whole, whole_grads = run()
    for n in range(4):
        torch.testing.assert_close(windowed.positions[n], whole.positions[n], rtol=rel, atol=rel)
        torch.testing.assert_close(windowed.cells[n], whole.cells[n], rtol=rel, atol=rel)
    assert windowed_grads.keys() == whole_grads.keys()
    # the projections the window slices get their gradient (zero outside the window)
    sliced = {"message_passing_layers.0.edge_proj.weight", "lattice_l1_layers.0.edge_local_proj.weight"}
    assert sliced <= whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(windowed_grads[name], grad, rtol=rel, atol=rel * max(1.0, grad.abs().max().item()),
                                   msg=name)
