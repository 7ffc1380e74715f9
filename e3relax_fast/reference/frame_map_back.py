"""A prediction made in the canonical frame, taken back to the user's description (reference twin
of the C++ op).

:func:`frame_map_back` is :func:`symmetrize` (optional), then :func:`align_fractional_centroid`,
then :func:`to_user`; each is also used on its own (:class:`e3relax_fast.frame.CanonicalFrame`).
NumPy, float64, written for clarity; ``csrc/frame_cpu.h`` does the same in C++ (backend ``cpu``).
Units: Å; cells are ``(3, 3)`` rows; fractional coordinates are rows ``x`` with ``r = x @ cell``.
The frame's arrays are those of :func:`~e3relax_fast.reference.frame_bookkeeping.frame_bookkeeping`.
"""

from __future__ import annotations

import numpy as np


def frame_map_back(positions, cell, frame_positions, frame_cell, rotations, permutations, choice_linear, choice_shift,
                   choice_images, atom_map, images, offset, user_cell, rotation, symmetrize: bool):
    """A prediction for the canonical cell in the user's description.

    Args:
        positions, cell: ``(m, 3)``, ``(3, 3)`` float64 the prediction (Å, canonical cell, standard
            orientation).
        frame_positions, frame_cell: ``(m, 3)``, ``(3, 3)`` the canonical input (Å).
        rotations: ``(k, 3, 3)`` int64, the group's rotations on canonical fractions (column action);
            permutations: ``(k, m)`` int64, operation ``g`` moves atom ``j`` onto ``permutations[g, j]``.
        choice_linear, choice_shift, choice_images, atom_map, images, offset, user_cell: the frame's
            link to the user's description (:class:`~e3relax_fast.frame.CanonicalFrame`).
        rotation: ``(3, 3)`` the standard orientation, ``r_std = r_user @ rotation.T``.
        symmetrize: project the prediction onto the space group first.

    Returns:
        ``(positions (n, 3), cell (3, 3))`` float64 in the user's orientation, basis, supercell and atom
        order, each atom at the image nearest its input, the centroid translated as a relaxation does.
    """
    if symmetrize:
        positions, cell = symmetrize_prediction(positions, cell, frame_positions, frame_cell, rotations, permutations)
    positions = align_fractional_centroid(positions, cell, frame_positions, frame_cell)
    return to_user(positions, cell, frame_cell, choice_linear, choice_shift, choice_images, atom_map, images, offset,
                   user_cell, rotation)


def symmetrize_prediction(positions, cell, frame_positions, frame_cell, rotations, permutations):
    """Project a prediction for the canonical cell onto the input's space group.

    The prediction is split into a homogeneous deformation ``F`` of the input cell
    (``cell = frame_cell @ F``) and per-atom displacements ``u`` on top of it; ``F`` and ``u`` are
    each averaged over the group's operations (in Cartesian form ``Q``: ``F -> mean Q^-1 F Q``,
    ``u[perm[j]] <- mean u[j] Q``), as ASE's ``FixSymmetry`` does for a relaxation step. Returns
    ``(positions (m, 3), cell (3, 3))``; the result has every symmetry of the input.
    """
    frame_inverse = np.linalg.inv(frame_cell)
    deformation = frame_inverse @ cell  # cell = frame_cell @ F
    displacement = positions - frame_positions @ deformation
    # Images: the prediction may have moved an atom across the cell; measure displacements from
    # the atom's own input position, not another image of it.
    frac_u = displacement @ np.linalg.inv(cell)
    displacement = (frac_u - np.round(frac_u)) @ cell
    # Each operation as a Cartesian row action r -> r Q; Q^-1 = Q^T, the operations being isometries
    # of the (refined) canonical cell.
    q_ops = frame_inverse @ np.swapaxes(rotations, 1, 2) @ frame_cell
    f_sym = np.mean(np.swapaxes(q_ops, 1, 2) @ deformation @ q_ops, axis=0)
    # u_sym[perm[g, j]] = mean_g u[j] Q_g, gathered: atom i receives from atom sources[g, i].
    sources = np.argsort(permutations, axis=1)
    u_sym = np.take_along_axis(displacement @ q_ops, sources[..., None], axis=1).mean(axis=0)
    return frame_positions @ f_sym + u_sym, frame_cell @ f_sym


def align_fractional_centroid(positions: np.ndarray, cell: np.ndarray, reference: np.ndarray,
                              reference_cell: np.ndarray) -> np.ndarray:
    """``(n, 3)`` positions translated so that their centroid, in fractions of ``cell``, equals the
    centroid of ``reference`` in fractions of ``reference_cell`` (Å, rows): the translation a
    relaxation gives (forces sum to zero, so atoms move with the cell about the origin) and which a
    translation-equivariant model cannot know."""
    target = np.linalg.solve(reference_cell.T, reference.mean(axis=0)) @ cell
    return positions + (target - positions.mean(axis=0))


def to_user(positions, cell, frame_cell, choice_linear, choice_shift, choice_images, atom_map, images, offset,
            user_cell, rotation):
    """A structure of the canonical cell (``positions (m, 3)``, ``cell (3, 3)``, Å, standard orientation)
    in the user's description: ``(positions (n, 3), cell (3, 3))``, each atom at the image nearest its
    input."""
    # The map between the descriptions is affine in fractional coordinates: canonical fractions
    # x_c = P x + shift + choice image, moyopy's x, and each user atom x[atom_map] + images +
    # offset (fractions of moyopy's cell). Read through it, a homogeneous deformation of the
    # canonical cell is the same deformation of the user's cell about the user's own origin, as
    # in a relaxation (fractional coordinates kept). The cell follows the isometry P of the
    # lattice: in moyopy's basis it is P^T cell Q^T, Q = B^-1 P^T B the rotation P amounts to.
    frame_inverse = np.linalg.inv(frame_cell)
    linear_inverse = np.rint(np.linalg.inv(choice_linear))  # exact: a unimodular integer matrix
    std_rotation = frame_inverse @ choice_linear.T @ frame_cell
    frac = (positions @ np.linalg.inv(cell) - choice_shift - choice_images) @ linear_inverse.T
    std_cell = choice_linear.T @ cell @ std_rotation.T
    user_positions = (frac[atom_map] + images + offset @ frame_inverse) @ std_cell
    return user_positions @ rotation, (user_cell @ std_cell) @ rotation
