"""Same crystal, same answer: the canonical frame (e3relax_fast/frame.py) and relax_batch through it.

Every way of writing a crystal — another unimodular basis, atoms moved by lattice vectors, the
conventional cell, 2x1x1 and 2x2x2 supercells, a rotation, a translation — must give the same
predicted crystal (StructureMatcher, ltol = stol = 3e-3, angle_tol 0.1°; volume per atom within 0.1 %),
in float32 and float64; every symmetric input keeps its space group (symprec 1e-3); the original's
checkpoints (paper_compat) keep the raw behaviour.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moyopy")
ase = pytest.importorskip("ase")
pytest.importorskip("pymatgen")
spglib = pytest.importorskip("spglib")
from ase.build import bulk, make_supercell  # noqa: E402
from ase.io import read  # noqa: E402
from helpers import random_rotation, random_unimodular  # noqa: E402
from pymatgen.analysis.structure_matcher import StructureMatcher  # noqa: E402
from pymatgen.io.ase import AseAtomsAdaptor  # noqa: E402

from e3relax_fast import E3Relax, load_pretrained, relax_batch  # noqa: E402
from e3relax_fast.batch import Batch  # noqa: E402
from e3relax_fast.frame import canonical_frame  # noqa: E402
from e3relax_fast.io import read_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYMPREC = 1e-3


def space_group(atoms) -> int:
    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    return spglib.get_symmetry_dataset(cell, symprec=SYMPREC).number


def keeps_symmetry(before, after, tol: float = SYMPREC) -> bool:
    """Every symmetry operation of ``before`` (spglib, fractional, same basis and atom order) maps
    ``after`` onto itself within ``tol`` Å: its space group is kept (a supergroup is allowed, as a
    relaxation may reach a more symmetric structure)."""
    ops = spglib.get_symmetry((before.cell.array, before.get_scaled_positions(), before.numbers), symprec=tol)
    frac = after.get_scaled_positions(wrap=False)
    for rotation, translation in zip(ops["rotations"], ops["translations"], strict=True):
        moved = frac @ rotation.T + translation
        diff = moved[:, None, :] - frac[None, :, :]
        diff -= np.round(diff)
        dist = np.linalg.norm(diff @ after.cell.array, axis=-1)
        dist[after.numbers[:, None] != after.numbers[None, :]] = np.inf
        if dist.min(axis=1).max() > tol:
            return False
    return True


def conventional(atoms):
    import moyopy

    data = moyopy.MoyoDataset(moyopy.Cell(atoms.cell.array.tolist(), atoms.get_scaled_positions().tolist(),
                                          atoms.numbers.tolist()), symprec=SYMPREC)
    std = data.std_cell
    return ase.Atoms(numbers=std.numbers, scaled_positions=std.positions, cell=std.basis, pbc=True)


def rewritings(atoms, rng) -> dict:
    """The same crystal written in ten other ways."""
    out = {f"basis{k}": make_supercell(atoms, random_unimodular(rng)) for k in range(2)}
    shifted = atoms.copy()
    for i in range(len(shifted)):
        shifted.positions[i] += rng.integers(-2, 3, 3) @ shifted.cell.array
    out["lattice shifts"] = shifted
    out["conventional"] = conventional(atoms)
    out["2x1x1"] = make_supercell(atoms, np.diag([2, 1, 1]))
    out["2x2x2"] = make_supercell(atoms, np.diag([2, 2, 2]))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ random_rotation(rng).T, scale_atoms=True)
    out["rotation"] = rotated
    translated = atoms.copy()
    translated.positions += rng.normal(0.0, 2.0, 3)
    out["translation"] = translated
    both = make_supercell(atoms, random_unimodular(rng) @ np.diag([1, 1, 2]))
    both.positions += rng.normal(0.0, 2.0, 3)
    both.set_cell(both.cell.array @ random_rotation(rng).T, scale_atoms=True)
    out["basis + supercell + translation + rotation"] = both
    return out


def load_crystals() -> dict:
    """High- and low-symmetry crystals: examples/, textbook ones and the test split's inputs."""
    crystals = {path.name: read(path) for path in sorted((ROOT / "examples").glob("*.cif"))}
    crystals["GaAs zincblende"] = bulk("GaAs", "zincblende", a=5.65)
    crystals["ZnO wurtzite (polar)"] = bulk("ZnO", "wurtzite", a=3.25, c=5.2)
    crystals["Cu fcc"] = bulk("Cu", "fcc", a=3.61)
    crystals["Fe bcc"] = bulk("Fe", "bcc", a=2.87)
    pairs = read_pairs(ROOT / "data" / "chgnet_v3", "test")
    by_group: dict[int, list] = {}
    for pair in pairs:
        atoms = ase.Atoms(numbers=pair.atomic_numbers, positions=pair.pos_unrelaxed, cell=pair.cell_unrelaxed,
                          pbc=True)
        by_group.setdefault(space_group(atoms), []).append((pair.id, atoms))
    for group, members in sorted(by_group.items()):  # two of each space group, four of P1
        for pair_id, atoms in members[: 4 if group == 1 else 2]:
            crystals[f"test {pair_id} (sg {group})"] = atoms
    return crystals


CRYSTALS = load_crystals()


def test_there_are_twenty_crystals_of_high_and_low_symmetry():
    groups = [space_group(a) for a in CRYSTALS.values()]
    assert len(CRYSTALS) >= 20
    assert sum(g == 1 for g in groups) >= 4 and sum(g >= 195 for g in groups) >= 5  # triclinic and cubic


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_canonical_frame_round_trip_and_invariance(name):
    """Every rewriting maps to the same canonical cell (same atoms, same order), and the identity
    prediction maps back onto the input exactly."""
    atoms = CRYSTALS[name]
    ref = canonical_frame(atoms.numbers, atoms.positions, atoms.cell.array)
    for label, other in rewritings(atoms, np.random.default_rng(1)).items():
        frame = canonical_frame(other.numbers, other.positions, other.cell.array)
        np.testing.assert_allclose(frame.cell, ref.cell, atol=1e-6, err_msg=label)
        assert np.array_equal(frame.numbers, ref.numbers), label
        np.testing.assert_allclose(frame.positions, ref.positions, atol=1e-5, err_msg=label)
        positions, cell = frame.to_user(frame.positions, frame.cell)
        np.testing.assert_allclose(positions, other.positions, atol=2 * SYMPREC, err_msg=label)
        np.testing.assert_allclose(cell, other.cell.array, atol=2 * SYMPREC, err_msg=label)
        assert frame.atom_map.shape == (len(other),)


def test_symmetrize_projects_onto_the_space_group():
    atoms = bulk("GaAs", "zincblende", a=5.65, cubic=True)
    frame = canonical_frame(atoms.numbers, atoms.positions, atoms.cell.array)
    rng = np.random.default_rng(0)
    noisy_cell = frame.cell @ (np.eye(3) + rng.normal(0, 0.02, (3, 3)))
    noisy = frame.positions @ np.linalg.solve(frame.cell, noisy_cell) + rng.normal(0, 0.05, frame.positions.shape)
    positions, cell = frame.symmetrize(noisy, noisy_cell)
    out = ase.Atoms(numbers=frame.numbers, positions=positions, cell=cell, pbc=True)
    assert space_group(out) == 216
    assert space_group(ase.Atoms(numbers=frame.numbers, positions=noisy, cell=noisy_cell, pbc=True)) == 1
    # An already symmetric prediction is left as it is (a projection).
    again = frame.symmetrize(positions, cell)
    np.testing.assert_allclose(again[0], positions, atol=1e-12)
    np.testing.assert_allclose(again[1], cell, atol=1e-12)


MATCHER = StructureMatcher(ltol=3e-3, stol=3e-3, angle_tol=0.1, primitive_cell=True, scale=False)


@pytest.fixture(scope="module")
def model():
    return load_pretrained("default")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_crystal_same_answer(model, dtype):
    rng = np.random.default_rng(2)
    inputs, owners = [], []
    for name, atoms in CRYSTALS.items():
        for label, other in {"as given": atoms, **rewritings(atoms, rng)}.items():
            inputs.append(other)
            owners.append((name, label))
    out = relax_batch(inputs, model, dtype=dtype)
    reference = {}
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's warnings about oxidation states
        for (name, label), prediction in zip(owners, out, strict=True):
            structure = AseAtomsAdaptor.get_structure(prediction)
            volume = prediction.get_volume() / len(prediction)
            if label == "as given":
                reference[name] = (structure, volume)
                continue
            ref_structure, ref_volume = reference[name]
            if not MATCHER.fit(ref_structure, structure) or abs(volume / ref_volume - 1) > 1e-3:
                failures.append(f"{name}: {label}")
    assert not failures, failures


@pytest.mark.slow
def test_symmetric_inputs_keep_their_space_group(model):
    """Every symmetric structure of examples/ and of the test split keeps its symmetry operations."""
    inputs = [read(path) for path in sorted((ROOT / "examples").glob("*.cif"))]
    inputs += [ase.Atoms(numbers=p.atomic_numbers, positions=p.pos_unrelaxed, cell=p.cell_unrelaxed, pbc=True)
               for p in read_pairs(ROOT / "data" / "chgnet_v3", "test")]
    symmetric = [a for a in inputs if space_group(a) > 1]
    assert len(symmetric) >= 100
    out = relax_batch(symmetric, model)
    lost = [(k, space_group(a), space_group(o)) for k, (a, o) in enumerate(zip(symmetric, out, strict=True))
            if not keeps_symmetry(a, o)]
    assert not lost, lost
    free = relax_batch(symmetric, model, symmetry="free")  # what the projection repairs
    assert sum(not keeps_symmetry(a, o) for a, o in zip(symmetric, free, strict=True)) > 0


def test_paper_compat_keeps_the_raw_behaviour():
    """An original checkpoint's model sees the input as given: no frame, no projection."""
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=16, num_layers=2, paper_compat=True).double()
    atoms = make_supercell(bulk("Si"), np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]))
    atoms.positions += 0.3
    out = relax_batch([atoms], model)[0]
    batch = Batch.from_arrays([(atoms.numbers, atoms.positions, atoms.cell.array)])
    with torch.no_grad():
        direct = model(batch)
    np.testing.assert_allclose(out.positions, direct.positions[-1].numpy(), atol=1e-12)
    np.testing.assert_allclose(out.cell.array, direct.cells[-1][0].numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="symmetry='keep' needs frame='canonical'"):
        relax_batch([atoms], model, symmetry="keep")


def test_only_moyopys_expected_warnings_are_dropped():
    """The frame's filter on moyopy's logger drops its two expected warnings and nothing else."""
    import logging

    from e3relax_fast.frame import _MOYO_FILTER

    def record(message):
        return logging.LogRecord("moyo", logging.WARNING, __file__, 1, message, None, None)

    assert not _MOYO_FILTER.filter(record("Omitted 24 symmetry operations in the input-cell basis"))
    assert not _MOYO_FILTER.filter(record("Large displacement during symmetrization: [[0.0002, 0, 0]] for site 3"))
    assert _MOYO_FILTER.filter(record("Symmetry search failed"))


def test_moyopys_expected_warnings_do_not_reach_the_user():
    """Through canonical_frame, neither expected warning reaches a handler on the root logger: the
    "Omitted" one (a supercell whose primitive operations are not integer in its basis) and the
    displacement one (a CHGNet minimum whose atoms moyopy moves onto exact Wyckoff positions), which
    moyopy logs on a child logger that a filter on ``moyo`` alone does not see."""
    import logging

    pairs = read_pairs(ROOT / "data" / "chgnet_v13sym", "val")
    minimum = pairs[62]  # a 24-atom minimum that moyopy symmetrizes with a 1.6e-4 Å move
    wurtzite = read(ROOT / "examples" / "ZnO_wurtzite.cif").repeat((2, 1, 1))
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage()))

    handler = Catch(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        canonical_frame(minimum.atomic_numbers, minimum.pos_relaxed, minimum.cell_relaxed)
        canonical_frame(wurtzite.numbers, wurtzite.positions, wurtzite.cell.array)
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == []


def test_a_crystal_whose_search_fails_at_symprec_gets_a_smaller_one_and_never_sinks_the_batch():
    """A CHGNet minimum just outside a higher symmetry (tests/data/frame_tolerance_edge.extxyz, the
    relaxed structure of pair g000718 of chgnet_v13sym): moyopy's normalizer raises "Too large
    tolerance" at 1e-3 and at 5e-4 Å, which escaped as a plain ValueError and sank the whole
    relax_batch call. The frame retries at smaller tolerances and records the one it used; the batch
    goes on."""
    from e3relax_fast.frame import SYMPREC_RETRIES

    edge = read(ROOT / "tests" / "data" / "frame_tolerance_edge.extxyz")
    edge_triple = (edge.numbers, edge.positions, edge.cell.array)
    frame = canonical_frame(*edge_triple)
    assert frame.symprec < SYMPREC and frame.symprec >= SYMPREC / 2**SYMPREC_RETRIES
    nacl = bulk("NaCl", "rocksalt", a=5.64)
    nacl_triple = (nacl.numbers, nacl.positions, nacl.cell.array)
    assert canonical_frame(*nacl_triple).symprec == SYMPREC  # an ordinary crystal: the tolerance asked for
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    out = relax_batch([edge_triple, nacl_triple], model)
    assert all(structure is not None for structure in out)


SEEDS = Path(__file__).resolve().parents[1] / "data" / "seeds"


def test_the_normalizer_of_a_tetragonal_to_cubic_group_is_the_same_for_every_crystal_of_its_setting():
    """What caching it per setting rests on (ITA Vol. A §3.5.2: no specialized metrics from No. 75
    on), checked on the AFLOW-decorated and pyxtal seeds: 100+ settings, several crystals each."""
    import moyopy

    from e3relax_fast.frame import METRIC_FREE_NORMALIZERS_FROM, _crystal_normalizer

    found: dict[int, list] = {}
    for atoms in read(SEEDS / "aflow_decorated.extxyz", ":") + read(SEEDS / "pyxtal_random.extxyz", ":"):
        cell = moyopy.Cell(atoms.cell.array.tolist(), atoms.get_scaled_positions().tolist(), atoms.numbers.tolist())
        data = moyopy.MoyoDataset(cell, symprec=1e-3, rotate_basis=True)
        if data.number >= METRIC_FREE_NORMALIZERS_FROM:
            found.setdefault(data.hall_number, []).append(_crystal_normalizer(data))
    repeated = {hall: normalizers for hall, normalizers in found.items() if len(normalizers) > 1}
    assert len(found) > 60 and len(repeated) > 40
    for normalizers in repeated.values():
        for linear, shift in normalizers[1:]:
            np.testing.assert_array_equal(linear, normalizers[0][0])
            np.testing.assert_array_equal(shift, normalizers[0][1])


def test_a_cached_normalizer_gives_the_frame_a_fresh_one_gives():
    """The frame of a crystal does not depend on which crystal of its setting was seen first."""
    from e3relax_fast import frame

    nacl = read(Path(__file__).resolve().parents[1] / "examples" / "NaCl_rocksalt.cif")
    mgo = bulk("MgO", "rocksalt", a=4.21)  # Fm-3m like NaCl
    frames = []
    for first in (None, mgo):
        frame._SETTING_NORMALIZERS.clear()
        if first is not None:
            canonical_frame(first.numbers, first.positions, first.cell.array)
        frames.append(canonical_frame(nacl.numbers, nacl.positions, nacl.cell.array))
    assert frames[0].spacegroup == 225 and len(frame._SETTING_NORMALIZERS) == 1
    for name, value in vars(frames[0]).items():
        np.testing.assert_array_equal(value, getattr(frames[1], name), err_msg=name)


def _triclinic_cases():
    """P1 and P-1 crystals as a screening run meets them: the test split's inputs, strained (up to
    3 %) and rattled (0.02 Å) like the MP-like mix, and rattled in their own, often symmetric, cell
    (a lattice with more isometries than +-1)."""
    rng = np.random.default_rng(3)
    cases = []
    for pair in read_pairs(ROOT / "data" / "chgnet_v13sym", "test")[:120]:
        frac = pair.pos_unrelaxed @ np.linalg.inv(pair.cell_unrelaxed)
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
        for cell in (pair.cell_unrelaxed @ (strain + strain.T) / 2, pair.cell_unrelaxed):
            cases.append((pair.atomic_numbers, frac @ cell + rng.normal(0.0, 0.02, frac.shape), cell))
    return cases


def test_a_triclinic_lattice_is_called_generic_only_where_moyopys_normalizer_is_the_generic_one():
    """The shortcut of frame._normalizer for P1 and P-1 (no call to moyopy's normalizer on a lattice
    with no isometry but +-1) answers what moyopy answers, and takes most of a screening mix."""
    import moyopy

    from e3relax_fast.frame import GENERIC_LATTICE_MARGIN, _crystal_normalizer, _generic_lattice

    generic = {1: (np.eye(3)[None], np.zeros((1, 3)))}
    taken = special = 0
    for z, positions, cell in _triclinic_cases():
        cell_ = moyopy.Cell(cell.tolist(), (positions @ np.linalg.inv(cell)).tolist(), z.tolist())
        data = moyopy.MoyoDataset(cell_, symprec=SYMPREC, rotate_basis=True)
        assert data.number in (1, 2)
        linear, shift = _crystal_normalizer(data)
        special += len(linear) > (1 if data.number == 1 else 8)
        if not _generic_lattice(data.prim_std_cell.basis, GENERIC_LATTICE_MARGIN * max(SYMPREC, data.symprec)):
            continue
        taken += 1
        expected = generic.setdefault(data.number, (linear, shift))
        np.testing.assert_array_equal(linear, expected[0])
        np.testing.assert_array_equal(shift, expected[1])
    assert taken >= 80 and special >= 40, (taken, special)


@pytest.mark.parametrize("cell", [
    np.eye(3) * 4.1,  # cubic
    np.array([[3.0, 0.0, 0.0], [-1.5, 3.0 * np.sqrt(3) / 2, 0.0], [0.0, 0.0, 5.2]]),  # hexagonal
    np.array([[3.1, 0.0, 0.0], [0.0, 4.3, 0.0], [1.2, 0.0, 5.5]]),  # monoclinic metric (b perpendicular)
    np.array([[3.1, 0.0, 0.0], [0.4, 4.3, 0.0], [0.7, 0.9, 3.1 * 1.7]]),  # generic...
], ids=["cubic", "hexagonal", "monoclinic", "generic"])
def test_a_lattice_with_isometries_beyond_inversion_is_never_called_generic(cell):
    """P1 crystals (rattled atoms) in lattices with more isometries take moyopy's normalizer; a
    lattice with none beyond +-1 takes the shortcut, and one within the margin of a tie does not."""
    import moyopy

    from e3relax_fast.frame import GENERIC_LATTICE_MARGIN, _generic_lattice

    rng = np.random.default_rng(0)
    frac = rng.random((6, 3))
    data = moyopy.MoyoDataset(moyopy.Cell(cell.tolist(), frac.tolist(), [8, 8, 14, 14, 26, 26]), symprec=SYMPREC)
    assert data.number == 1
    margin = GENERIC_LATTICE_MARGIN * SYMPREC
    basis = data.prim_std_cell.basis
    isometries = len(data.normalizer_wyckoff_positions(preserve_chirality=True, primitive=True).stabilizer)
    assert _generic_lattice(basis, margin) == (isometries == 1)
    assert _generic_lattice(basis, margin) == (cell[2, 2] == 3.1 * 1.7)
    if cell[2, 2] == 3.1 * 1.7:  # the same lattice with |c| moved to within the margin of |b| + |a| ...
        tie = np.array(basis)
        lengths = np.linalg.norm(tie, axis=1)
        tie[2] *= (lengths[1] + 0.5 * margin) / lengths[2]  # |c| within the margin of |b|
        assert not _generic_lattice(moyopy.minkowski_reduce(tie.tolist())[0], margin)


def test_the_generic_lattice_shortcut_leaves_every_frame_as_it_was(monkeypatch):
    """Frames built with the shortcut are, bit for bit, the frames built with moyopy's normalizer
    (both after moyopy's search: the certified P1 path is tested below)."""
    from e3relax_fast import frame

    monkeypatch.setattr(frame, "_certified_p1", lambda *args: None)
    cases = _triclinic_cases()[:60]
    fast = [canonical_frame(*case) for case in cases]
    monkeypatch.setattr(frame, "_generic_lattice", lambda basis, margin: False)
    for case, built in zip(cases, fast, strict=True):
        slow = canonical_frame(*case)
        for name, value in vars(slow).items():
            np.testing.assert_array_equal(value, getattr(built, name), err_msg=name)


def test_a_certified_p1_crystal_gets_the_frame_moyopys_search_gives(monkeypatch):
    """The P1 path (no symmetry search for a crystal proven P1) builds moyopy's frame: integers
    equal, floats to rounding; it takes most of a screening mix and never a crystal moyopy finds
    symmetric; rewritings of one crystal (another basis, images, a rotation) get one frame."""
    import moyopy

    from e3relax_fast import frame

    rng = np.random.default_rng(4)
    cases = _triclinic_cases()
    for z, pos, cell in _triclinic_cases()[:40]:  # the same crystals in another basis, atoms moved by lattice vectors
        other = random_unimodular(rng) @ cell
        rotation = random_rotation(rng)
        cases.append((z, (pos + rng.integers(-2, 3, pos.shape) @ cell) @ rotation.T, other @ rotation.T))
    fast = [canonical_frame(*case) for case in cases]
    certificate = frame._implementation("frame_p1_certificate", "auto")
    certified = [frame._certified_p1(moyopy, np.asarray(z, dtype=np.int64), pos @ np.linalg.inv(cell), pos, cell,
                                     SYMPREC, certificate) is not None for z, pos, cell in cases]
    monkeypatch.setattr(frame, "_certified_p1", lambda *args: None)
    for case, built, taken in zip(cases, fast, certified, strict=True):
        slow = canonical_frame(*case)
        assert not taken or slow.spacegroup == 1
        for name, value in vars(slow).items():
            if np.asarray(value).dtype.kind == "f":
                np.testing.assert_allclose(getattr(built, name), value, rtol=0, atol=1e-11, err_msg=name)
            else:
                np.testing.assert_array_equal(getattr(built, name), value, err_msg=name)
    assert sum(certified) >= 100, sum(certified)
    for original, rewritten in zip(fast[:40], fast[-40:], strict=True):
        np.testing.assert_allclose(rewritten.positions, original.positions, atol=1e-9)
        np.testing.assert_allclose(rewritten.cell, original.cell, atol=1e-9)
