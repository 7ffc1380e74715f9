"""bench/cell_shape.py: the cell's shape error (lengths' ratios, angles' cosines) against the target."""

from __future__ import annotations

import math

import numpy as np

from bench.cell_shape import shape_errors, table


def test_shape_errors_ignore_volume_and_rotation():
    cubic = 4.0 * np.eye(3)
    tetragonal = np.diag([4.0, 4.0, 4.4])
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lengths, cosines = shape_errors(np.stack([2.0 * cubic, tetragonal @ rotation.T]), np.stack([cubic, cubic]))
    # ln lengths against their mean: (-1, -1, 2) ln(1.1) / 3, against the cube's zeros
    np.testing.assert_allclose(lengths, [0.0, 4 * math.log(1.1) / 9], atol=1e-14)
    np.testing.assert_allclose(cosines, [0.0, 0.0], atol=1e-14)
    sheared = np.array([[4.0, 0.0, 0.0], [2.0, 2.0 * math.sqrt(3.0), 0.0], [0.0, 0.0, 4.0]])  # gamma 60 degrees
    _, cosines = shape_errors(sheared[None], cubic[None])
    np.testing.assert_allclose(cosines, [0.5 / 3], atol=1e-14)


def test_table_rows():
    rows = table({"protocol rattle": {"dummy_len": [0.1, 0.3], "model_len": [0.1, 0.1],
                                      "dummy_cos": [0.02, 0.0], "model_cos": [0.01, 0.0]},
                  "all": {"dummy_len": [0.2], "model_len": [0.1], "dummy_cos": [0.0], "model_cos": [0.0]}})
    assert rows[2] == "| all | 1 | 0.2000 | 0.1000 | 0.0000 | 0.0000 |"  # "all" first
    assert rows[3] == "| protocol rattle | 2 | 0.2000 | 0.1000 | 0.0100 | 0.0050 |"
