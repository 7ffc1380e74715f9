"""Crystals for the tests of the canonical frame's two ops (test_frame_bookkeeping.py,
test_frame_map_back.py): examples/, textbook crystals, polar groups with one, two and three free
origin directions, the test split's inputs, and each of them rewritten (another basis, a supercell,
atoms moved by lattice vectors, a rotation and a translation), as ``name -> (Z, positions, cell)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import random_rotation, random_unimodular

ROOT = Path(__file__).resolve().parents[2]


def _supercell(z, pos, cell, matrix):
    """The crystal in the cell ``matrix @ cell`` (``|det matrix|`` copies of every atom)."""
    new_cell = matrix @ cell
    det = round(abs(np.linalg.det(matrix)))
    # Lattice points of the old cell inside the new one: search a box wide enough for |entries| <= 2.
    grid = np.array(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij")).reshape(3, -1).T
    frac = grid @ cell @ np.linalg.inv(new_cell)
    inside = np.all((frac >= -1e-9) & (frac < 1 - 1e-9), axis=1)
    points = grid[inside] @ cell
    assert len(points) == det, (len(points), det)
    positions = (pos[None, :, :] + points[:, None, :]).reshape(-1, 3)
    return np.tile(z, det), positions, new_cell


def _pm_crystal():
    """A monoclinic Pm crystal (group 6): two polar (free origin) directions, in the mirror plane."""
    a, b, c, beta = 5.1, 3.9, 6.3, np.radians(101.0)
    cell = np.array([[a, 0, 0], [0, b, 0], [c * np.cos(beta), 0, c * np.sin(beta)]])
    frac = np.array([[0.1, 0.0, 0.2], [0.33, 0.5, 0.71], [0.62, 0.21, 0.43], [0.62, -0.21, 0.43]])
    return np.array([8, 12, 1, 1]), frac @ cell, cell


def crystals(max_test_pairs: int = 40) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The corpus (see the module docstring); deterministic."""
    from ase.build import bulk
    from ase.io import read

    from e3relax_fast.io import read_pairs

    found = {}
    for path in sorted((ROOT / "examples").glob("*.cif")):
        atoms = read(path)
        found[path.name] = (atoms.numbers, atoms.positions, atoms.cell.array)
    for name, atoms in {"GaAs zincblende conventional": bulk("GaAs", "zincblende", a=5.65, cubic=True),
                        "ZnO wurtzite (polar, 1 direction)": bulk("ZnO", "wurtzite", a=3.25, c=5.2),
                        "Cu fcc": bulk("Cu", "fcc", a=3.61), "Fe bcc": bulk("Fe", "bcc", a=2.87)}.items():
        found[name] = (atoms.numbers, atoms.positions, atoms.cell.array)
    found["Pm (polar, 2 directions)"] = _pm_crystal()
    edge = read(ROOT / "tests" / "data" / "frame_tolerance_edge.extxyz")
    found["symprec edge"] = (edge.numbers, edge.positions, edge.cell.array)
    for pair in read_pairs(ROOT / "data" / "chgnet_v3", "test")[:max_test_pairs]:
        found[f"test {pair.id}"] = (pair.atomic_numbers, pair.pos_unrelaxed, pair.cell_unrelaxed)
    rng = np.random.default_rng(7)
    rewritten = {}
    for name, (z, pos, cell) in found.items():
        z2, pos2, cell2 = _supercell(z, pos, cell, random_unimodular(rng) @ np.diag([1, 1, 2]))
        pos2 = pos2 + rng.integers(-2, 3, pos2.shape) @ cell2 + rng.normal(0.0, 2.0, 3)
        rotation = random_rotation(rng)
        rewritten[f"{name}, rewritten"] = (z2, pos2 @ rotation.T, cell2 @ rotation.T)
    return found | rewritten
