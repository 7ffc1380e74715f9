"""The original implementation's graph quirk that the package's own rule does not reproduce (spec §3.2).

The original builds its graph with pymatgen's neighbour list at zero numerical tolerance. For many
centres that list holds the zero-offset self pair at a rounding distance (1e-17 to 2e-15 Å) instead
of dropping it; the pair sorts first, takes one of the 50 slots and is deleted afterwards, so the
centre keeps at most 49 real neighbours (the "49-slot effect"). Which centres are hit is
floating-point noise of pymatgen's arithmetic, so the only way to reproduce the original's graph is
to ask pymatgen, as the original does; :func:`~e3relax_fast.graph.build_graph` then takes the answer
as its ``reserved`` argument.
"""

from __future__ import annotations

import numpy as np

from .structures import to_pymatgen


def original_reserved_slots(atomic_numbers, positions, cell, radius: float) -> np.ndarray:
    """``(n,)`` int64, 1 where the original's graph loses a slot to the spurious self pair, else 0.

    Args:
        atomic_numbers: ``(n,)`` Z; positions ``(n, 3)`` Cartesian Å; cell ``(3, 3)`` Å, rows =
            lattice vectors (the structure as the model sees it, periodic in 3D as the original's).
        radius: the graph radius in Å (6 in the original).

    The call is the original's preprocessing call: pymatgen's
    ``Structure.get_neighbor_list(r=radius, numerical_tol=0, exclude_self=True)`` on the structure
    built from Cartesian positions (what ASE's pymatgen adaptor does).
    """
    structure = to_pymatgen(atomic_numbers, positions, cell)
    centres, neighbours, images, _ = structure.get_neighbor_list(r=radius, numerical_tol=0, exclude_self=True)
    reserved = np.zeros(len(structure), dtype=np.int64)
    if len(centres):
        spurious = (centres == neighbours) & ~np.asarray(images).reshape(-1, 3).any(axis=1)
        reserved[np.asarray(centres)[spurious]] = 1
    return reserved
