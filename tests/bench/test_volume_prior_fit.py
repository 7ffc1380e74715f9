"""bench/volume_prior_fit.py: the volume prior fitted alone, scored on a held-out family."""

from __future__ import annotations

import math

import numpy as np
from helpers import denoising_pairs

from bench.volume_prior_fit import fit, predict, prepare, score


def _expanded(n: int, seed: int, factor: float) -> list:
    """Pairs whose relaxation is an isotropic expansion of every length by ``factor``."""
    pairs = denoising_pairs(n, seed)
    for pair in pairs:
        pair.cell_relaxed = pair.cell_unrelaxed * factor
        pair.pos_relaxed = pair.pos_unrelaxed * factor
        pair.protocol = "subst_sym"
    return pairs


def test_the_prior_learns_a_uniform_expansion_and_the_score_compares_it_with_dummy():
    prior = fit(prepare(_expanded(24, 0, 1.04)), epochs=40, lr=1e-2)
    # one atom per cell: no edge between two atoms, so no vote and no rescale
    held_out = [p for p in _expanded(12, 1, 1.04) if len(p.atomic_numbers) > 1]
    predicted = predict(prior, prepare(held_out))
    np.testing.assert_allclose(predicted, math.log(1.04), atol=0.005)
    rows = dict((name, rest) for name, *rest in score(held_out, predicted))
    n, dummy, error, _ = rows["all"]
    assert n == len(held_out) >= 4 and math.isclose(dummy, 3 * math.log(1.04), rel_tol=1e-9) and error < 0.1 * dummy
    assert set(rows) == {"subst_sym", "all"}
