"""bench/volume_descriptors.py: the descriptor baseline of the substitution volume change."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("ase")
from bench.volume_descriptors import descriptors, fit_predict  # noqa: E402


def test_the_descriptors_of_rock_salt():
    a = 5.64
    cell = np.eye(3) * a
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    positions = np.vstack([frac, frac + [0.5, 0, 0]]) @ cell
    d = descriptors(np.array([11] * 4 + [17] * 4), positions, cell)
    assert len(d) == 9 and all(math.isfinite(v) for v in d)
    assert math.isclose(d[0], math.log(a ** 3 / 8))
    assert math.isclose(d[4], 3.16 - 0.93)  # electronegativity range Cl - Na
    assert math.isclose(d[5], math.log(a / 2 / (1.66 + 1.02)))  # Na-Cl distance / sum of covalent radii
    assert d[6] == 0.5 and d[7] == 0.5 and d[8] == 3.0


def test_the_ridge_recovers_a_quadratic_relation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = 0.3 * x[:, 0] - 0.2 * x[:, 1] * x[:, 2] + 0.1
    predicted = fit_predict(x[:300], y[:300], x[300:], ridge=1e-6)
    np.testing.assert_allclose(predicted, y[300:], atol=1e-4)


def test_the_rescale_ratios_are_zero_for_the_true_volume_and_one_for_none():
    from helpers import denoising_pairs

    from bench.volume_descriptors import rescale_ratios

    pairs = denoising_pairs(3, 5)
    for k, pair in enumerate(pairs):  # relaxations that are pure isotropic expansions
        pair.cell_relaxed = pair.cell_unrelaxed * (1.02 + 0.01 * k)
        pair.pos_relaxed = pair.pos_unrelaxed * (1.02 + 0.01 * k)
    true = 3 * np.log(1.02 + 0.01 * np.arange(3))
    np.testing.assert_allclose(rescale_ratios(pairs, true), (0.0, 0.0), atol=1e-12)
    assert rescale_ratios(pairs, np.zeros(3)) == pytest.approx((1.0, 1.0), abs=1e-12)
