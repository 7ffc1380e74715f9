"""The optional cell mix (E3Relax(cell_mix=True)): each lattice vector's update gains a learned
combination of all three lattice vectors, from its node's invariant features and the cell's shape,
starting at zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    assert_rotation_equivariant,
    assert_same_predictions,
    golden_batch,
    golden_model_grown,
    random_rotation,
)

from e3relax_fast import E3Relax, load_pretrained
from e3relax_fast.model.e3relax import cell_shape


def _with_mix(golden_model) -> tuple[E3Relax, E3Relax]:
    """The golden weights in a default-mode model, and in one that also has the cell mix."""
    return golden_model_grown(golden_model, "cell_mix", "cell_mix_layers.")


def test_cell_shape_of_known_cells():
    cubic = 3.9 * torch.eye(3, dtype=torch.float64)
    a, c = 3.2, 5.1  # hexagonal: a = b, gamma = 120 degrees
    hexagonal = torch.tensor([[a, 0, 0], [-a / 2, a * math.sqrt(3) / 2, 0], [0, 0, c]], dtype=torch.float64)
    shape = cell_shape(torch.stack([cubic, hexagonal]))
    torch.testing.assert_close(shape[0], torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-15)
    mean = (2 * math.log(a) + math.log(c)) / 3
    expected = [math.log(a) - mean, math.log(a) - mean, math.log(c) - mean, 0.0, 0.0, -0.5]
    torch.testing.assert_close(shape[1], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14)


def test_cell_shape_ignores_rotation_and_scale():
    rng = np.random.default_rng(3)
    cells = torch.from_numpy(np.eye(3) * 4 + rng.normal(0, 0.5, (5, 3, 3)))
    q = torch.from_numpy(random_rotation(rng))
    torch.testing.assert_close(cell_shape(1.7 * cells @ q.T), cell_shape(cells), rtol=0, atol=1e-13)


def test_a_model_grown_by_the_mix_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = _with_mix(golden_model)
    batch = golden_batch(golden_model)
    out = assert_same_predictions(plain, model, batch)
    with torch.no_grad():  # the last layer: a_1 gains 0.01 a_2 through the bias, nothing else
        model.cell_mix_layers[-1][0].bias.copy_(torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64))
    grown = model(batch)
    expected = out.cells[-1].clone()
    expected[:, 0] += 0.01 * out.cells[-2][:, 1]
    torch.testing.assert_close(grown.cells[-1], expected, rtol=0, atol=1e-12)


def test_the_mix_keeps_the_model_rotation_equivariant(golden_model):
    plain, model = _with_mix(golden_model)
    with torch.no_grad():
        for layers in model.cell_mix_layers:
            for layer in layers:
                layer.weight.normal_(0.0, 0.05)
                layer.bias.normal_(0.0, 0.01)
    batch = golden_batch(golden_model)
    assert (model(batch).cells[-1] - plain(batch).cells[-1]).abs().max() > 1e-3  # the mix is on
    assert_rotation_equivariant(model, batch, seed=1)


def test_a_checkpoint_keeps_its_cell_mix(tmp_path):
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, cell_mix=True)
    with torch.no_grad():
        model.cell_mix_layers[1][2].weight.normal_()
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    loaded = load_pretrained(tmp_path / "with.pt")
    assert loaded.config["cell_mix"] and torch.equal(loaded.cell_mix_layers[1][2].weight,
                                                     model.cell_mix_layers[1][2].weight)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its keys
    assert load_pretrained(tmp_path / "bare.pt", paper_compat=False).config["cell_mix"]
    assert not load_pretrained("default").config["cell_mix"]  # the shipped model (v6.1) has none


def test_the_original_mode_has_no_cell_mix():
    with pytest.raises(ValueError, match="cell_mix is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, cell_mix=True)
