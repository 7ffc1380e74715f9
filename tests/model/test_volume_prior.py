"""The optional volume prior (E3Relax(volume_prior=True)): each crystal rescaled before the first layer
by a factor learned from its bonds' lengths against its elements' covalent radii, starting at none."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_same_predictions, golden_batch, golden_model_grown, random_rotation, random_unimodular

from e3relax_fast import Batch, E3Relax, load_pretrained
from e3relax_fast.model.volume_prior import LOG_SCALE_BOUND


def _with_prior(golden_model) -> tuple[E3Relax, E3Relax]:
    """The golden weights in a default-mode model, and in one that also has the volume prior."""
    return golden_model_grown(golden_model, "volume_prior", "volume_prior.")


def _randomise(model: E3Relax, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.volume_prior.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _log_scale(model: E3Relax, batch: Batch) -> torch.Tensor:
    """``(G,)`` the prior's ln s of each crystal of ``batch`` (its graph: 4 Å, every neighbour)."""
    batch = batch.with_graph(radius=4.0, max_neighbors=10_000)
    ctx = model._context(batch, torch.device("cpu"))
    return model.volume_prior.log_scale(batch.positions, batch.cells, batch.atomic_numbers, ctx.edges)


def _crystal(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Z (5,), positions (5, 3) Å, cell (3, 3) Å)``: a random 5-atom crystal of three elements whose
    atoms have no periodic image of themselves within 4 Å (the tests' graph radius)."""
    cell = np.diag(rng.uniform(4.5, 5.0, 3)) + rng.uniform(-0.2, 0.2, (3, 3))
    return np.array([8, 22, 8, 38, 8]), rng.random((5, 3)) @ cell, cell


def test_a_model_grown_by_the_prior_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = _with_prior(golden_model)
    batch = golden_batch(golden_model)
    assert_same_predictions(plain, model, batch)


def test_the_prior_rescales_each_crystal_about_its_centroid_before_the_first_layer(golden_model):
    """Every edge voting the same (the last layer's bias alone): the model with the prior is the model
    without it applied to the crystals scaled by s = exp(B tanh(b / B)) about their centroids — those
    with an edge between two atoms; a crystal whose only edges are self-images keeps its size."""
    plain, model = _with_prior(golden_model)
    with torch.no_grad():
        model.volume_prior.out.bias.fill_(0.1)
    batch = golden_batch(golden_model)
    atom_graph = torch.repeat_interleave(torch.arange(len(batch.ptr) - 1), torch.diff(batch.ptr))
    voting = torch.zeros(len(batch.ptr) - 1, dtype=torch.bool)
    voting[atom_graph[batch.edge_index[1][batch.edge_index[0] != batch.edge_index[1]]]] = True
    assert voting.any() and not voting.all()  # the golden batch has both kinds
    scale = torch.ones(len(voting), dtype=torch.float64)
    scale[voting] = math.exp(LOG_SCALE_BOUND * math.tanh(0.1 / LOG_SCALE_BOUND))
    centres = torch.stack([batch.positions[a:b].mean(0) for a, b in zip(batch.ptr[:-1], batch.ptr[1:], strict=True)])
    scaled = golden_batch(golden_model)
    scaled.positions = centres[atom_graph] + (batch.positions - centres[atom_graph]) * scale[atom_graph, None]
    scaled.cells = batch.cells * scale[:, None, None]
    got, expected = model(batch), plain(scaled)
    for a, b in zip(got.positions + got.cells, expected.positions + expected.cells, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_the_prior_learns_from_its_own_term_only(golden_model):
    """The layers' loss terms pass no gradient to the prior (they would teach it to leave the volume to
    the layers); the prior term does."""
    from e3relax_fast.training import layerwise_loss

    _, model = _with_prior(golden_model)
    _randomise(model)
    batch = golden_batch(golden_model)
    out = model(batch)
    targets = (out.positions[-1].detach() + 0.1, out.cells[-1].detach() * 1.05)
    layerwise_loss(out, *targets, batch.ptr).total.backward()
    assert all(p.grad is None for p in model.volume_prior.parameters())
    assert model.atom_emb.embeddings.weight.grad.abs().max() > 0
    out = model(batch)
    layerwise_loss(out, *targets, batch.ptr, prior_weight=1.0, input_cells=batch.cells).prior.backward()
    assert model.volume_prior.out.weight.grad.abs().max() > 0


def test_the_bond_strain_is_the_length_against_the_sum_of_the_covalent_radii():
    """Rock salt NaCl (a = 5.64 Å): the six nearest neighbours of each atom, 2.82 Å away, against
    Na 1.66 + Cl 1.02 Å (ASE's covalent radii); Na–Na and Cl–Cl at 3.99 Å against 3.32 and 2.04 Å."""
    a = 5.64
    frac = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5],
                     [0.5, 0.5, 0.5]])
    numbers = [11] * 4 + [17] * 4
    batch = Batch.from_arrays([(numbers, frac * a, np.eye(3) * a)]).with_graph(radius=4.1, max_neighbors=10_000)
    model = E3Relax(hidden_channels=8, num_layers=1, volume_prior=True).to(torch.float64)
    ctx = model._context(batch, torch.device("cpu"))
    x = model.volume_prior.bond_strain(batch.positions, batch.cells, batch.atomic_numbers, ctx.edges)
    tol = 1e-6  # the radii were made in the default dtype, float32, before the model was cast
    z = batch.atomic_numbers[ctx.edges[0]]
    unlike = z[0] != z[1]
    torch.testing.assert_close(x[unlike], torch.full_like(x[unlike], math.log(a / 2 / 2.68)), rtol=0, atol=tol)
    like = (z[0] == z[1]) & (ctx.edges[0][0] != ctx.edges[0][1])  # not the self-images
    expected = torch.log(a / math.sqrt(2) / torch.where(z[0][like] == 11, 3.32, 2.04).double())
    torch.testing.assert_close(x[like], expected, rtol=0, atol=tol)
    assert int(unlike.sum()) == 8 * 6 and int(like.sum()) == 8 * 12


def test_the_scale_does_not_depend_on_how_the_crystal_is_written():
    """Random weights: ln s is the same after a rotation, a translation, another cell basis, a 2x1x1
    supercell (the crystal has no self-image within the radius, which the graph rule would keep in the
    supercell alone: ``relax_batch``'s canonical frame answers for supercells), and alone or in a
    batch with another crystal."""
    model = E3Relax(hidden_channels=16, num_layers=1, volume_prior=True).to(torch.float64)
    _randomise(model)
    rng = np.random.default_rng(3)
    z, pos, cell = _crystal(rng)
    other = _crystal(rng)
    reference = _log_scale(model, Batch.from_arrays([(z, pos, cell)]))
    assert reference.abs().item() > 1e-3  # the weights do vote
    rot = random_rotation(rng)
    basis = random_unimodular(rng) @ cell
    double = cell * [[2], [1], [1]]
    variants = {
        "rotated": (z, pos @ rot.T, cell @ rot.T),
        "translated": (z, pos + [0.7, -1.3, 2.1], cell),
        "another basis": (z, pos, basis),
        "supercell": (np.concatenate([z, z]), np.concatenate([pos, pos + cell[0]]), double),
    }
    for name, crystal in variants.items():
        got = _log_scale(model, Batch.from_arrays([crystal]))
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-12, msg=name)
    together = _log_scale(model, Batch.from_arrays([other, (z, pos, cell)]))
    torch.testing.assert_close(together[1:], reference, rtol=0, atol=1e-12)
    assert abs(together[0].item()) <= LOG_SCALE_BOUND


def test_a_checkpoint_keeps_its_volume_prior(tmp_path):
    model = E3Relax(hidden_channels=8, num_layers=2, volume_prior=True)
    _randomise(model)
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    loaded = load_pretrained(tmp_path / "with.pt")
    assert loaded.config["volume_prior"] and torch.equal(loaded.volume_prior.out.weight, model.volume_prior.out.weight)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its keys
    assert load_pretrained(tmp_path / "bare.pt", paper_compat=False).config["volume_prior"]
    torch.save(E3Relax(hidden_channels=8, num_layers=2).state_dict(), tmp_path / "plain.pt")
    assert not load_pretrained(tmp_path / "plain.pt", paper_compat=False).config["volume_prior"]


def test_the_original_mode_has_no_volume_prior():
    with pytest.raises(ValueError, match="volume_prior is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, volume_prior=True)
