"""The canonical frame's bookkeeping after the symmetry search (reference twin of the C++ op).

Given what moyopy found for one crystal (its primitive standard cell, the space group's
operations, the Euclidean normalizer), :func:`frame_bookkeeping` makes the frame's choices and
links it to the user's description (:mod:`e3relax_fast.frame` explains the frame):

1. **One description among the equivalent ones**: each normalizer element (and, for polar groups,
   each atom of the rarest species pinned at zero along the polar directions) gives a candidate;
   the candidate whose table of (Z, fractional coordinates wrapped into [0, 1) and rounded to
   1e-5) sorted lexicographically is smallest wins; the atoms are then put in table order.
2. **The permutation** each space-group operation makes of the atoms (same species, within symprec).
3. **The user's description**: the user's cell as an integer matrix times the canonical cell, and
   each user atom as a canonical atom plus an integer lattice translation.

NumPy, float64, written for clarity; ``csrc/frame_cpu.h`` does the same in C++ (backend ``cpu``).
Units: Å; cells are rows; fractional coordinates are rows ``x`` with Cartesian ``r = x @ cell``.
"""

from __future__ import annotations

import numpy as np

#: Fractional coordinates within this of 1 wrap to 0: half the ranking resolution, so that a
#: coordinate the ranking reads as 0 is also wrapped to 0 (TABLE_DECIMALS = 5).
WRAP_EPS = 0.5 * 10.0**-5
#: Resolution of the fractional coordinates that rank equivalent descriptions.
TABLE_DECIMALS = 5


class FrameError(ValueError):
    """The crystal's canonical frame cannot be built (the reason says why)."""


def frame_bookkeeping(basis, numbers, x_std, normalizer_linear, normalizer_shift, polar, rotations, translations,
                      moving, mapping, rotation, lattice, positions, symprec):
    """The frame's choices and its link to the user's description, for one crystal.

    Args:
        basis: ``(3, 3)`` float64 moyopy's primitive standard cell (Å, rows).
        numbers: ``(m,)`` int64 Z of its atoms.  x_std: ``(m, 3)`` float64 their standard fractions.
        normalizer_linear, normalizer_shift: ``(c, 3, 3)`` float64 (integer-valued) and ``(c, 3)``
            float64: the group's Euclidean normalizer as affine maps ``x -> P x + s`` of the fractions.
        polar: ``(d, 3)`` float64 fractional directions every rotation leaves fixed (``d = 0``: none).
        rotations, translations: ``(k, 3, 3)`` int64 and ``(k, 3)`` float64 the group's operations on
            the standard fractions (column action ``x' = R x + t``); moving: ``(k,)`` bool, False for
            the identity.
        mapping: ``(n,)`` int64 the standard atom of each user atom (moyopy's ``mapping_std_prim``).
        rotation: ``(3, 3)`` float64 the standard orientation, ``r_std = r_user @ rotation.T``.
        lattice, positions: ``(3, 3)`` and ``(n, 3)`` float64, the user's cell and atoms (Å).
        symprec: tolerance in Å of the consistency checks.

    Returns:
        ``(numbers (m,), positions (m, 3), linear (3, 3), shift (3,), choice_images (m, 3),
        permutations (k, m), user_cell (3, 3), atom_map (n,), images (n, 3), offset (3,))``: the
        canonical atoms in table order (Z, Cartesian Å in ``basis``); the chosen description,
        canonical fractions ``linear @ x[j] + shift + choice_images[j]`` (int64 but ``shift``);
        operation ``g`` moves atom ``j`` onto atom ``permutations[g, j]``; the user's cell is
        ``user_cell @ basis`` and user atom ``i`` is ``(x[atom_map[i]] + images[i]) @ basis + offset``
        in the standard orientation, ``x`` the standard fractions in table order. Integers int64.

    Raises:
        FrameError: the operations do not map the refined cell onto itself, or the user's cell or
            atoms do not map onto the primitive cell, within the tolerance.
    """
    basis_inverse = np.linalg.inv(basis)
    linear, shifts = _choose_description(basis, basis_inverse, x_std, numbers, normalizer_linear, normalizer_shift,
                                         polar)
    frac = x_std @ linear.T + shifts
    # The atoms in table order too: the graph's top-K cut breaks exact distance ties by atom index,
    # so the same crystal must also come with the same atom order.
    order = np.argsort(table_keys(frac[None], numbers, sort=False)[0], kind="stable")
    numbers, frac, shifts, x_std = numbers[order], frac[order], shifts[order], x_std[order]
    # Every atom's shift is the same translation up to its image (an integer vector).
    choice_images = np.rint(shifts - shifts[0]).astype(np.int64)
    atom_map = np.argsort(order)[mapping]
    # The group is the same for the chosen description (a normalizer element maps it onto itself);
    # only the permutations of the atoms are recomputed.
    permutations = _permutations(rotations, translations, moving, frac, numbers, basis, symprec)
    user_cell, images, offset = _user_bookkeeping(lattice, positions, rotation, basis, basis_inverse, x_std,
                                                  atom_map, symprec)
    return (numbers, frac @ basis, linear, shifts[0], choice_images, permutations, user_cell, atom_map, images,
            offset)


def wrap(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(wrapped, shift)``: ``frac - shift`` in [0, 1) with values within WRAP_EPS of 1 sent to 0."""
    shift = np.floor(frac + WRAP_EPS)
    return frac - shift, shift


def table_keys(frac: np.ndarray, numbers: np.ndarray, sort: bool = True) -> np.ndarray:
    """``(c, m)`` int64 keys of ``c`` candidate descriptions ``frac (c, m, 3)`` (wrapped), sorted per
    candidate unless ``sort`` is false: Z and the fractional coordinates rounded to TABLE_DECIMALS,
    packed into one integer per atom."""
    scale = 10**TABLE_DECIMALS
    q = np.rint(frac * scale).astype(np.int64) % scale  # a coordinate that rounds to 1 is 0
    keys = ((numbers[None, :] * scale + q[..., 0]) * scale + q[..., 1]) * scale + q[..., 2]
    return np.sort(keys, axis=1) if sort else keys


def _choose_description(basis, basis_inverse, frac, numbers, linears, shifts, polar):
    """The smallest-table description among the equivalent ones: ``(P (3, 3) int64, shifts (m, 3))``
    with canonical fractions ``P @ x[k] + shifts[k]`` (wrapped) for the standard fractions ``x``."""
    moved = frac @ np.swapaxes(linears, 1, 2) + shifts[:, None, :]  # (c, m, 3)
    if len(polar):
        # Pin the continuous origin: each atom of the rarest species in turn at zero along the polar
        # directions (orthogonal projection in Cartesian space, as a map of fractions).
        counts = np.bincount(numbers).astype(np.float64)
        counts[counts == 0] = np.inf
        rarest = len(counts) - 1 - np.argmin(counts[::-1])  # ties: the heaviest species
        atoms = np.flatnonzero(numbers == rarest)
        pinned = moved[:, atoms, :]  # (c, a, 3); all directions free (P1): the projector is the identity
        if len(polar) < 3:
            rows = polar @ basis
            projector = rows.T @ np.linalg.solve(rows @ rows.T, rows)  # orthogonal, onto the polar span
            pinned = pinned @ (basis @ projector @ basis_inverse)
        moved = (moved[:, None, :, :] - pinned[:, :, None, :]).reshape(-1, *frac.shape)
        linears = np.repeat(linears, len(atoms), axis=0)
    wrapped, _ = wrap(moved)
    keys = table_keys(wrapped, numbers)
    best = np.lexsort(keys.T[::-1])[0]  # the lexicographically smallest table; ties: the first
    return np.rint(linears[best]).astype(np.int64), wrapped[best] - frac @ linears[best].T


def _permutations(rotations, translations, moving, frac, numbers, basis, symprec) -> np.ndarray:
    """``(k, m)``: operation g moves atom j onto atom ``perm[g, j]`` (same species, within symprec)."""
    perm = np.tile(np.arange(len(frac)), (len(rotations), 1))
    if not moving.any():
        return perm
    moved = frac @ np.swapaxes(rotations[moving], 1, 2).astype(np.float64) + translations[moving, None, :]
    diff = moved[:, :, None, :] - frac[None, None, :, :]  # (k', m, m, 3)
    diff -= np.round(diff)
    dist = np.linalg.norm(diff @ basis, axis=-1)
    dist[:, numbers[:, None] != numbers[None, :]] = np.inf
    found = np.argmin(dist, axis=2)
    worst = np.take_along_axis(dist, found[..., None], axis=2).max() if dist.size else 0.0
    # A permutation: sorted, each row is 0 .. m-1.
    if not worst <= 4 * symprec or (np.sort(found, axis=1) != perm[:1]).any():
        raise FrameError(f"the symmetry operations do not map the refined cell onto itself (off by {worst:.2g} Å)")
    perm[moving] = found
    return perm


def _user_bookkeeping(lattice, pos, rotation, basis, basis_inverse, x_std, atom_map, symprec):
    """``(T, images, offset)`` linking the user's description to the standard one."""
    rotated_cell = lattice @ rotation.T
    t_float = rotated_cell @ basis_inverse
    user_cell = np.rint(t_float).astype(np.int64)
    if np.abs(t_float - user_cell).max() > 1e-3 or round(abs(np.linalg.det(user_cell))) * len(x_std) != len(pos):
        raise FrameError("the input cell is not an integer combination of the primitive cell found")
    rotated = pos @ rotation.T
    reference = rotated[0] - x_std[atom_map[0]] @ basis
    images = np.rint((rotated - reference) @ basis_inverse - x_std[atom_map]).astype(np.int64)
    residual = rotated - (x_std[atom_map] + images) @ basis
    offset = residual.mean(axis=0)
    if np.abs(residual - offset).max() > 4 * symprec:
        raise FrameError("the input atoms do not map onto the refined primitive cell within symprec")
    return user_cell, images, offset
