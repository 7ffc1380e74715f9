"""The optional relative-length bond strain (E3Relax(bond_radii=True), model/bond_radii.py): each layer
adds ``a_k ε``, ε = (1/n) Σ_bonds φ(x_b) r̂_b r̂_bᵀ with x_b a bond's length over its atoms' radii."""

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
from e3relax_fast.model.bond_radii import covalent_radii


def _randomise(model: E3Relax, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.bond_radii_layers:
            for out in (layer.out, layer.force) if layer.forces else (layer.out,):
                out.weight.copy_(0.05 * torch.randn(out.weight.shape, generator=generator, dtype=torch.float64))


def _strain(model: E3Relax, arrays, features: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Layer ``layer``'s relative-length strain ``(G, 3, 3)`` of ``arrays`` with atom scalars ``features``."""
    batch = Batch.from_arrays(arrays).with_graph(model.radius, model.max_neighbors)
    ctx = model._context(batch, torch.device("cpu"))
    return model.bond_radii_layers[layer](features, batch.atomic_numbers, batch.positions, batch.cells, ctx)[0]


def _dilute_crystal(rng, numbers=(8, 14)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two atoms in a triclinic cell of ~80 Å³: fewer than 50 neighbours within 6 Å, so the top-K cut
    keeps every bond between distinct atoms in every description."""
    cell = np.diag([4.1, 4.3, 4.6]) + rng.uniform(-0.3, 0.3, (3, 3))
    return np.array(numbers), rng.random((2, 3)) @ cell, cell


def test_a_model_grown_by_the_relative_bond_strain_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = golden_model_grown(golden_model, "bond_radii", "bond_radii_layers.")
    assert_same_predictions(plain, model, golden_batch(golden_model))


def test_the_relative_bond_strain_keeps_the_model_rotation_equivariant(golden_model):
    plain, model = golden_model_grown(golden_model, "bond_radii", "bond_radii_layers.")
    _randomise(model, seed=3)
    batch = golden_batch(golden_model)
    moved = (model(batch).cells[-1] - plain(batch).cells[-1]).abs().max()
    assert moved > 1e-4  # the strain does change the cell, so the check below is not vacuous
    assert_rotation_equivariant(model, batch, seed=1)


def test_the_relative_bond_strain_is_symmetric_and_the_same_for_every_basis_wrapping_and_supercell():
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=1, bond_radii=True).to(torch.float64)
    _randomise(model, seed=5)
    crystal = _dilute_crystal(np.random.default_rng(7))
    assert_strain_is_a_crystal_property(lambda arrays, features: _strain(model, arrays, features), crystal,
                                        torch.randn(2, 8, dtype=torch.float64))


def test_the_images_within_the_radius_give_the_strain_of_all_images(monkeypatch):
    """The CPU keeps only an atom's own images within the radius; an accelerator sums all 342 (the far
    ones weigh zero): both give the same strain, on a batch of crystals with different image counts."""
    from e3relax_fast.model.bond_radii import BondRadiiStrain

    rng = np.random.default_rng(11)
    model = E3Relax(hidden_channels=8, num_layers=1, bond_radii=True).to(torch.float64)
    _randomise(model, seed=6)
    crystals = [_dilute_crystal(rng), (np.array([29]), np.zeros((1, 3)), 1.805 * (np.ones((3, 3)) - np.eye(3))),
                _dilute_crystal(rng, numbers=(55, 9))]
    features = torch.randn(5, 8, dtype=torch.float64)
    pruned = _strain(model, crystals, features)
    assert pruned.abs().max() > 1e-4
    every = BondRadiiStrain._own_images
    monkeypatch.setattr(BondRadiiStrain, "_own_images", lambda self, cell, index, prune: every(self, cell, index,
                                                                                               False))
    torch.testing.assert_close(_strain(model, crystals, features), pruned, rtol=0, atol=1e-13)


def test_the_same_structure_scaled_with_its_elements_radii_is_strained_alike():
    """What the option is for: diamond Ge scaled from diamond Si by the ratio of their radii has the
    same relative bond lengths, so (with the same features) the same strain, where diamond Ge in Si's
    cell is strained otherwise."""
    from ase.build import bulk

    model = E3Relax(hidden_channels=8, num_layers=1, bond_radii=True).to(torch.float64)
    _randomise(model, seed=4)
    layer = model.bond_radii_layers[0]
    with torch.no_grad():
        layer.factor.bias.fill_(0.3)  # a radius factor that is not 1, the same for both (same features)
        layer.length.weight.copy_(torch.randn(layer.length.weight.shape, dtype=torch.float64))
        layer.length.weight[:, layer.centres > 1.5] = 0.0  # nearest neighbours only (x = 1.06; next 1.73)
    radii = covalent_radii(model.num_elements)
    ratio = float(radii[32] / radii[14])
    silicon = bulk("Si", "diamond", a=5.43)
    features = torch.randn(1, 8, dtype=torch.float64).repeat(2, 1)
    def strain(numbers, scale):
        return _strain(model, [(np.array(numbers), scale * silicon.positions, scale * silicon.cell[:])], features)[0]
    small, large = strain([14, 14], 1.0), strain([32, 32], ratio)
    assert small[0, 0].abs() > 1e-4
    torch.testing.assert_close(large, small, rtol=1e-4, atol=1e-8)  # up to the Gaussians' tails at x = 1.73
    assert (strain([32, 32], 1.0) - small).abs().max() > 0.05 * small.abs().max()


def test_a_checkpoint_keeps_its_relative_bond_strain_and_forces(tmp_path):
    for folder, options in (("radii", {"bond_radii": True}), ("forces", {"bond_radii": True, "bond_forces": True})):
        (tmp_path / folder).mkdir()
        assert_checkpoint_keeps(tmp_path / folder, **options)


def test_the_original_mode_has_no_relative_bond_strain():
    with pytest.raises(ValueError, match="bond_radii is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, bond_radii=True)


def test_the_relative_bond_strain_and_forces_run_under_bf16_autocast():
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, bond_radii=True, bond_forces=True)
    _randomise(model, seed=2)
    assert_runs_under_bf16(model, _dilute_crystal(np.random.default_rng(3)))


def _displacement(model: E3Relax, arrays, features: torch.Tensor) -> torch.Tensor:
    batch = Batch.from_arrays(arrays).with_graph(model.radius, model.max_neighbors)
    ctx = model._context(batch, torch.device("cpu"))
    return model.bond_radii_layers[0](features, batch.atomic_numbers, batch.positions, batch.cells, ctx)[1]


def test_a_model_grown_by_the_bond_forces_starts_with_the_predictions_of_the_one_without(golden_model):
    _, with_radii = golden_model_grown(golden_model, "bond_radii", "bond_radii_layers.")
    _randomise(with_radii, seed=8)
    forces = E3Relax(**{**with_radii.config, "bond_forces": True}).to(torch.float64)
    missing, unexpected = forces.load_state_dict(with_radii.state_dict(), strict=False)
    assert not unexpected and missing and all(".force." in k for k in missing)
    assert_same_predictions(with_radii, forces, golden_batch(golden_model))
    _randomise(forces, seed=9)
    batch = golden_batch(golden_model)
    assert (forces(batch).positions[-1] - with_radii(batch).positions[-1]).abs().max() > 1e-4
    assert_rotation_equivariant(forces, batch, seed=2)


def test_the_bond_forces_move_the_same_atoms_alike_in_every_description():
    """Translation-, basis- and wrapping-invariant, rotation-equivariant displacements; and for a
    crystal whose every atom sits at an inversion centre (rock salt), none."""
    from ase.build import bulk

    rng = np.random.default_rng(2)
    model = E3Relax(hidden_channels=8, num_layers=1, bond_radii=True, bond_forces=True).to(torch.float64)
    _randomise(model, seed=1)
    z, pos, cell = _dilute_crystal(rng)
    features = torch.randn(2, 8, dtype=torch.float64)
    delta = _displacement(model, [(z, pos, cell)], features)
    assert delta.abs().max() > 1e-4
    other = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]]) @ cell
    moved = pos + np.array([[1, -2, 0], [0, 1, 1]]) @ cell + np.array([0.3, -1.1, 2.0])
    torch.testing.assert_close(_displacement(model, [(z, moved, other)], features), delta, rtol=0, atol=1e-12)
    turn = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))[0]
    turned = _displacement(model, [(z, pos @ turn.numpy(), cell @ turn.numpy())], features)
    torch.testing.assert_close(turned, delta @ turn, rtol=0, atol=1e-12)
    salt = bulk("NaCl", "rocksalt", a=6.5)  # 26 neighbours within 6 Å: the top-50 cut keeps every shell whole
    still = _displacement(model, [(salt.numbers, salt.positions, salt.cell[:])], torch.randn(2, 8, dtype=torch.float64))
    assert still.abs().max() < 1e-12


def test_the_bond_forces_move_an_atom_at_most_half_an_angstrom_per_layer():
    from e3relax_fast.model.bond_radii import MAX_STEP

    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=1, bond_radii=True, bond_forces=True).to(torch.float64)
    _randomise(model, seed=1)
    crystal = [_dilute_crystal(np.random.default_rng(2))]
    features = torch.randn(2, 8, dtype=torch.float64)
    small = _displacement(model, crystal, features)
    with torch.no_grad():
        model.bond_radii_layers[0].force.weight.mul_(1e4)
    large = _displacement(model, crystal, features)
    assert 1e-4 < small.norm(dim=-1).max() < 0.1 * MAX_STEP  # small steps pass (almost) as they are ...
    assert MAX_STEP * 0.99 < large.norm(dim=-1).max() <= MAX_STEP  # ... large ones are capped
    torch.testing.assert_close(large / large.norm(dim=-1, keepdim=True), small / small.norm(dim=-1, keepdim=True))


def test_bond_forces_need_the_relative_bonds():
    with pytest.raises(ValueError, match="it needs bond_radii"):
        E3Relax(hidden_channels=8, num_layers=1, bond_forces=True)
