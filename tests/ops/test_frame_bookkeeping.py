"""Op ``frame_bookkeeping``: the canonical frame's choices after moyopy's search, backend ``cpu``
(csrc/frame_cpu.cpp) against its NumPy reference twin (e3relax_fast/reference/frame_bookkeeping.py).

Integers (the chosen description, the atom order, the permutations, the user's supercell matrix, atom
map and images) must be equal; positions and offsets equal to rounding; failures must raise the same
FrameError. The C++ outputs start poisoned (NaN, -7), so an element it fails to write fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("moyopy")
pytest.importorskip("ase")
import moyopy  # noqa: E402
from frame_corpus import crystals  # noqa: E402
from helpers import backend_params  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from e3relax_fast import frame, ops  # noqa: E402
from e3relax_fast.frame import SYMPREC, FrameError, canonical_frame  # noqa: E402
from e3relax_fast.reference.frame_bookkeeping import frame_bookkeeping as reference_op  # noqa: E402

OP = "frame_bookkeeping"
BACKENDS = backend_params(OP, "cpu")
CORPUS = crystals()
NAMES = list(CORPUS)
FLOAT_OUTPUTS = (1, 3, 9)  # positions, shift, offset; the others are integer arrays


def op_inputs(z, pos, cell):
    """moyopy's search on a crystal: the op's arguments, as canonical_frame passes them (at the
    first tolerance its search passes, SYMPREC / 2**k)."""
    z = np.asarray(z, dtype=np.int64)
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    for attempt in range(frame.SYMPREC_RETRIES + 1):
        try:
            return frame.search(moyopy, z, pos @ np.linalg.inv(cell), pos, cell, SYMPREC / 2**attempt)[1]
        except FrameError as err:
            failure = err
    raise failure


def assert_same(got, expected, label):
    assert len(got) == len(expected) == 10
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        if k in FLOAT_OUTPUTS:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-11, err_msg=f"{label}: output {k}")
        else:
            assert a.dtype == np.int64 and b.dtype == np.int64, (label, k, a.dtype, b.dtype)
            assert np.array_equal(a, b), (label, k, a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    from e3relax_fast.ops import compiled

    name, fn = ops.resolve(OP, backend.name, "cpu")
    assert name == "cpu" and fn is compiled.frame_bookkeeping
    assert ops.resolve(OP, "auto", "cpu")[0] == "cpu"  # auto takes it when it is built


def test_the_corpus_covers_every_kind_of_choice():
    """Polar groups with 0, 1, 2 and 3 free origin directions, symmetric and P1 crystals, supercells."""
    directions, groups, supercells = set(), set(), 0
    for z, pos, cell in CORPUS.values():
        inputs = op_inputs(z, pos, cell)
        directions.add(len(inputs[5]))
        groups.add(len(inputs[6]))
        supercells += len(inputs[12]) > len(inputs[1])
    assert directions == {0, 1, 2, 3}
    assert 1 in groups and max(groups) == 48
    assert supercells >= 20


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(backend, name):
    inputs = op_inputs(*CORPUS[name])
    assert_same(backend.fn(*inputs), reference_op(*inputs), name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", NAMES[:12])
def test_canonical_frame_is_the_same_with_either_backend(backend, name):
    """End to end, symprec retries included: every field of the frame."""
    got = canonical_frame(*CORPUS[name], backend="cpu")
    expected = canonical_frame(*CORPUS[name], backend="reference")
    for field, value in vars(expected).items():
        if isinstance(value, np.ndarray) and value.dtype == np.int64:
            assert np.array_equal(getattr(got, field), value), (name, field)
        else:
            np.testing.assert_allclose(getattr(got, field), value, rtol=0, atol=1e-11, err_msg=f"{name}: {field}")


def _nacl():
    a = 5.64
    cell = np.eye(3) * a
    frac = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
    return np.array([11] * 4 + [17] * 4), np.concatenate([frac, frac + 0.5]) % 1.0 @ cell, cell


def _broken(what):
    """Op arguments of rock salt, broken so that one consistency check fails."""
    inputs = list(op_inputs(*_nacl()))
    if what == "operations":
        inputs[2] = inputs[2].copy()
        inputs[2][0] += 0.004  # an atom 0.02 Å off its site: the operations no longer map the cell
    elif what == "cell":
        inputs[11] = inputs[11] * 1.01  # the user's cell is no integer combination of the primitive one
    else:
        inputs[12] = inputs[12].copy()
        inputs[12][3] += 0.05  # a user atom 0.05 Å off the refined cell
    return inputs


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("what", ["operations", "cell", "atoms"])
def test_failures_raise_the_same_frame_error(backend, what):
    inputs = _broken(what)
    with pytest.raises(FrameError) as expected:
        reference_op(*inputs)
    with pytest.raises(FrameError) as got:
        backend.fn(*inputs)
    assert str(got.value) == str(expected.value)
    assert {"operations": "symmetry operations", "cell": "input cell", "atoms": "input atoms"}[what] in str(got.value)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
# The backend fixture holds no state between examples.
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), species=st.integers(1, 3),
       symmetric=st.booleans())
def test_random_crystals_match_the_reference(backend, seed, n, species, symmetric):
    """Random cells and atoms; symmetric ones from a rock-salt or fcc parent with random species."""
    rng = np.random.default_rng(seed)
    if symmetric:
        z, pos, cell = _nacl()
        z = rng.choice([3, 11, 17, 29][:species + 1], size=len(z))
        strain = np.eye(3) + np.diag(rng.normal(0, 0.03, 3))
        pos, cell = pos @ strain, cell @ strain
    else:
        cell = np.eye(3) * 4.0 + rng.normal(0, 0.6, (3, 3))
        z = rng.choice([1, 6, 8, 26][:species], size=n)
        pos = rng.random((n, 3)) @ cell
    if abs(np.linalg.det(cell)) < 10.0:
        return  # a nearly flat cell: not a crystal the frame is asked for (validated before)
    try:
        inputs = op_inputs(z, pos, cell)
    except FrameError:
        return  # moyopy's search failed: the op is not reached
    try:
        expected = reference_op(*inputs)
    except FrameError as err:
        with pytest.raises(FrameError) as got:
            backend.fn(*inputs)
        assert str(got.value) == str(err)
        return
    assert_same(backend.fn(*inputs), expected, f"seed {seed}")
