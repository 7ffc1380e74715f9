"""Whether a crystal certainly has no pure translation and no inversion (reference twin of the C++ op).

Most crystals a screening run meets (strained, rattled, substituted) are P1 on a lattice with no
isometry but ±1. For them moyopy's symmetry search finds the identity alone, at ~60 µs a crystal
(most of the canonical frame's cost). :func:`frame_p1_certificate` proves the same in a few
microseconds, with a margin, so the frame can take the P1 answer without the search: once the
lattice is known to have no isometry but ±1, the only operations left are pure translations
(``x -> x + t``: the cell is a supercell) and inversions (``x -> -x + t``).

A symmetry operation found within ``symprec`` maps the first atom of the rarest species onto some
atom ``j`` of its species, so its ``t`` lies within ``symprec`` of a candidate built from that pair
(``x_j - x_0`` for a translation, ``x_j + x_0`` for an inversion), and under the candidate every atom
lands within ``2 symprec`` of a partner. Each candidate that leaves one atom with no same-species
partner within ``tolerance`` (≥ 2 symprec) therefore rules out every operation near it; when all are
ruled out, no search at ``symprec`` finds one.

NumPy, float64, written for clarity; ``csrc/frame_cpu.h`` does the same in C++ (backend ``cpu``).
Units: Å; ``basis`` rows are the lattice vectors; fractional coordinates are rows ``x`` with
Cartesian ``r = x @ basis``.
"""

from __future__ import annotations

import numpy as np


def frame_p1_certificate(numbers, x, basis, tolerance) -> bool:
    """True when no pure translation (other than the lattice's) and no inversion maps the crystal
    onto itself with every atom within ``tolerance`` of a same-species atom; False otherwise (then
    some candidate does, within ``tolerance``: the crystal may have one of them at a smaller one).

    Args:
        numbers: ``(n,)`` int64 Z.  x: ``(n, 3)`` float64 fractional coordinates in ``basis``.
        basis: ``(3, 3)`` float64 a reduced basis (Å, rows): the nearest image of a difference of
            fractions is its rounding, for the short distances compared here.
        tolerance: Å.
    """
    numbers = np.asarray(numbers)
    x = np.asarray(x, dtype=np.float64)
    species, counts = np.unique(numbers, return_counts=True)
    rare = np.flatnonzero(numbers == species[np.argmin(counts)])  # the fewest atoms; ties: smallest Z
    candidates = [(1.0, x[j] - x[rare[0]]) for j in rare[1:]] + [(-1.0, x[j] + x[rare[0]]) for j in rare]
    same = numbers[:, None] == numbers[None, :]
    for sign, t in candidates:
        moved = sign * x + t
        diff = moved[:, None, :] - x[None, :, :]
        diff -= np.round(diff)
        distance = np.linalg.norm(diff @ basis, axis=-1)
        nearest = np.where(same, distance, np.inf).min(axis=1)
        if (nearest <= tolerance).all():
            return False
    return True
