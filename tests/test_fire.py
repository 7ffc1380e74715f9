"""Batched FIRE + unit-cell filter against ASE's FIRE(UnitCellFilter), adapters, steps_saved, refine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ase = pytest.importorskip("ase")
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402

from e3relax_fast.data import Pair  # noqa: E402
from e3relax_fast.datagen import (  # noqa: E402
    ASEBatchCalculator,
    BatchedFIRE,
    relax_one_ase,
    steps_saved,
)

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
