"""Op ``frame_p1_certificate``: whether no pure translation and no inversion maps a crystal onto
itself within a tolerance, backend ``cpu`` (csrc/frame_cpu.cpp) against its NumPy reference twin
(e3relax_fast/reference/frame_p1_certificate.py), and both against moyopy: the same answer on every crystal of the
frame corpus (supercells, centrosymmetric crystals, polar ones, the test split) and on each rattled,
near and far from its symmetry; a certified crystal is one where moyopy finds neither operation."""

from __future__ import annotations

import numpy as np
import pytest

moyopy = pytest.importorskip("moyopy")
pytest.importorskip("ase")
from frame_corpus import crystals  # noqa: E402
from helpers import backend_params  # noqa: E402

from e3relax_fast import ops  # noqa: E402
from e3relax_fast.reference.frame_p1_certificate import frame_p1_certificate as reference_op  # noqa: E402

OP = "frame_p1_certificate"
BACKENDS = backend_params(OP, "cpu")
SYMPREC = 1e-3
MARGIN = 4.0  # frame.GENERIC_LATTICE_MARGIN: the certificate is asked at 4 symprec


def reduced(z, positions, cell):
    """``(Z, fractions, basis)`` in the Niggli-reduced basis, as the frame asks."""
    basis, _ = moyopy.niggli_reduce(cell.tolist())
    basis = np.array(basis)
    return np.asarray(z, dtype=np.int64), positions @ np.linalg.inv(basis), basis


def cases():
    """The corpus, and each crystal rattled by 0.1, 1, 3 and 30 symprec (Gaussian, per component)."""
    rng = np.random.default_rng(11)
    out = {}
    for name, (z, pos, cell) in crystals(max_test_pairs=20).items():
        out[name] = (z, pos, cell)
        for scale in (0.1, 1.0, 3.0, 30.0):
            out[f"{name}, rattled {scale} symprec"] = (z, pos + rng.normal(0.0, scale * SYMPREC, pos.shape), cell)
    return out


CASES = cases()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    from e3relax_fast.ops import compiled

    name, fn = ops.resolve(OP, backend.name, "cpu")
    assert name == "cpu" and fn is compiled.frame_p1_certificate
    assert ops.resolve(OP, "auto", "cpu")[0] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_reference(backend):
    answers = []
    for name, case in CASES.items():
        z, x, basis = reduced(*case)
        for tolerance in (0.5 * SYMPREC, MARGIN * SYMPREC, 0.05):
            got = backend.fn(z, x, basis, tolerance)
            assert isinstance(got, bool) and got == reference_op(z, x, basis, tolerance), (name, tolerance)
            answers.append(got)
    assert 0.2 < np.mean(answers) < 0.8  # both answers are exercised


def operations(z, positions, cell, symprec):
    data = moyopy.MoyoDataset(moyopy.Cell(cell.tolist(), (positions @ np.linalg.inv(cell)).tolist(), z.tolist()),
                              symprec=symprec)
    rotations = np.array(data.operations.rotations)
    translations = np.array(data.operations.translations)
    identity = (rotations == np.eye(3, dtype=int)).all(axis=(1, 2))
    pure = identity & (np.abs(translations - np.round(translations)) > 1e-6).any(axis=1)
    inversion = (rotations == -np.eye(3, dtype=int)).all(axis=(1, 2))
    return bool(pure.any()), bool(inversion.any())


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(("frame_p1_certificate", "reference"), id="reference")],
                         indirect=True)
def test_agrees_with_moyopy(backend):
    """Certified at MARGIN symprec: moyopy at symprec finds no pure translation and no inversion.
    Not certified at 0.5 symprec (below moyopy's tolerance): moyopy finds one of them."""
    certified = refused = 0
    for name, (z, pos, cell) in CASES.items():
        args = reduced(z, pos, cell)
        translation, inversion = operations(np.asarray(z), pos, cell, SYMPREC)
        if backend.fn(*args, MARGIN * SYMPREC):
            certified += 1
            assert not translation and not inversion, name
        if not backend.fn(*args, 0.5 * SYMPREC):
            refused += 1
            assert translation or inversion, name
    assert certified >= 40 and refused >= 40, (certified, refused)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_supercells_and_centrosymmetric_crystals_are_never_certified(backend):
    rng = np.random.default_rng(5)
    cell = np.array([[3.1, 0.0, 0.0], [0.4, 4.3, 0.0], [0.7, 0.9, 5.9]])
    frac = rng.random((5, 3))
    z = np.array([8, 8, 14, 26, 26])
    assert backend.fn(z, frac, cell, MARGIN * SYMPREC)  # generic positions: certified
    double = np.concatenate([frac, frac + [1.0, 0.0, 0.0]]) * [0.5, 1.0, 1.0]  # the cell doubled along a
    assert not backend.fn(np.tile(z, 2), double, cell * [[2.0], [1.0], [1.0]], MARGIN * SYMPREC)
    centre = rng.random(3)
    inverted = np.concatenate([frac, 2 * centre - frac])
    assert not backend.fn(np.tile(z, 2), inverted, cell, MARGIN * SYMPREC)
    # ... and one atom moved by 10 MARGIN symprec breaks the inversion: certified again
    inverted[0] += 10 * MARGIN * SYMPREC * np.array([1.0, 0.0, 0.0]) @ np.linalg.inv(cell)
    assert backend.fn(np.tile(z, 2), inverted, cell, MARGIN * SYMPREC)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_shapes_are_checked(backend):
    with pytest.raises(ValueError, match="differ in length"):
        backend.fn(np.array([1, 2], dtype=np.int64), np.zeros((3, 3)), np.eye(3), 1e-3)
