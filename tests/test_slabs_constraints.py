"""Periodicity from pbc and constraints honoured (relax_batch).

Slabs (one non-periodic axis) get no edge or image through their vacuum, keep their non-periodic
lattice vector and do not depend on how much vacuum they were given; molecules and wires are refused
with a clear reason; ASE FixAtoms / FixCartesian and pymatgen selective_dynamics keep the fixed
components at their input coordinates; other ASE constraints are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ase = pytest.importorskip("ase")
pytest.importorskip("moyopy")
from ase.build import bulk, fcc111, molecule  # noqa: E402
from ase.constraints import FixAtoms, FixBondLength, FixCartesian, FixSymmetry  # noqa: E402

from e3relax_fast import E3Relax, InvalidStructureError, load_pretrained, relax_batch  # noqa: E402
from e3relax_fast.batch import Batch  # noqa: E402
from e3relax_fast.frame import slab_frame  # noqa: E402
from e3relax_fast.graph import drop_images  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_pretrained("default")


def cu_slab(vacuum: float):
    slab = fcc111("Cu", (2, 2, 4), vacuum=vacuum / 2, periodic=False)
    slab.pbc = (True, True, False)
    return slab


def test_slab_graph_has_no_edge_through_the_vacuum():
    slab = cu_slab(4.0)
    view = slab_frame(slab.numbers, slab.positions, slab.cell.array, slab.pbc, 6.0)
    batch = Batch.from_arrays([(view.numbers, view.positions, view.cell)]).with_graph(6.0, 50)
    assert (batch.cell_offsets[:, 2] != 0).sum() == 3 * len(slab)  # only the self-image edges along the normal
    kept = drop_images(batch, torch.tensor([[True, True, False]]))
    assert (kept.cell_offsets[:, 2] != 0).sum() == 0
    assert kept.edge_index.shape[1] == batch.edge_index.shape[1] - 3 * len(slab)
    assert torch.equal(kept.rowptr[1:] - kept.rowptr[:-1], torch.bincount(kept.edge_index[1], minlength=len(slab)))


def test_slab_prediction_ignores_the_vacuum_and_keeps_c(model):
    thin, thick = cu_slab(4.0), cu_slab(20.0)
    out = relax_batch([thin, thick], model, dtype=torch.float64)
    for given, predicted in zip((thin, thick), out, strict=True):
        np.testing.assert_array_equal(predicted.cell.array[2], given.cell.array[2])  # c as given
        assert not np.allclose(predicted.cell.array[:2], given.cell.array[:2])  # the plane did relax
    np.testing.assert_allclose(out[0].cell.array[:2], out[1].cell.array[:2], atol=1e-9)
    # Same in-plane prediction and the same relative heights: the vacuum is not seen.
    shift = out[1].positions - out[0].positions
    np.testing.assert_allclose(shift - shift.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(shift[:, :2], 0.0, atol=1e-9)


def test_slab_atoms_split_across_the_boundary_are_one_slab(model):
    slab = cu_slab(8.0)
    moved = slab.copy()
    moved.positions[:4] += moved.cell[2]  # the bottom layer written one period up
    out = relax_batch([slab, moved], model, dtype=torch.float64)
    np.testing.assert_allclose(out[1].positions[:4] - moved.cell[2], out[0].positions[:4], atol=1e-9)
    np.testing.assert_allclose(out[1].positions[4:], out[0].positions[4:], atol=1e-9)


def test_slab_without_vacuum_is_refused(model):
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.pbc = (True, True, False)
    with pytest.raises(InvalidStructureError, match="vacuum along the non-periodic axis"):
        relax_batch([crystal], model)


@pytest.mark.parametrize("pbc", [(False, False, False), (False, False, True)])
def test_molecules_and_wires_are_refused(model, pbc):
    water = molecule("H2O")
    water.center(vacuum=10.0)
    water.pbc = pbc
    with pytest.raises(InvalidStructureError, match="molecule or a wire.*periodic crystals and slabs"):
        relax_batch([water], model)
    out = relax_batch([water, bulk("Si")], model, on_error="skip")  # one bad structure sinks nothing else
    assert out[0] is None and out[1] is not None and 0 in out.errors


def test_fixed_atoms_and_components_stay(model):
    si = bulk("Si", cubic=True)
    si.positions += np.random.default_rng(0).normal(0, 0.05, si.positions.shape)
    si.set_constraint([FixAtoms(indices=[0]), FixCartesian(1, mask=(True, False, True))])
    out = relax_batch([si], model)[0]
    np.testing.assert_array_equal(out.positions[0], si.positions[0])
    np.testing.assert_array_equal(out.positions[1, [0, 2]], si.positions[1, [0, 2]])
    assert out.positions[1, 1] != si.positions[1, 1]
    assert not np.allclose(out.positions[2:], si.positions[2:])
    assert len(out.constraints) == 2  # kept on the returned object


def test_selective_dynamics_keeps_fractional_components(model):
    from pymatgen.io.ase import AseAtomsAdaptor

    si = bulk("Si", cubic=True)
    si.positions += np.random.default_rng(1).normal(0, 0.05, si.positions.shape)
    structure = AseAtomsAdaptor.get_structure(si)
    flags = [[True, True, True]] * len(structure)
    flags[3] = [False, True, False]
    structure.add_site_property("selective_dynamics", flags)
    out = relax_batch([structure], model)[0]
    np.testing.assert_allclose(out.frac_coords[3, [0, 2]], structure.frac_coords[3, [0, 2]], atol=1e-12)
    assert abs(out.frac_coords[3, 1] - structure.frac_coords[3, 1]) > 1e-6
    assert out.lattice.volume != pytest.approx(structure.lattice.volume)


def test_fix_symmetry_keeps_symmetry_even_when_free_is_asked(model):
    import spglib

    si = bulk("Si", cubic=True)
    si.set_constraint(FixSymmetry(si))
    out = relax_batch([si], model, symmetry="free")[0]
    cell = (out.cell.array, out.get_scaled_positions(), out.numbers)
    assert spglib.get_symmetry_dataset(cell, symprec=1e-3).number == 227


def test_other_constraints_are_refused(model):
    si = bulk("Si", cubic=True)
    si.set_constraint(FixBondLength(0, 1))
    with pytest.raises(InvalidStructureError, match="FixBondLengths cannot be honoured"):
        relax_batch([si], model)


def test_paper_compat_ignores_pbc_as_the_original():
    torch.manual_seed(0)
    paper = E3Relax(hidden_channels=16, num_layers=2, paper_compat=True).double()
    slab = cu_slab(4.0)
    out = relax_batch([slab], paper)[0]
    assert out.cell.array[2] @ out.cell.array[2] != pytest.approx(slab.cell.array[2] @ slab.cell.array[2])
