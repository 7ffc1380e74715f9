"""bench/lofo_breakdown.py: a held-out family's error against Dummy split by protocol and element set."""

from __future__ import annotations

import numpy as np
import pytest

from bench.lofo_breakdown import element_set, losses, ratio_without, report

pytest.importorskip("ase")  # element_set names the elements with ase.data


def test_element_sets_and_losses():
    assert element_set([14, 6, 6, 14]) == "C-Si" and element_set(np.array([11])) == "Na"
    keys = np.array(["A", "B", "A", "C"])
    model, dummy = np.array([3.0, 1.0, 1.0, 0.5]), np.array([1.0, 2.0, 1.0, 1.0])
    assert losses(keys, model, dummy) == [("A", 2.0), ("C", -0.5), ("B", -1.0)]
    assert ratio_without(keys, model, dummy, ["A"]) == pytest.approx(1.5 / 3.0)
    assert ratio_without(keys, model, dummy, []) == pytest.approx(5.5 / 5.0)


def test_report_names_the_worst_element_set_and_the_ratios_without_it():
    keys = np.array(["C-Si", "C-Si", "Na", "Cl-Na"])
    protocols = np.array(["seed", "rattle", "rattle", "minimum"])
    per_structure = {
        "model": {"coord_mae": np.array([0.5, 0.4, 0.1, 0.01]), "volume_error": np.array([9.0, 8.0, 1.0, 0.5])},
        "dummy": {"coord_mae": np.array([0.1, 0.2, 0.2, 0.0]), "volume_error": np.array([1.0, 2.0, 3.0, 0.0])}}
    volume, target = np.array([1.7, 1.5, 1.0, 1.0]), np.array([1.0, 0.9, 1.1, 1.0])
    lines = report(keys, protocols, per_structure, volume, target, 2)
    assert lines[0] == "All 4 structures: coordinates 2.020 × Dummy, volume 3.083 ×"
    assert "| minimum | 1 | 0.00 | n/a |" in lines and "| rattle | 2 | 0.80 | 1.250 |" in lines
    assert "| C-Si | 2 | +0.60 | 1.50–1.70 | 0.90–1.00 |" in lines
    assert "Without the 1 worst element set(s) (C-Si): coordinates 0.550 × Dummy, volume 0.500 ×" in lines


def test_only_element_sets_that_lose_are_left_out():
    keys = np.array(["C", "Si", "Si"])
    per_structure = {name: {"coord_mae": np.array(v), "volume_error": np.array(v)}
                     for name, v in (("model", [0.1, 0.35, 0.1]), ("dummy", [0.2, 0.2, 0.2]))}
    lines = report(keys, np.array(["subst"] * 3), per_structure, np.ones(3), np.ones(3), 5)
    assert [line for line in lines if line.startswith("Without")] == [
        "Without the 1 worst element set(s) (Si): coordinates 0.500 × Dummy, volume 0.500 ×"]
    halved = {key: 0.5 * value for key, value in per_structure["dummy"].items()}
    helped = {"model": halved, "dummy": per_structure["dummy"]}  # the model better everywhere
    assert not [line for line in report(keys, keys, helped, np.ones(3), np.ones(3), 5) if line.startswith("Without")]
