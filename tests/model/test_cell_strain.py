"""The optional cell strain (E3Relax(cell_strain=True)): each lattice vector's update gains the vector
times a learned scalar of its node's invariant features, starting at zero."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rotation_equivariant, assert_same_predictions, golden_batch, golden_model_grown

from e3relax_fast import E3Relax, load_pretrained


def _with_strain(golden_model) -> tuple[E3Relax, E3Relax]:
    """The golden weights in a default-mode model, and in one that also has the cell strain."""
    return golden_model_grown(golden_model, "cell_strain", "cell_strain_layers.")


def test_a_model_grown_by_the_strain_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = _with_strain(golden_model)
    batch = golden_batch(golden_model)
    out = assert_same_predictions(plain, model, batch)
    with torch.no_grad():  # a uniform expansion: eps = 0.01 for every node, through the bias
        for layer in model.cell_strain_layers[-1]:
            layer.bias.fill_(0.01)
    # the last layer's cell: the plain one plus its input cell's rows times 0.01
    grown = model(batch)
    expected = out.cells[-1] + 0.01 * out.cells[-2]
    torch.testing.assert_close(grown.cells[-1], expected, rtol=0, atol=1e-12)


def test_the_strain_keeps_the_model_rotation_equivariant(golden_model):
    _, model = _with_strain(golden_model)
    with torch.no_grad():
        for layers in model.cell_strain_layers:
            for layer in layers:
                layer.weight.normal_(0.0, 0.05)
                layer.bias.normal_(0.0, 0.01)
    batch = golden_batch(golden_model)
    assert_rotation_equivariant(model, batch, seed=1)


def test_a_checkpoint_keeps_its_cell_strain(tmp_path):
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, cell_strain=True)
    with torch.no_grad():
        model.cell_strain_layers[1][2].weight.normal_()
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    loaded = load_pretrained(tmp_path / "with.pt")
    assert loaded.config["cell_strain"] and torch.equal(
        loaded.cell_strain_layers[1][2].weight, model.cell_strain_layers[1][2].weight)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its keys
    assert load_pretrained(tmp_path / "bare.pt", paper_compat=False).config["cell_strain"]
    plain = E3Relax(hidden_channels=8, num_layers=2)  # and a checkpoint without it loads without it
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert not load_pretrained(tmp_path / "plain.pt", paper_compat=False).config["cell_strain"]
    assert load_pretrained("default").config["cell_strain"]  # the shipped model (v6.1) has it


def test_the_original_mode_has_no_cell_strain():
    with pytest.raises(ValueError, match="cell_strain is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, cell_strain=True)
