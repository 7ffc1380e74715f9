"""The pretrained model that ships inside the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import e3relax_fast
from e3relax_fast import load_pretrained, relax_batch

WEIGHTS = Path(e3relax_fast.__file__).parent / "weights" / "default.pt"


def test_default_model_ships_small_and_loads_offline():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 20e6
    model = load_pretrained("default")
    assert not model.paper_compat and not model.training
    assert model.hidden_channels == 64 and model.num_layers == 4
    card = torch.load(WEIGHTS, weights_only=True)["card"]
    assert "CHGNet" in card["data"] and "e3relax-fast train" in card["training_command"]


def test_relax_batch_uses_the_default_model():
    # Rock salt with a strained cell; model=None must pick the shipped weights.
    a = 5.64
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]])
    cell = np.diag([a * 1.03, a, a * 0.98])
    structure = (np.array([11] * 4 + [17] * 4), frac @ cell, cell)
    (z, pos, new_cell), = relax_batch([structure])
    assert np.array_equal(z, structure[0])
    assert np.isfinite(pos).all() and np.isfinite(new_cell).all()
    explicit = relax_batch([structure], model=load_pretrained("default"))[0]
    np.testing.assert_allclose(explicit[1], pos, atol=1e-6)
    # A trained model does change a cell where it must: KCl written in rock salt NaCl's cell (KCl's
    # own is 12 % longer) grows (v5 by 26 %, v6 by 10 %; an untrained or identity model would not).
    (_, _, k_cell), = relax_batch([(np.array([19] * 4 + [17] * 4), structure[1], cell)])
    assert np.linalg.det(k_cell) > 1.05 * np.linalg.det(cell)
