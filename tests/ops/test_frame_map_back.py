"""Op ``frame_map_back``: a prediction made in the canonical frame taken back to the user's
description (projection onto the space group, translation gauge, basis, supercell, atom order and
orientation), backend ``cpu`` (csrc/frame_cpu.cpp) against its NumPy reference twin
(e3relax_fast/reference/frame_map_back.py): equal to rounding, on every crystal of the corpus and its
rewritings, with and without the projection. The C++ outputs start poisoned (NaN)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("moyopy")
pytest.importorskip("ase")
from frame_corpus import crystals  # noqa: E402
from helpers import backend_params  # noqa: E402

from e3relax_fast import ops  # noqa: E402
from e3relax_fast.frame import canonical_frame  # noqa: E402
from e3relax_fast.reference.frame_map_back import frame_map_back as reference_op  # noqa: E402

OP = "frame_map_back"
BACKENDS = backend_params(OP, "cpu")
CORPUS = crystals()


def frame_args(frame):
    return (frame.positions, frame.cell, frame.rotations, frame.permutations, frame.choice_linear, frame.choice_shift,
            frame.choice_images, frame.atom_map, frame.images, frame.offset, frame.user_cell, frame.rotation)


def prediction(frame, rng, scale=1.0):
    """A noisy "prediction" for the canonical cell: strained cell, displaced atoms (some across the cell)."""
    cell = frame.cell @ (np.eye(3) + scale * rng.normal(0, 0.03, (3, 3)))
    positions = frame.positions @ np.linalg.solve(frame.cell, cell) + scale * rng.normal(0, 0.1, frame.positions.shape)
    positions[::3] += cell[0]
    return positions, cell


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    from e3relax_fast.ops import compiled

    name, fn = ops.resolve(OP, backend.name, "cpu")
    assert name == "cpu" and fn is compiled.frame_map_back
    assert ops.resolve(OP, "auto", "cpu")[0] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("symmetrize", [True, False])
@pytest.mark.parametrize("name", list(CORPUS))
def test_matches_reference(backend, name, symmetrize):
    frame = canonical_frame(*CORPUS[name])
    positions, cell = prediction(frame, np.random.default_rng(len(name)))
    got = backend.fn(positions, cell, *frame_args(frame), symmetrize)
    expected = reference_op(positions, cell, *frame_args(frame), symmetrize)
    assert got[0].shape == (len(CORPUS[name][0]), 3) and got[1].shape == (3, 3)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_identity_prediction_maps_back_onto_the_input(backend):
    for name, (z, pos, cell) in CORPUS.items():
        frame = canonical_frame(z, pos, cell)
        got_pos, got_cell = backend.fn(frame.positions, frame.cell, *frame_args(frame), True)
        np.testing.assert_allclose(got_cell, cell, atol=2e-3, err_msg=name)
        np.testing.assert_allclose(got_pos, pos, atol=4e-3, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_finite_predictions_stay_non_finite(backend):
    """A NaN in the prediction is not hidden (relax_batch reports such a structure as failed)."""
    frame = canonical_frame(*CORPUS["Cu fcc, rewritten"])
    positions, cell = prediction(frame, np.random.default_rng(0))
    positions[0, 0] = np.nan
    for symmetrize in (True, False):
        got = backend.fn(positions, cell, *frame_args(frame), symmetrize)
        expected = reference_op(positions, cell, *frame_args(frame), symmetrize)
        assert np.isnan(got[0]).any()
        assert np.array_equal(np.isnan(got[0]), np.isnan(expected[0]))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inconsistent_shapes_are_refused(backend):
    frame = canonical_frame(*CORPUS["Cu fcc, rewritten"])
    args = list(frame_args(frame))
    args[3] = args[3][:, :0]  # permutations with no atoms
    with pytest.raises(ValueError, match="inconsistent shapes"):
        backend.fn(frame.positions, frame.cell, *args, True)
