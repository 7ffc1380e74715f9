"""relax_batch on random mixtures of good and bad inputs: every input gets a relaxed structure or a
clear reason, in its own place; none is dropped, none fails because of another."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from e3relax_fast import relax_batch
from e3relax_fast.io import InvalidStructureError, to_arrays, validate
from e3relax_fast.model import E3Relax

hypothesis = pytest.importorskip("hypothesis")
ase = pytest.importorskip("ase")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
torch.manual_seed(0)
MODEL = E3Relax(hidden_channels=8, num_layers=1)


def good(rng) -> tuple:
    n = int(rng.integers(1, 5))
    cell = np.diag(rng.uniform(3.0, 6.0, 3)) + rng.normal(0, 0.3, (3, 3))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0.25], [0, 0.5, 0.75]])[:n]
    return rng.integers(1, 60, n), (frac + rng.integers(-2, 3, (n, 3))) @ cell, cell


def bad(rng, kind: str):
    z, pos, cell = good(rng)
    pos, cell = pos.copy(), cell.copy()
    if kind == "nan":
        pos[0, 1] = np.nan
    elif kind == "inf_cell":
        cell[2, 2] = np.inf
    elif kind == "far":
        pos[0] += 3e6
    elif kind == "overlap":
        return np.append(z, z[0]), np.vstack([pos, pos[0] + 0.03]), cell
    elif kind == "singular":
        cell[2] = cell[0] + cell[1]
    elif kind == "left_handed":
        cell = cell[[1, 0, 2]]
    elif kind == "flat":
        cell[2] = cell[0] * 0.5 + cell[1] * 0.5 + [0, 0, 0.05]
    elif kind == "z":
        z = z.copy()
        z[-1] = int(rng.choice([0, 118, 200, -3]))
    elif kind == "shape":
        pos = pos[:, :2]
    elif kind == "empty":
        return np.zeros(0, dtype=int), np.zeros((0, 3)), cell
    elif kind == "molecule":
        return ase.Atoms(numbers=z, positions=pos, cell=cell, pbc=False)
    elif kind == "not_a_structure":
        return rng.choice(["POSCAR", None, 3.5, {"z": z}])
    return z, pos, cell


KINDS = ["nan", "inf_cell", "far", "overlap", "singular", "left_handed", "flat", "z", "shape", "empty",
         "molecule", "not_a_structure"]


def valid(structure) -> bool:
    try:
        validate(*to_arrays(structure))
    except InvalidStructureError:
        return False
    return True


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(["good", *KINDS]), min_size=1, max_size=8))
def test_every_input_gets_an_answer_or_a_reason(seed, kinds):
    rng = np.random.default_rng(seed)
    inputs = [good(rng) if kind == "good" else bad(rng, kind) for kind in kinds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = relax_batch(inputs, MODEL, on_error="skip")
    assert len(out) == len(inputs)
    for k, (structure, result) in enumerate(zip(inputs, out, strict=True)):
        if k in out.errors:
            assert result is None and isinstance(out.errors[k], str) and out.errors[k]
            assert not valid(structure) or kinds[k] == "good"  # a good input may still be refused by the frame
        else:
            assert valid(structure)
            z, pos, cell = to_arrays(result)
            assert np.array_equal(z, to_arrays(structure)[0]) and np.isfinite(pos).all() and np.isfinite(cell).all()
    invalid = [k for k, s in enumerate(inputs) if not valid(s)]
    assert set(invalid) <= set(out.errors)
    if invalid:
        with pytest.raises(InvalidStructureError) as info:
            relax_batch(inputs, MODEL)
        assert info.value.index == invalid[0]
