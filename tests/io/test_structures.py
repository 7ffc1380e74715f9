"""Conversion to/from pymatgen, ASE and array triples, and validation of model inputs."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA

from e3relax_fast.batch import Batch
from e3relax_fast.io.structures import from_arrays_like, structure_kind, to_arrays
from e3relax_fast.io.validate import InvalidStructureError, close_atoms, plane_spacings, validate

pmg = pytest.importorskip("pymatgen.core")
ase = pytest.importorskip("ase")
from ase.build import bulk  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.constraints import FixAtoms  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUBE = np.eye(3) * 5.0


def pymatgen_structure():
    """Oxidation-state species, site properties, labels, charge and properties, in a set order."""
    lattice = pmg.Lattice([[4.0, 0.1, 0.0], [0.2, 4.1, 0.0], [0.1, 0.3, 4.2]])
    species = [pmg.Species("Fe", 2), pmg.Species("O", -2), pmg.Species("Fe", 3), pmg.Species("O", -2)]
    frac = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0.25], [0.1, 0.6, 0.9]]
    return pmg.Structure(
        lattice,
        species,
        frac,
        charge=1.0,
        site_properties={"magmom": [4.0, 0.0, 5.0, 0.1], "selective_dynamics": [[True] * 3] * 4},
        labels=["Fe1", "O1", "Fe2", "O2"],
        properties={"source": "test"},
    )


def ase_atoms():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.info["name"] = "salt"
    atoms.set_initial_magnetic_moments(np.arange(len(atoms), dtype=float))
    atoms.set_tags(np.arange(len(atoms)))
    atoms.set_constraint(FixAtoms(indices=[0, 2]))
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0)
    return atoms


def new_geometry(n: int, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions that include one outside the cell (must not be wrapped) and a strained cell."""
    rng = np.random.default_rng(1)
    positions = rng.uniform(0, 4, (n, 3))
    positions[0] = [-1.5, 7.0, 12.0]
    return positions, cell @ (np.eye(3) + 0.01 * rng.standard_normal((3, 3)))


# --- round trips -----------------------------------------------------------------------------------


def test_pymatgen_round_trip_keeps_everything_but_geometry():
    s = pymatgen_structure()
    z, pos, cell = to_arrays(s)
    assert z.dtype == np.int64 and pos.dtype == np.float64 and cell.dtype == np.float64
    assert z.tolist() == [26, 8, 26, 8]
    np.testing.assert_allclose(pos, s.cart_coords)
    np.testing.assert_allclose(cell, s.lattice.matrix)

    new_pos, new_cell = new_geometry(len(s), cell)
    out = from_arrays_like(s, new_pos, new_cell)
    assert type(out) is type(s)
    assert [site.species for site in out] == [site.species for site in s]  # oxidation states, order
    assert out.site_properties == s.site_properties
    assert out.labels == s.labels
    assert out.charge == s.charge and out.properties == s.properties
    np.testing.assert_allclose(out.cart_coords, new_pos, atol=1e-12)  # Cartesian, not wrapped
    np.testing.assert_allclose(out.lattice.matrix, new_cell, atol=1e-14)


def test_pymatgen_immutable_structure_stays_immutable():
    s = pmg.IStructure.from_sites(pymatgen_structure())
    out = from_arrays_like(s, *to_arrays(s)[1:])
    assert type(out) is pmg.IStructure


def test_ase_round_trip_keeps_info_arrays_pbc_constraints_and_drops_calculator():
    atoms = ase_atoms()
    z, pos, cell = to_arrays(atoms)
    assert z.tolist() == atoms.numbers.tolist()
    np.testing.assert_array_equal(pos, atoms.positions)
    np.testing.assert_array_equal(cell, atoms.cell.array)

    new_pos, new_cell = new_geometry(len(atoms), cell)
    out = from_arrays_like(atoms, torch.as_tensor(new_pos), torch.as_tensor(new_cell))
    assert out is not atoms and out.calc is None
    assert out.info == atoms.info
    assert out.numbers.tolist() == atoms.numbers.tolist()
    np.testing.assert_array_equal(out.get_initial_magnetic_moments(), atoms.get_initial_magnetic_moments())
    np.testing.assert_array_equal(out.get_tags(), atoms.get_tags())
    assert out.pbc.tolist() == atoms.pbc.tolist()
    assert out.constraints[0].index.tolist() == [0, 2]
    # The prediction is kept as is, fixed atoms included.
    np.testing.assert_array_equal(out.positions, new_pos)
    np.testing.assert_array_equal(out.cell.array, new_cell)
    np.testing.assert_array_equal(atoms.positions, pos)  # template untouched


@pytest.mark.parametrize(
    "container", [np.asarray, lambda x: torch.as_tensor(np.asarray(x)), lambda x: np.asarray(x).tolist()]
)
def test_triple_round_trip(container):
    z = [8, 1, 1]
    pos = [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]
    triple = (container(z), container(pos), container(CUBE * 2))
    assert structure_kind(triple) == "triple"
    z_out, pos_out, cell_out = to_arrays(triple)
    assert z_out.dtype == np.int64 and z_out.tolist() == z
    np.testing.assert_array_equal(pos_out, pos)
    new_pos, new_cell = new_geometry(3, cell_out)
    out = from_arrays_like(triple, torch.as_tensor(new_pos), new_cell)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[0].tolist() == z and out[1].dtype == np.float64
    np.testing.assert_array_equal(out[1], new_pos)
    np.testing.assert_array_equal(out[2], new_cell)


def test_triple_accepts_integral_float_atomic_numbers():
    z, _, _ = to_arrays((np.array([11.0, 17.0]), np.zeros((2, 3)), CUBE))
    assert z.dtype == np.int64 and z.tolist() == [11, 17]


def test_a_list_of_three_structures_is_not_a_triple():
    triple = ([1], [[0.0, 0.0, 0.0]], CUBE)
    assert structure_kind([triple, triple, triple]) is None
    assert structure_kind([bulk("Si")] * 3) is None
    assert structure_kind([pymatgen_structure()] * 3) is None


def test_io_libraries_are_imported_lazily():
    code = (
        "import sys, numpy as np\n"
        "import e3relax_fast, e3relax_fast.relax, e3relax_fast.model, e3relax_fast.io, e3relax_fast.cli\n"
        "import e3relax_fast.training\n"
        "from e3relax_fast.io import to_arrays, validate, from_arrays_like\n"
        "t = ([1, 1], [[0, 0, 0], [0, 0, 0.74]], np.eye(3) * 8)\n"
        "validate(*to_arrays(t)); from_arrays_like(t, *to_arrays(t)[1:])\n"
        "assert 'pymatgen' not in sys.modules and 'ase' not in sys.modules, 'eager import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- invalid inputs --------------------------------------------------------------------------------


def check_invalid(structure, index, *fragments):
    """``to_arrays`` + ``validate`` must raise an error naming ``index`` and every fragment."""
    with pytest.raises(InvalidStructureError) as info:
        validate(*to_arrays(structure, index=index), index=index)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.index == index
    assert str(err) == f"structure {index}: {err.reason}"
    for fragment in fragments:
        assert fragment in err.reason, (fragment, err.reason)
    return err


def test_empty_structure():
    err = check_invalid(([], np.zeros((0, 3)), CUBE), 0, "empty structure")
    copy = pickle.loads(pickle.dumps(err))  # e.g. raised in a DataLoader worker
    assert (copy.index, copy.reason, str(copy)) == (err.index, err.reason, str(err))


def test_nan_positions_and_inf_cell():
    pos = np.array([[0.0, 0, 0], [1.0, 1, 1], [np.nan, 0, 0]])
    check_invalid(([1, 1, 1], pos, CUBE), 2, "positions contain NaN or inf", "atom 2")
    cell = CUBE.copy()
    cell[1, 1] = np.inf
    check_invalid(([1], np.zeros((1, 3)), cell), 5, "cell contains NaN or inf")


def test_unknown_elements_are_named():
    pos = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    check_invalid(([8, 118], pos, CUBE), 1, "unknown element Z=118", "atom 1", "1..117")
    check_invalid(([0, 8], pos, CUBE), 3, "unknown element Z=0", "atom 0")


def test_singular_degenerate_and_left_handed_cells():
    one = ([1], np.zeros((1, 3)))
    check_invalid((*one, np.diag([5.0, 5.0, 0.0])), 0, "singular cell")
    check_invalid((*one, np.array([[5.0, 0, 0], [0, 5, 0], [5, 5, 0]])), 1, "singular cell")
    # c is almost in the a-b plane: the a-b planes are 0.2 Å apart.
    check_invalid(
        (*one, np.array([[5.0, 0, 0], [0, 5, 0], [3, 4, 0.2]])), 2, "degenerate cell", "a and b", "0.2 Å"
    )
    check_invalid((*one, np.diag([5.0, 0.3, 5.0])), 3, "degenerate cell", "c and a", "0.3 Å")
    check_invalid((*one, np.diag([5.0, -5.0, 5.0])), 4, "left-handed cell", "det = -125")


def test_overlapping_atoms_inside_the_cell():
    pos = np.array([[0.0, 0, 0], [1.0, 1, 1], [2.5, 2.5, 2.5], [1.0, 1.05, 1]])
    check_invalid(([1, 6, 8, 1], pos, CUBE), 7, "atoms 1 and 3 overlap", "0.05 Å")


def test_overlap_across_the_cell_boundary_is_detected():
    # 0.02 Å from one face and 0.03 Å from the opposite one: 0.05 Å apart through the boundary.
    pos = np.array([[0.02, 2.0, 2.0], [4.97, 2.0, 2.0], [2.5, 0.5, 0.5]])
    err = check_invalid(([14, 14, 8], pos, CUBE), 4, "atoms 0 and 1 overlap", "periodic images")
    assert "0.05 Å" in err.reason


def test_overlap_through_unwrapped_positions_and_skewed_cells_matches_brute_force():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 40:
        cell = np.diag(rng.uniform(1.0, 4.0, 3)) + rng.normal(0, 0.6, (3, 3))
        if np.linalg.det(cell) <= 0 or plane_spacings(cell).min() < 0.5:
            continue
        distance = rng.uniform(0.01, 0.2)
        direction = rng.normal(size=3)
        p0 = rng.uniform(-5, 5, 3)
        image = rng.integers(-2, 3, 3)
        p1 = p0 + image @ cell + distance * direction / np.linalg.norm(direction)
        images = np.array(list(itertools.product(range(-4, 5), repeat=3))) @ cell
        true = np.linalg.norm(p1 - p0 + images, axis=1).min()
        structure = ([6, 6], np.stack([p0, p1]), cell)
        if true < 0.1:
            err = check_invalid(structure, 9, "atoms 0 and 1 overlap")
            assert f"{true:.4g} Å" in err.reason
        else:
            validate(*to_arrays(structure))
        checked += 1


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_all_pairs_and_binned_closest_pair_agree(threshold):
    """Structures of up to 64 atoms measure every pair; larger ones bin: both give the same pair."""
    from e3relax_fast.io.validate import _closest_pair_all, _closest_pair_binned

    rng = np.random.default_rng(3)
    found = 0
    for _ in range(60):
        n = int(rng.integers(2, 65))
        cell = np.diag(rng.uniform(3.0, 9.0, 3)) + rng.normal(0, 0.4, (3, 3))
        if np.linalg.det(cell) <= 0 or plane_spacings(cell).min() < 2.5 * threshold:
            continue
        frac = rng.uniform(0, 1, (n, 3))
        k = int(rng.integers(1, n))  # atom k planted near atom 0, possibly through a face
        frac[k] = (frac[0] + rng.normal(0, 0.6 * threshold, 3) @ np.linalg.inv(cell)) % 1.0
        a, b = _closest_pair_all(frac, cell, threshold), _closest_pair_binned(frac, cell, threshold)
        assert (a is None) == (b is None)
        if a is not None:
            found += 1
            assert a[2] == pytest.approx(b[2], abs=1e-12) and {a[0], a[1]} == {b[0], b[1]}
    assert found > 10


def test_close_but_not_overlapping_across_the_boundary_is_valid():
    pos = np.array([[0.05, 0.0, 0.0], [4.9, 0.0, 0.0]])  # 0.15 Å apart through the boundary
    validate(*to_arrays(([1, 1], pos, CUBE)))


def test_disordered_pymatgen_structure():
    s = pmg.Structure(pmg.Lattice.cubic(4.2), [{"Fe": 0.5, "Ni": 0.5}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    check_invalid(s, 2, "disordered structure", "site 0")
    vacancy = pmg.Structure(pmg.Lattice.cubic(4.2), [{"Fe": 0.9}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    check_invalid(vacancy, 0, "disordered structure")


def test_disordered_cif_read_by_ase(tmp_path):
    s = pmg.Structure(pmg.Lattice.cubic(4.2), [{"Fe": 0.5, "Ni": 0.5}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    s.to(filename=str(tmp_path / "alloy.cif"))
    atoms = ase.io.read(tmp_path / "alloy.cif")
    check_invalid(atoms, 1, "disordered structure", "occupancy")


def test_molecules_and_cell_less_atoms():
    check_invalid(ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), 3, "a molecule or a wire")
    molecule = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    molecule.center(vacuum=5.0)
    check_invalid(molecule, 3, "a molecule or a wire", "periodic crystals and slabs")  # pbc still False
    molecule.pbc = True  # periodic in a box: a valid model input
    validate(*to_arrays(molecule))
    periodic_without_cell = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], pbc=True)
    check_invalid(periodic_without_cell, 3, "without a full 3D cell")


@pytest.mark.parametrize(
    ("structure", "fragment"),
    [
        (([1, 1], np.zeros((2, 2)), CUBE), "positions must have shape (n, 3) = (2, 3)"),
        (([1, 1], np.zeros((3, 3)), CUBE), "positions must have shape (n, 3) = (2, 3)"),
        (([1], np.zeros((1, 3)), np.eye(2)), "cell must have shape (3, 3)"),
        (([[1, 1]], np.zeros((2, 3)), CUBE), "atomic numbers must have shape (n,)"),
        (([1.5], np.zeros((1, 3)), CUBE), "atomic numbers must be integers"),
        ((["H"], np.zeros((1, 3)), CUBE), "atomic numbers must be integers"),
        (([1], [[0.0, 0.0], [1.0]], CUBE), "cannot read"),
        ("Si.cif", "unsupported structure type builtins.str"),
        (np.zeros((2, 3)), "unsupported structure type numpy.ndarray"),
    ],
)
def test_wrong_shapes_and_types(structure, fragment):
    check_invalid(structure, 6, fragment)


def test_pymatgen_molecule_is_unsupported():
    check_invalid(
        pmg.Molecule(["H", "H"], [[0, 0, 0], [0, 0, 0.74]]), 0, "unsupported structure type", "Molecule"
    )


def validated_batch(structures) -> Batch:
    """A batch of ``structures``, each converted and validated under its index in the list."""
    arrays = [to_arrays(s, index=k) for k, s in enumerate(structures)]
    for k, a in enumerate(arrays):
        validate(*a, index=k)
    return Batch.from_arrays(arrays)


def test_good_structures_next_to_bad_ones():
    good = pymatgen_structure()
    overlap = ([1, 1], [[0.0, 0, 0], [0.0, 0, 0.05]], CUBE)
    batch = validated_batch([good, ase_atoms()])
    assert batch.num_graphs == 2 and batch.num_atoms == 12
    with pytest.raises(InvalidStructureError, match=r"^structure 2: atoms 0 and 1 overlap") as info:
        validated_batch([good, ase_atoms(), overlap, good])
    assert info.value.index == 2


def test_every_golden_graph_structure_is_valid():
    # 1-atom cells, slabs, skewed and non-reduced cells, extreme Z, unwrapped positions (spec §13).
    with np.load(DATA / "graphs.npz") as golden:
        keys = [k.removesuffix("_z") for k in golden.files if k.endswith("_z")]
        assert len(keys) == 26
        for index, key in enumerate(keys):
            validate(
                *to_arrays((golden[f"{key}_z"], golden[f"{key}_pos"], golden[f"{key}_cell"])), index=index
            )


def test_coordinates_beyond_1e6_angstrom():
    """Before: accepted here, then a bare ValueError from the compiled graph for the whole batch."""
    pos = np.array([[0.0, 0, 0], [1.0, -2e6, 1.0]])
    check_invalid(([1, 1], pos, CUBE), 3, "atom 1 lies 2e+06 Å from the origin", "beyond 1e+06 Å")
    validate(*to_arrays(([1], [[1e6, -1e6, 0.0]], CUBE)))  # the limit itself is accepted


def test_close_atoms_names_the_closest_pair_through_the_boundary():
    pos = np.array([[0.1, 2.0, 2.0], [4.8, 2.0, 2.0], [2.5, 0.5, 0.5], [2.5, 0.5, 0.9]])
    i, j, distance = close_atoms(pos, CUBE)
    assert (i, j) == (0, 1) and abs(distance - 0.3) < 1e-12
    assert close_atoms(pos[1:3], CUBE) is None
    assert close_atoms(pos[2:], CUBE)[:2] == (0, 1)  # 0.4 Å apart
    assert close_atoms(pos, CUBE, threshold=0.2) is None


@pytest.mark.parametrize("n", [4, 300])  # all pairs measured / the binned search
def test_validate_returns_the_close_pair_it_found_with_the_overlap_check(n):
    """validate's one search answers both the hard limit (0.1 Å) and close_atoms (0.5 Å)."""
    rng = np.random.default_rng(n)
    cell = np.array([[9.0, 0.0, 0.0], [2.0, 8.0, 0.0], [1.0, -1.5, 7.0]])
    grid = np.stack(np.meshgrid(*[np.arange(7)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid[rng.permutation(len(grid))[:n]] + 0.5) / 7  # > 1 Å apart
    pos = frac @ cell
    z = np.ones(n, dtype=np.int64)
    assert validate(z, pos, cell) is None is close_atoms(pos, cell)
    # A pair 0.3 Å apart through the cell boundary: named by both, accepted.
    pos[0] = 0.01 * cell[0]  # the grid's sites are at (k + 0.5) / 7: the origin is far from all
    pos[1] = pos[0] - 0.3 * cell[0] / np.linalg.norm(cell[0]) + cell[0]
    pair = validate(z, pos, cell)
    assert pair == close_atoms(pos, cell) and pair[:2] == (0, 1) and abs(pair[2] - 0.3) < 1e-9
    # A second pair 0.08 Å apart: the overlap is refused, naming that pair.
    pos[n - 1] = pos[n - 2] + [0.0, 0.08, 0.0]
    with pytest.raises(InvalidStructureError, match=rf"atoms {n - 2} and {n - 1} overlap: 0.08 Å apart"):
        validate(z, pos, cell)
