"""Batched FIRE + unit-cell filter against ASE's FIRE(UnitCellFilter) (also with FixSymmetry), adapters,
steps_saved, refine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ase = pytest.importorskip("ase")
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402

from e3relax_fast.datagen import (  # noqa: E402
    ASEBatchCalculator,
    BatchedFIRE,
    relax_one_ase,
    steps_saved,
)
from e3relax_fast.io import Pair  # noqa: E402

EMT_METALS = ("Cu", "Al", "Ni", "Pd", "Ag", "Pt", "Au")


def emt_structures(count: int, seed: int = 0) -> list:
    """Binary EMT alloys in fcc (4 atoms) and bcc (2x1x1, 4 atoms) cells, strained and rattled."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        a, b = rng.choice(EMT_METALS, 2, replace=False)
        atoms = bulk(a, "fcc", a=3.9, cubic=True) if k % 2 == 0 else bulk(a, "bcc", a=3.1, cubic=True) * (2, 1, 1)
        numbers = atoms.numbers.copy()
        numbers[rng.random(len(atoms)) < 0.5] = ase.data.atomic_numbers[b]
        atoms.numbers = numbers
        eps = rng.uniform(-0.05, 0.05, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
        out.append(atoms)
    return out


def test_same_minima_as_ase_fire_unitcellfilter():
    structures = emt_structures(6)
    reference = [relax_one_ase(a, EMT()) for a in structures]
    # max_batch < count: structures leave the active set and queued ones take their place.
    ours = BatchedFIRE(EMT(), fmax=0.05, max_steps=300, max_batch=4).relax(structures)
    for atoms, ref, out in zip(structures, reference, ours, strict=True):
        assert ref.converged and out.converged and out.error is None
        assert abs(ref.energy - out.energy) / len(atoms) < 1e-3  # eV/atom
        assert abs(ref.steps - out.steps) <= 2
        assert abs(out.atoms.get_volume() / ref.atoms.get_volume() - 1) < 1e-3
        assert list(out.atoms.numbers) == list(atoms.numbers)
        assert out.energy < out.energy_initial
        assert np.isclose(out.energy_initial, ref.energy_initial)


def test_inputs_untouched_and_outcomes_in_input_order():
    structures = emt_structures(3, seed=1)
    before = [(a.positions.copy(), a.cell.array.copy()) for a in structures]
    outcomes = BatchedFIRE(ASEBatchCalculator(EMT()), max_batch=2).relax(structures)
    for atoms, (pos, cell), out in zip(structures, before, outcomes, strict=True):
        assert np.array_equal(atoms.positions, pos) and np.array_equal(atoms.cell.array, cell)
        assert atoms.calc is None and out.atoms.calc is None
        assert list(out.atoms.numbers) == list(atoms.numbers)


def test_max_steps_and_fixed_cell():
    atoms = emt_structures(1, seed=2)[0]
    out = BatchedFIRE(EMT(), max_steps=3).relax([atoms])[0]
    assert out.steps == 3 and not out.converged and out.error is None
    fixed = BatchedFIRE(EMT(), relax_cell=False).relax([atoms])[0]
    assert fixed.converged
    assert np.allclose(fixed.atoms.cell.array, atoms.cell.array)
    assert fixed.energy < fixed.energy_initial


def test_failing_structure_is_reported_and_the_batch_goes_on():
    good, bad = emt_structures(2, seed=3)
    bad = bad.copy()
    bad.numbers[:] = 3  # Li: EMT has no parameters for it and raises

    def voigt_calc(atoms_list):
        # a batched calculator giving Voigt stresses; raises inside the ASE adapter for Li
        e, f, s = ASEBatchCalculator(EMT())(atoms_list)
        voigt = np.stack([s[:, 0, 0], s[:, 1, 1], s[:, 2, 2], s[:, 1, 2], s[:, 0, 2], s[:, 0, 1]], axis=1)
        return e, f, voigt

    out_good, out_bad = BatchedFIRE(voigt_calc).relax([good, bad])
    assert out_good.converged and out_good.error is None
    assert not out_bad.converged and out_bad.error is not None and out_bad.steps == 0
    reference = relax_one_ase(good, EMT())
    assert abs(reference.energy - out_good.energy) / len(good) < 1e-3


def spacegroup(atoms) -> int:
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    return spglib.get_symmetry_dataset(cell, symprec=1e-3).number


def simple_cubic(symbol: str, a: float, reps: int = 2):
    """A simple-cubic supercell: a saddle of EMT's energy that symmetry keeps a crystal on."""
    from ase import Atoms

    frac = [(i, j, k) for i in range(reps) for j in range(reps) for k in range(reps)]
    return Atoms(f"{symbol}{len(frac)}", scaled_positions=np.array(frac) / reps, cell=np.eye(3) * a * reps, pbc=True)


def symmetric_structures() -> list:
    """EMT alloys whose symmetry leaves cell and internal parameters free, with FixSymmetry attached."""
    from ase.constraints import FixSymmetry

    layered = bulk("Cu", "fcc", a=3.7, cubic=True) * (1, 1, 2)  # Pmm2: free z parameters
    layered.numbers[[0, 5]], layered.numbers[3] = 79, 28
    layered.set_cell(layered.cell.array @ np.diag([1.02, 1.02, 0.97]), scale_atoms=True)
    checker = simple_cubic("Cu", 2.4)  # P4/mmm after the substitution, compressed
    checker.numbers[[1, 2, 4, 7]] = 79
    out = []
    for atoms in (layered, checker):
        atoms.positions += np.random.default_rng(0).normal(0.0, 1e-4, atoms.positions.shape)  # below symprec
        atoms.set_constraint(FixSymmetry(atoms, symprec=1e-3))
        out.append(atoms)
    return out


def test_symmetry_kept_as_ase_fixsymmetry_unitcellfilter():
    symmetric = symmetric_structures()
    reference = [relax_one_ase(a, EMT()) for a in symmetric]
    # A free structure between the two: the option is per structure.
    ours = BatchedFIRE(EMT(), max_batch=2).relax([symmetric[0], emt_structures(1, seed=7)[0], symmetric[1]])
    for atoms, ref, out in zip(symmetric, reference, ours[::2], strict=True):
        assert ref.converged and out.converged and out.steps == ref.steps > 5
        assert abs(out.energy - ref.energy) < 1e-9 and abs(out.energy_initial - ref.energy_initial) < 1e-9
        assert np.allclose(out.atoms.positions, ref.atoms.positions, atol=1e-9, rtol=0)
        assert np.allclose(out.atoms.cell.array, ref.atoms.cell.array, atol=1e-9, rtol=0)
        assert spacegroup(out.atoms) == spacegroup(atoms) and not out.atoms.constraints
    assert ours[1].converged and not ours[1].atoms.constraints


def test_symmetry_kept_where_a_free_relaxation_breaks_it():
    from ase.constraints import FixSymmetry

    noisy = simple_cubic("Cu", 2.3)
    rng = np.random.default_rng(1)
    noisy.positions += rng.normal(0.0, 3e-4, noisy.positions.shape)  # float-noise scale, below symprec
    noisy.set_cell(noisy.cell.array + rng.normal(0.0, 3e-4, (3, 3)), scale_atoms=True)
    assert spacegroup(noisy) == 221  # Pm-3m
    kept = noisy.copy()
    kept.set_constraint(FixSymmetry(kept, symprec=1e-3))
    # A tight fmax: the free run must leave the saddle (as CHGNet's free relaxations tilted octahedra).
    out_kept, out_free = BatchedFIRE(EMT(), fmax=0.002, max_steps=1000).relax([kept, noisy])
    assert out_kept.converged and out_free.converged
    assert spacegroup(out_kept.atoms) == 221
    assert spacegroup(out_free.atoms) != 221 and out_free.energy < out_kept.energy - 1.0


def test_unsupported_constraint_is_an_error():
    from ase.constraints import FixAtoms

    atoms = emt_structures(1, seed=8)[0]
    atoms.set_constraint(FixAtoms([0]))
    out = BatchedFIRE(EMT()).relax([atoms])[0]
    assert not out.converged and "FixAtoms" in out.error


def test_steps_saved_counts_fewer_steps_from_a_good_prediction():
    structures = emt_structures(3, seed=4)
    relaxed = [o.atoms for o in BatchedFIRE(EMT()).relax(structures)]
    pairs = [Pair(f"p{k}", a.numbers.astype(np.int64), a.positions, a.cell.array, r.positions, r.cell.array)
             for k, (a, r) in enumerate(zip(structures, relaxed, strict=True))]
    predictions = [(r.positions, r.cell.array) for r in relaxed]
    result = steps_saved(pairs, predictions, EMT())
    assert result["ids"] == ["p0", "p1", "p2"]
    assert result["n_both_converged"] == 3
    assert all(s == 0 for s in result["steps_prediction"])  # already converged
    assert result["mean_steps_saved"] > 5 and result["fraction_steps_saved"] == 1.0
    assert abs(result["mean_energy_difference"]) < 1e-3


def test_relax_batch_refine_lowers_the_emt_energy():
    from e3relax_fast.model import E3Relax
    from e3relax_fast.relax import relax_batch

    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    rattled = emt_structures(2, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_shot = relax_batch(rattled, model)
        refined = relax_batch(rattled, model, refine=EMT(), refine_steps=25, refine_fmax=0.05)
    finally:
        torch.set_num_threads(threads)

    def energy(atoms):
        atoms = atoms.copy()
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    for a, b in zip(one_shot, refined, strict=True):
        assert type(b) is type(a) and list(b.numbers) == list(a.numbers)
        assert energy(b) < energy(a) - 1e-3


@pytest.mark.filterwarnings("ignore::UserWarning")  # chgnet's own tensor-conversion warning
def test_chgnet_batched_adapter_matches_its_ase_calculator():
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install e3relax-fast[datagen])")
    pytest.importorskip("pymatgen.core")
    import contextlib
    import io

    from chgnet.model import CHGNetCalculator

    from e3relax_fast.datagen import CHGNetBatchCalculator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched = CHGNetBatchCalculator(batch_size=4)
        with contextlib.redirect_stdout(io.StringIO()):
            single = CHGNetCalculator(model=batched.model, use_device="cpu")
        structures = emt_structures(2, seed=6)
        energies, forces, stresses = batched(structures)
        for k, atoms in enumerate(structures):
            atoms = atoms.copy()
            atoms.calc = single
            assert abs(energies[k] - atoms.get_potential_energy()) < 1e-3 * len(atoms)
            assert np.allclose(forces[k], atoms.get_forces(), atol=2e-3)
            assert np.allclose(stresses[k], atoms.get_stress(voigt=False), atol=2e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore::UserWarning")  # chgnet's own tensor-conversion warning
def test_chgnet_adapter_flushing_subnormals_gives_the_same_results_and_restores_the_mode():
    """The CHGNet adapter evaluates with subnormal numbers flushed (x86 FTZ/DAZ, much faster on CPU):
    energies, forces and stresses as without it, to float32 noise, and the caller's mode is left as
    it was, off or on."""
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install e3relax-fast[datagen])")
    pytest.importorskip("pymatgen.core")
    from e3relax_fast.datagen import CHGNetBatchCalculator
    from e3relax_fast.datagen.calculators import flushing_subnormals as flushing

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flushed = CHGNetBatchCalculator(batch_size=4)
        kept = CHGNetBatchCalculator(model=flushed.model, batch_size=4, flush_subnormals=False)
        structures = emt_structures(3, seed=7)
        assert not flushing()
        a = flushed(structures)
        assert not flushing()
        b = kept(structures)
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5 * sum(len(s) for s in structures))
        for fa, fb in zip(a[1], b[1], strict=True):
            np.testing.assert_allclose(fa, fb, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[2], b[2], rtol=0, atol=1e-6)
        torch.set_flush_denormal(True)
        try:
            flushed(structures)
            assert flushing()
        finally:
            torch.set_flush_denormal(False)
    finally:
        torch.set_num_threads(threads)
