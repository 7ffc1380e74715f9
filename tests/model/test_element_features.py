"""The optional element features (E3Relax(element_features=True)): the physical descriptors of
:mod:`e3relax_fast.model.elements` mapped onto the embedding by a learned map that starts at zero."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_rotation_equivariant, golden_batch, golden_model_instance

from e3relax_fast import E3Relax, load_pretrained
from e3relax_fast.model.elements import ELEMENTS, NUM_FEATURES, element_feature_table


def test_the_table_describes_every_element_and_tells_neighbours_apart():
    table = element_feature_table(118)
    assert table.shape == (118, NUM_FEATURES) and torch.isfinite(table).all()
    assert (table[0] == 0).all() and (table[1:].abs().sum(dim=1) > 0).all()
    assert len(ELEMENTS) == 118 and all(1 <= period <= 7 and 1 <= group <= 18 for _, _, period, group in ELEMENTS)
    # Na and K (same group, different radius), Na and Mg (same period): different rows.
    assert not torch.equal(table[11], table[19]) and not torch.equal(table[11], table[12])
    assert table[2, 25] == 1.0 and table[8, 25] == 0.0  # He has no electronegativity, O has one
    assert math.isclose(ELEMENTS[7][1], 3.44)  # O's Pauling electronegativity
    nonzero = table[table != 0]
    assert nonzero.abs().min() >= 1e-6  # no subnormal tails once in float32


def _with_features(golden_model) -> E3Relax:
    """The golden weights in a default-mode model that also has the element features."""
    plain = golden_model_instance(golden_model, paper_compat=False)
    model = E3Relax(hidden_channels=32, num_layers=4, element_features=True).to(torch.float64)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["element_features.proj.weight", "element_features.table"]
    return plain, model


def test_a_model_grown_by_the_features_starts_with_the_predictions_of_the_one_without(golden_model):
    plain, model = _with_features(golden_model)
    batch = golden_batch(golden_model)
    for a, b in zip(plain(batch).positions, model(batch).positions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        model.element_features.proj.weight.normal_(0.0, 0.1)
    assert not torch.equal(plain(batch).positions[-1], model(batch).positions[-1])  # the features reach the output


def test_the_features_keep_the_model_rotation_equivariant(golden_model):
    _, model = _with_features(golden_model)
    with torch.no_grad():
        model.element_features.proj.weight.normal_(0.0, 0.1)
    batch = golden_batch(golden_model)
    assert_rotation_equivariant(model, batch, seed=0)


def test_a_checkpoint_keeps_its_element_features(tmp_path):
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, element_features=True)
    with torch.no_grad():
        model.element_features.proj.weight.normal_()
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    loaded = load_pretrained(tmp_path / "with.pt")
    assert loaded.config["element_features"] and torch.equal(
        loaded.element_features.proj.weight, model.element_features.proj.weight)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its keys
    assert load_pretrained(tmp_path / "bare.pt", paper_compat=False).config["element_features"]
    assert not load_pretrained("default").config["element_features"]


def test_the_original_mode_has_no_element_features():
    with pytest.raises(ValueError, match="element_features is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, element_features=True)
