"""The optional bond strain (E3Relax(cell_virial=True), model/virial.py): each layer adds ``a_k ε`` to
each lattice vector's update, ε = (1/n) Σ_bonds φ_b r̂_b r̂_bᵀ with φ learned, starting at zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    assert_checkpoint_keeps,
    assert_rotation_equivariant,
    assert_runs_under_bf16,
    assert_same_predictions,
    assert_strain_is_a_crystal_property,
    golden_batch,
    golden_model_grown,
)

from e3relax_fast import E3Relax
from e3relax_fast.batch import Batch


def _with_virial(golden_model) -> tuple[E3Relax, E3Relax]:
    return golden_model_grown(golden_model, "cell_virial", "cell_virial_layers.")


def _randomise(model: E3Relax, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.cell_virial_layers:
            layer.out.weight.copy_(0.05 * torch.randn(layer.out.weight.shape, generator=generator, dtype=torch.float64))


def _strain(model: E3Relax, arrays, features: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """The bond strain ``(G, 3, 3)`` of layer ``layer`` for the structures ``arrays`` with atom scalars ``features``."""
    batch = Batch.from_arrays(arrays).with_graph(model.radius, model.max_neighbors)
    ctx = model._context(batch, torch.device("cpu"))
    return model.cell_virial_layers[layer](features, batch.positions, batch.cells, ctx)


def _dilute_crystal(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two atoms in a triclinic cell of ~80 Å³: fewer than 50 neighbours within 6 Å, so the top-K cut
    keeps every bond between distinct atoms in every description."""
    cell = np.diag([4.1, 4.3, 4.6]) + rng.uniform(-0.3, 0.3, (3, 3))
    return np.array([8, 14]), rng.random((2, 3)) @ cell, cell


def test_a_model_grown_by_the_bond_strain_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = _with_virial(golden_model)
    assert_same_predictions(plain, model, golden_batch(golden_model))


def test_the_bond_strain_keeps_the_model_rotation_equivariant(golden_model):
    _, model = _with_virial(golden_model)
    _randomise(model, seed=3)
    batch = golden_batch(golden_model)
    plain, _ = _with_virial(golden_model)
    moved = (model(batch).cells[-1] - plain(batch).cells[-1]).abs().max()
    assert moved > 1e-4  # the strain does change the cell, so the check below is not vacuous
    assert_rotation_equivariant(model, batch, seed=1)


def test_the_bond_strain_is_symmetric_and_the_same_for_every_basis_wrapping_and_supercell():
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=1, cell_virial=True).to(torch.float64)
    _randomise(model, seed=5)
    crystal = _dilute_crystal(np.random.default_rng(7))
    assert_strain_is_a_crystal_property(lambda arrays, features: _strain(model, arrays, features), crystal,
                                        torch.randn(2, 8, dtype=torch.float64))


def test_a_cubic_crystal_is_strained_isotropically():
    model = E3Relax(hidden_channels=8, num_layers=1, cell_virial=True).to(torch.float64)
    _randomise(model, seed=2)
    layer, eye = model.cell_virial_layers[0], torch.eye(3, dtype=torch.float64)
    features = torch.zeros(2, 8, dtype=torch.float64)
    # simple cubic, one atom: its bonds are to its own images (the graph's six fixed self-image edges,
    # +a, +b, +c, +b+c, +a+c, +a+b, three of twelve face diagonals, would shear it): 6 at 3 Å, 12 at
    # 3√2, 8 at 3√3, each shell count/3 times I (the 6 at 6 Å weigh nothing)
    eps = _strain(model, [(np.array([6]), np.zeros((1, 3)), 3.0 * np.eye(3))], features[:1])[0]
    with torch.no_grad():
        ends = torch.nn.functional.silu(2.0 * layer.atom.bias)  # zero features: A s = 0
        centres, spacing = torch.linspace(0.0, 6.0, 16, dtype=torch.float64), 6.0 / 15
        def phi(r):
            basis = torch.exp(-(((r - centres) / spacing) ** 2))
            return float((ends * layer.length(basis)) @ layer.out.weight[0]) * 0.5 * (1 + np.cos(np.pi * r / 6.0))
        expected = sum(n / 3 * phi(r) for n, r in ((6, 3.0), (12, 3 * 2**0.5), (8, 3 * 3**0.5)))
    assert abs(expected) > 1e-4
    torch.testing.assert_close(eps, expected * eye, rtol=0, atol=1e-14)
    # CsCl type: the bonds between the two atoms come in cubic shells too, so Σ φ r̂ r̂ᵀ is a multiple of I
    cscl = (np.array([55, 17]), np.array([[0.0, 0.0, 0.0], [2.1, 2.1, 2.1]]), 4.2 * np.eye(3))
    eps = _strain(model, [cscl], features)[0]
    assert eps[0, 0].abs() > 1e-4
    torch.testing.assert_close(eps, eps[0, 0] * eye, rtol=0, atol=1e-14)


def test_a_checkpoint_keeps_its_bond_strain(tmp_path):
    assert_checkpoint_keeps(tmp_path, cell_virial=True)


def test_the_original_mode_has_no_bond_strain():
    with pytest.raises(ValueError, match="cell_virial is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, cell_virial=True)


def test_the_bond_strain_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, cell_virial=True)
    _randomise(model, seed=2)
    assert_runs_under_bf16(model, _dilute_crystal(np.random.default_rng(3)))
