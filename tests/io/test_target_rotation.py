"""The relaxed structure's orientation (io.pairs.relaxed_rotation / without_relaxed_rotation, and
read_pairs' target_rotation): a pair's relaxed structure is turned back into its unrelaxed one's
orientation, rigidly, so the deformation between them is the symmetric one."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import denoising_pairs
from scipy.spatial.transform import Rotation

from e3relax_fast.io import Pair, read_pairs, write_extxyz_pairs
from e3relax_fast.io.pairs import relaxed_rotation, without_relaxed_rotation

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _pair(cell_u: np.ndarray, stretch: np.ndarray, rotation: np.ndarray, seed: int = 0) -> Pair:
    """A pair whose relaxed cell is ``cell_u @ stretch @ rotation`` (``F = P R``, rows multiplied by
    ``R`` on the right, as relaxed_rotation states it), with the atoms' fractions moved a little."""
    rng = np.random.default_rng(seed)
    frac_u = rng.uniform(0, 1, (4, 3))
    frac_r = frac_u + rng.normal(0, 0.02, frac_u.shape)
    cell_r = cell_u @ stretch @ rotation
    return Pair("turned", np.array([8, 12, 12, 8]), frac_u @ cell_u, cell_u, frac_r @ cell_r, cell_r)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), degrees=st.floats(0.0, 60.0))
def test_rotation_recovered_and_removed(seed, degrees):
    """Any proper cell, any symmetric positive stretch, any rotation: relaxed_rotation finds the
    rotation, and without_relaxed_rotation gives the cell ``C_u P`` with the same fractions."""
    rng = np.random.default_rng(seed)
    cell_u = rng.uniform(3, 8) * (np.eye(3) + rng.uniform(-0.3, 0.3, (3, 3)))
    if np.linalg.det(cell_u) < 0:
        cell_u[[0, 1]] = cell_u[[1, 0]]
    half = rng.uniform(-0.15, 0.15, (3, 3))
    stretch = np.eye(3) + half + half.T
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(np.radians(degrees) * axis / np.linalg.norm(axis)).as_matrix()
    pair = _pair(cell_u, stretch, rotation, seed)
    np.testing.assert_allclose(relaxed_rotation(pair), rotation, atol=1e-10)
    fixed = without_relaxed_rotation(pair)
    np.testing.assert_allclose(fixed.cell_relaxed, cell_u @ stretch, atol=1e-9)
    np.testing.assert_allclose(np.linalg.solve(fixed.cell_relaxed.T, fixed.pos_relaxed.T),
                               np.linalg.solve(pair.cell_relaxed.T, pair.pos_relaxed.T), atol=1e-10)
    for field in ("atomic_numbers", "pos_unrelaxed", "cell_unrelaxed"):
        np.testing.assert_array_equal(getattr(fixed, field), getattr(pair, field))
    np.testing.assert_allclose(relaxed_rotation(fixed), np.eye(3), atol=1e-10)


def test_an_unturned_pair_is_left_bit_for_bit():
    """An already-relaxed input (input = target) keeps a Dummy error of exactly zero: the SVD's
    rounding is not applied."""
    cell = np.array([[4.0, 0.0, 0.0], [0.4, 4.5, 0.0], [0.3, -0.2, 5.0]])
    pair = _pair(cell, np.eye(3), np.eye(3))
    pair.pos_relaxed, pair.cell_relaxed = pair.pos_unrelaxed.copy(), pair.cell_unrelaxed.copy()
    assert without_relaxed_rotation(pair) is pair


def test_opposite_handedness_is_named():
    cell_u = np.diag([4.0, 5.0, 6.0])
    pair = _pair(cell_u, np.diag([1.0, 1.0, -1.0]), np.eye(3))
    with pytest.raises(ValueError, match="pair turned: .*opposite handedness"):
        relaxed_rotation(pair)
    singular = _pair(np.diag([4.0, 5.0, 0.0]), np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="pair turned: unrelaxed cell is singular"):
        relaxed_rotation(singular)


def test_cif_pairs_come_back_unturned(tmp_path):
    """A CIF keeps no orientation: written with a sheared relaxed cell, the pair reads back turned
    (``keep``) unless the rotation is removed (the default), which recovers the written cell's
    symmetric deformation of the unrelaxed one up to the rotation both CIFs share."""
    from ase import Atoms
    from ase.io import write

    cell_u = np.array([[4.0, 0.0, 0.0], [0.4, 4.5, 0.0], [0.3, -0.2, 5.0]])
    stretch = np.array([[1.10, 0.06, 0.00], [0.06, 0.95, 0.03], [0.00, 0.03, 1.02]])
    pair = _pair(cell_u, stretch, np.eye(3))
    (tmp_path / "CIF").mkdir()
    for tag, pos, cell in (("unrelaxed", pair.pos_unrelaxed, pair.cell_unrelaxed),
                           ("relaxed", pair.pos_relaxed, pair.cell_relaxed)):
        write(tmp_path / "CIF" / f"p_{tag}.cif", Atoms(numbers=pair.atomic_numbers, positions=pos, cell=cell, pbc=True))
    (tmp_path / "train.csv").write_text("atoms_id\np\n")
    kept, = read_pairs(tmp_path, "train", target_rotation="keep")
    removed, = read_pairs(tmp_path, "train")
    turned = np.degrees(np.arccos((np.trace(relaxed_rotation(kept)) - 1) / 2))
    assert turned > 1.0, "the CIF convention turns this pair's relaxed cell"
    np.testing.assert_allclose(relaxed_rotation(removed), np.eye(3), atol=1e-6)
    deformation = np.linalg.solve(removed.cell_unrelaxed, removed.cell_relaxed)
    np.testing.assert_allclose(deformation, stretch, atol=1e-5)  # C_u is in the CIF orientation already


def test_read_pairs_option(tmp_path):
    """Both choices read an extxyz folder (the CIF test above reads a CIF folder); an unknown one is
    refused; pairs without a rotation are unchanged by its removal; the CLI offers the same choices."""
    from e3relax_fast import cli
    from e3relax_fast.io.pairs import TARGET_ROTATION

    assert cli.TARGET_ROTATION == TARGET_ROTATION
    pairs = denoising_pairs(3, 4)  # symmetric strains: no rotation
    write_extxyz_pairs(pairs, tmp_path, "train")
    for a, b in zip(read_pairs(tmp_path, "train", "keep"), read_pairs(tmp_path, "train"), strict=True):
        np.testing.assert_allclose(a.cell_relaxed, b.cell_relaxed, atol=1e-12)
        np.testing.assert_allclose(a.pos_relaxed, b.pos_relaxed, atol=1e-12)
    with pytest.raises(ValueError, match="target_rotation must be one of"):
        read_pairs(tmp_path, "train", "drop")
