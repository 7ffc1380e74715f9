"""bench/perturbation_probe.py: relaxed structures perturbed three ways, scored against their minimum."""

from __future__ import annotations

import numpy as np
from helpers import denoising_pairs

from bench.perturbation_probe import probe_pairs, probe_table
from e3relax_fast.datagen.protocols import RATTLE_SIGMA
from e3relax_fast.training.dataset import minimum_pair


def test_probe_pairs_perturb_one_way_each_and_leave_the_minima_out():
    pairs = denoising_pairs(30, 0)
    probes = probe_pairs(pairs + [minimum_pair(pairs[0])], seed=3)
    assert {name: len(p) for name, p in probes.items()} == {"displacements alone": 30, "stretch alone": 30,
                                                             "both": 30}
    for moved, stretched, both, source in zip(*probes.values(), pairs, strict=True):
        assert np.array_equal(moved.cell_unrelaxed, source.cell_relaxed)  # no stretch
        stretch = np.linalg.solve(source.cell_relaxed, stretched.cell_unrelaxed)
        np.testing.assert_allclose(stretched.pos_unrelaxed, source.pos_relaxed @ stretch, atol=1e-12)  # no rattle
        np.testing.assert_allclose(both.cell_unrelaxed, stretched.cell_unrelaxed, atol=0)  # same draws
        for twin in (moved, stretched, both):
            assert np.array_equal(twin.pos_relaxed, source.pos_relaxed)
    noise = np.concatenate([m.pos_unrelaxed - s.pos_relaxed for m, s in zip(probes["displacements alone"], pairs,
                                                                          strict=True)])
    assert abs(noise.std() - RATTLE_SIGMA) < 0.15 * RATTLE_SIGMA


def test_probe_table_rows():
    def result(model, dummy, n):
        return {"model": model, "dummy": dummy, "per_structure": {"model": {"coord_mae": [0.0] * n}}}

    rows = probe_table({"displacements alone": result({"coord_mae": 0.05, "volume_error": 0.0},
                                                      {"coord_mae": 0.1, "volume_error": 0.0}, 4),
                        "stretch alone": result({"coord_mae": 0.3, "volume_error": 2.0},
                                                {"coord_mae": 0.2, "volume_error": 4.0}, 4)})
    assert rows[2] == "| displacements alone | 4 | 0.1000 | 0.500 | n/a |"
    assert rows[3] == "| stretch alone | 4 | 0.2000 | 1.500 | 0.500 |"
