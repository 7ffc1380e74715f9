"""Seed preparation (AFLOW prototypes decorated, random pyxtal crystals) and a failed symmetrised step."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ase")
pytest.importorskip("pymatgen.core")
pytest.importorskip("spglib")

LABELS = ("AB_cF8_225_a_b", "AB3C_cP5_221_a_c_b", "AB3_cP4_221_a_c", "A_cF4_225_a")  # NaCl, CaTiO3, Cu3Au, Cu


def spacegroup(atoms) -> int:
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    return spglib.get_symmetry_dataset(cell, symprec=1e-3).number


def test_aflow_decorations_are_charge_balanced_and_keep_the_prototype():
    from e3relax_fast.datagen.prepare import _Chemistry, aflow_candidates

    chem = _Chemistry()
    made = aflow_candidates(2, seed=0, labels=LABELS)
    assert len(made) == 8 and len({a.info["material_id"] for a in made}) == 8
    again = aflow_candidates(2, seed=0, labels=LABELS[:1])
    assert all(np.array_equal(a.numbers, b.numbers) and np.allclose(a.cell.array, b.cell.array)
               for a, b in zip([m for m in made if m.info["prototype"] == LABELS[0]], again, strict=True))
    for atoms in made:
        label = atoms.info["prototype"]
        assert spacegroup(atoms) == int(label.split("_")[2])  # a decoration keeps the prototype's group
        species = sorted(set(atoms.numbers))
        counts = [int((atoms.numbers == z).sum()) for z in species]
        if label == "AB_cF8_225_a_b":  # ionic: one anion, charge balanced
            anion = [z in chem.anions and chem.x[z] == max(chem.x[s] for s in species) for z in species]
            assert chem.balanced(species, counts, anion)
        if label == "A_cF4_225_a":
            assert len(species) == 1
        if label == "AB3_cP4_221_a_c":  # intermetallic: metals
            assert all(z in chem.metals for z in species)


def test_simple_seeds_draw_many_distinct_decorations_of_the_simple_types_only():
    from e3relax_fast.datagen.prepare import SIMPLE_LABELS, aflow_candidates

    made = aflow_candidates(12, seed=0, labels=SIMPLE_LABELS[:5], stream="simple", distinct=True)  # elemental types
    assert {a.info["prototype"] for a in made} == set(SIMPLE_LABELS[:5])
    for label in SIMPLE_LABELS[:5]:
        elements = [int(a.numbers[0]) for a in made if a.info["prototype"] == label]
        assert 6 <= len(elements) <= 12 and len(set(elements)) == len(elements)  # repeats of a draw kept once
    assert "simple" in made[0].info["provenance"]
    # Streams of their own: not the aflow kind's two decorations again.
    aflow = {(a.info["prototype"], a.get_chemical_formula()) for a in aflow_candidates(2, seed=0, labels=SIMPLE_LABELS)}
    simple = {(a.info["prototype"], a.get_chemical_formula()) for a in aflow_candidates(2, seed=0, labels=SIMPLE_LABELS,
                                                                                        stream="simple", distinct=True)}
    assert len(aflow & simple) < len(simple) / 4
    # Every label names a prototype pymatgen ships.
    assert {a.info["prototype"] for a in aflow_candidates(1, seed=0, labels=SIMPLE_LABELS, stream="simple")} == set(
        SIMPLE_LABELS)
    # Without distinct (the aflow kind's committed behaviour) a repeated draw stays.
    repeated = aflow_candidates(12, seed=0, labels=SIMPLE_LABELS[:5], stream="simple")
    assert len(repeated) == 60 and len(repeated) > len(made)


def test_pyxtal_candidates_are_deterministic_and_small():
    pytest.importorskip("pyxtal")
    from e3relax_fast.datagen.prepare import pyxtal_candidates

    made = pyxtal_candidates(3, seed=0, max_atoms=12)
    again = pyxtal_candidates(3, seed=0, max_atoms=12)
    assert len(made) == 3 and all(len(a) <= 12 for a in made)
    for a, b in zip(made, again, strict=True):
        assert a.info == b.info and np.array_equal(a.numbers, b.numbers) and np.allclose(a.positions, b.positions)
        assert a.info["prototype"].startswith("pyxtal-")


def test_implausible_minima():
    from ase.build import bulk

    from e3relax_fast.datagen.prepare import implausible

    assert implausible(bulk("Cu", "fcc", a=3.6), -4.0) is None
    assert implausible(bulk("Cu", "fcc", a=3.6), 0.5) == "positive energy"
    assert implausible(bulk("Cu", "fcc", a=2.0), -4.0) == "atoms too close"  # 1.41 Å < 0.6 x 2.64 Å
    assert implausible(bulk("Cu", "sc", a=1.5), -4.0) == "atoms too close"  # its own periodic image


def test_make_seeds_writes_a_seed_file(tmp_path, monkeypatch):
    pytest.importorskip("pyxtal")
    from e3relax_fast.datagen import family_of, load_seed_source, prepare
    from e3relax_fast.datagen.prepare import make_seeds

    out = tmp_path / "pyxtal_random.extxyz"
    # Lennard-Jones takes every element: the test exercises the pipeline, not the chemistry (its minima are
    # σ = 1 Å close, which the plausibility filter, tested above, would drop).
    monkeypatch.setattr(prepare, "implausible", lambda atoms, energy: None)
    made = make_seeds("pyxtal", out, 3, calculator="ase.calculators.lj:LennardJones", max_atoms=12, max_steps=100,
                      progress=False)
    assert made["candidates"] == 3 and made["written"] + sum(made["dropped"].values()) == 3 and made["written"]
    source = load_seed_source(out)
    assert len(source) == made["written"] and family_of(source.ids[0]) == "pyxtal"
    atoms = source.load(0)
    assert {"formula", "prototype", "spacegroup", "energy_per_atom", "provenance"} <= set(atoms.info)
    assert "FixSymmetry" in atoms.info["provenance"] and atoms.info["spacegroup"] == spacegroup(atoms)
    with pytest.raises(ValueError, match="seed kind"):
        make_seeds("icsd", out, 1)


def test_a_failed_symmetrised_step_is_an_error_and_the_batch_goes_on():
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.constraints import FixSymmetry

    from e3relax_fast.datagen import BatchedFIRE

    good = bulk("Cu", "fcc", a=3.8, cubic=True)
    bad = good.copy()
    good.set_constraint(FixSymmetry(good, symprec=1e-3))
    constraint = FixSymmetry(bad, symprec=1e-3)

    def refuse(atoms, cell):
        raise RuntimeError("FixSymmetry adjust_cell does not work properly with large deformation gradient step")

    constraint.adjust_cell = refuse  # as FixSymmetry does for a cell step beyond 0.25 strain
    bad.set_constraint(constraint)
    out_good, out_bad = BatchedFIRE(EMT()).relax([good, bad])
    assert out_good.converged and out_good.error is None
    assert not out_bad.converged and "symmetrised step failed" in out_bad.error and out_bad.steps == 0
