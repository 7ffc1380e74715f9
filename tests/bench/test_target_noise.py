"""bench/target_noise.py: the targets' own reproducibility (the second relaxation's start and scoring)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.target_noise import coordinate_errors, starts, symmetric_start, table, unturned
from e3relax_fast.io import Pair

pytest.importorskip("spglib")
pytest.importorskip("ase")


def _rocksalt(a: float, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cell = a * np.eye(3)
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]], dtype=float)
    frac[0, 0] += shift
    return np.array([11] * 4 + [17] * 4), frac @ cell, cell


def _pair(unrelaxed, relaxed, protocol="subst_sym") -> Pair:
    (z, pu, cu), (_, pr, cr) = unrelaxed, relaxed
    return Pair("x", z, pu, cu, pr, cr, family="perov", protocol=protocol)


def test_a_symmetric_input_whose_target_keeps_it_is_relaxed_again_under_its_symmetry():
    from ase.constraints import FixSymmetry

    pair = _pair(_rocksalt(5.4), _rocksalt(5.6))
    atoms = symmetric_start(pair)
    assert atoms is not None and any(isinstance(c, FixSymmetry) for c in atoms.constraints)
    np.testing.assert_allclose(atoms.positions, pair.pos_unrelaxed, atol=1e-12)  # not perturbed


def test_a_target_that_broke_the_symmetry_and_a_p1_input_are_relaxed_freely_from_a_perturbed_start():
    broken = _pair(_rocksalt(5.4), _rocksalt(5.6, shift=0.05))  # an atom moved off its site
    z, pos, cell = _rocksalt(5.4)
    rattled = (z, pos + np.random.default_rng(1).normal(0.0, 0.05, pos.shape), cell)  # P1
    p1 = _pair(rattled, _rocksalt(5.6), protocol="rattle")
    assert symmetric_start(broken) is None and symmetric_start(p1) is None
    atoms, kept = starts([broken, p1], sigma=1e-3, seed=0)
    assert kept == [False, False]
    moved = np.abs(atoms[1].positions - p1.pos_unrelaxed)
    assert 0 < moved.max() < 1e-2 and not atoms[1].constraints
    again, _ = starts([broken, p1], sigma=1e-3, seed=0)  # seeded
    np.testing.assert_array_equal(again[1].positions, atoms[1].positions)


def test_coordinate_errors_are_evals_and_zero_for_the_target():
    from e3relax_fast.training.evaluate import inputs_and_targets
    from e3relax_fast.training.metrics import coordinate_mae

    z, pos, cell = _rocksalt(5.4, shift=0.02)
    _, target_pos, target_cell = _rocksalt(5.6)
    target_pos = target_pos + np.array([5.6, 0.0, 0.0]) * (np.arange(8) % 2)[:, None]  # other images
    pair = Pair("x", z, pos, cell, target_pos, target_cell)
    np.testing.assert_allclose(coordinate_errors([pair], [target_pos], [target_cell]), [0.0], atol=1e-12)
    batch, unwrapped, _ = inputs_and_targets([pair])
    expected = coordinate_mae(batch.positions, unwrapped, batch.ptr).numpy()
    np.testing.assert_allclose(coordinate_errors([pair], [pos], [cell]), expected, rtol=1e-12)


def test_table_rows():
    rows = table({"all": {"dummy": [0.2, 0.4], "again": [0.03, 0.03], "model": [0.3, 0.3]}})
    assert rows[2] == "| all | 2 | 0.300 | 0.100 | 1.000 |"


def test_a_pair_whose_relaxation_fails_is_named_not_silently_dropped(monkeypatch, capsys):
    from e3relax_fast.datagen import calculators, fire
    from e3relax_fast.datagen.fire import RelaxOutcome

    class Fire:  # converges on the first structure, not on the second
        def __init__(self, *args, **kwargs):
            pass

        def relax(self, structures):
            return [RelaxOutcome(a, i == 0, 300 * i, 0.0, 0.0, 0.2 * i, None) for i, a in enumerate(structures)]

    monkeypatch.setattr(calculators, "make_calculator", lambda *args, **kwargs: None)
    monkeypatch.setattr(fire, "BatchedFIRE", Fire)
    from bench.target_noise import relax_again

    z, pos, cell = _rocksalt(5.4)
    first = Pair("a", z, pos, cell, pos, cell, protocol="rattle")
    second = Pair("b", z, pos + 0.01, cell, pos, cell, protocol="rattle")
    kept, outcomes, pairs = relax_again([first, second], sigma=1e-3, seed=0, fmax=0.05)
    assert [p.id for p in pairs] == ["a"] and len(outcomes) == 1 and len(kept) == 1
    assert "left out b: not converged in 300 steps (fmax 0.200 eV/A)" in capsys.readouterr().err


def test_a_second_relaxation_is_scored_in_the_inputs_orientation():
    """A second relaxation that lands on the target turned by 5 degrees (as FIRE's cell filter or a
    CIF's convention turns it) scores zero against the target once unturned."""
    from types import SimpleNamespace

    from ase import Atoms
    from scipy.spatial.transform import Rotation

    z, pos, cell = _rocksalt(5.4, shift=0.02)
    _, target_pos, target_cell = _rocksalt(5.6)
    pair = Pair("x", z, pos, cell, target_pos, target_cell)
    turn = Rotation.from_rotvec(np.radians(5.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
    outcome = SimpleNamespace(atoms=Atoms(numbers=z, positions=target_pos @ turn, cell=target_cell @ turn, pbc=True))
    assert coordinate_errors([pair], [target_pos @ turn], [target_cell @ turn])[0] > 0.05
    again, = unturned([pair], [outcome])
    np.testing.assert_allclose(coordinate_errors([pair], [again.pos_relaxed], [again.cell_relaxed]), [0.0], atol=1e-12)
