"""The canonical frame: one description per crystal, whatever way the user wrote it.

The model is not invariant to how a crystal is written: its three lattice nodes have their own
weights (so the choice of basis matters), and the default mode centres positions per crystal (so the
periodic image chosen for each atom matters). :func:`canonical_frame` therefore maps every input to
one description of its crystal before the model sees it, and :meth:`CanonicalFrame.to_user` maps the
prediction back to the user's description:

1. **Symmetry and the standard primitive cell** (moyopy, ``symprec`` in Å): the primitive cell of
   the crystal (an exact supercell is reduced), in the standard setting of its space group, in the
   standard orientation; lattice and positions symmetrized (refined) within ``symprec``.
2. **One description among the equivalent ones.** A standard setting leaves choices: the origin
   among points of the same symmetry, the axes among equivalent ones (the space group's Euclidean
   normalizer, chirality-preserving part) and, for polar groups, a continuous origin along the
   polar directions. Each candidate is scored by its table of (Z, fractional coordinates wrapped
   into [0, 1), rounded to 1e-5) sorted lexicographically, and the smallest table wins: a choice
   made from the crystal alone. Polar origins are pinned by putting one atom of the rarest species
   (each in turn) at zero along the polar directions.
3. **Back to the user's description** with integer bookkeeping: the user's cell is ``T`` (an
   integer matrix, ``det T`` = primitive cells in the user's cell) times the canonical cell, each
   user atom is a canonical atom plus an integer lattice translation, chosen from the input, so
   every predicted atom is the image nearest its input position; the standard orientation is undone
   by the rotation moyopy reports. Everything in float64.

:meth:`CanonicalFrame.symmetrize` projects a prediction onto the input's space group (the
displacement field and the cell's deformation averaged over the group, as ASE's ``FixSymmetry``
does for a relaxation step): Wyckoff-fixed atoms stay put and a cubic cell stays cubic.

Units: Å; cells are ``(3, 3)`` with the lattice vectors as rows; fractional coordinates are rows
``x`` with Cartesian ``r = x @ cell``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

#: Default tolerance of the symmetry search, Å (spglib/moyopy ``symprec``).
SYMPREC = 1e-3
#: A crystal just outside a higher symmetry can make moyopy's search or its normalizer fail at one
#: tolerance ("Too large tolerance") and pass at a smaller one: the frame retries at symprec / 2,
#: / 4, ... this many times before it gives up on the crystal.
SYMPREC_RETRIES = 4
#: Fractional coordinates within this of 1 wrap to 0: half the ranking resolution, so that a
#: coordinate the ranking reads as 0 is also wrapped to 0 (TABLE_DECIMALS = 5).
WRAP_EPS = 0.5 * 10.0**-5
#: Resolution of the fractional coordinates that rank equivalent descriptions.
TABLE_DECIMALS = 5


class FrameError(ValueError):
    """The crystal's canonical frame cannot be built (the reason says why)."""


@dataclass
class CanonicalFrame:
    """One crystal in its canonical description, with what is needed to go back.

    Attributes:
        numbers: ``(m,)`` int64 Z of the canonical (primitive) cell's atoms.
        cell: ``(3, 3)`` float64 canonical cell in Å (rows), standard orientation.
        positions: ``(m, 3)`` float64 canonical Cartesian positions in Å, wrapped into the cell.
        spacegroup: ITA number found at :attr:`symprec`.
        rotations, translations: ``(k, 3, 3)`` int64 and ``(k, 3)`` float64, the space group's
            operations on canonical fractional coordinates (column action ``x' = R x + t``).
        permutations: ``(k, m)`` int64; operation ``g`` moves atom ``j`` onto atom ``permutations[g, j]``.
        user_cell: ``(3, 3)`` int64 ``T``: the user's cell is ``T @ cell`` (standard orientation).
        atom_map: ``(n,)`` int64 canonical atom of each user atom; images: ``(n, 3)`` int64 its lattice
            translation; offset: ``(3,)`` Cartesian translation, standard orientation: user atom i
            sits at ``(x[atom_map[i]] + images[i]) @ cell + offset``, ``x`` moyopy's standard
            fractions (below).
        rotation: ``(3, 3)`` orthogonal matrix of the standard orientation: ``r_std = r_user @ rotation.T``.
        choice_linear, choice_shift, choice_images: ``(3, 3)``, ``(3,)`` and ``(m, 3)`` int64: the chosen
            description among the equivalent ones, ``frac[k] = choice_linear @ x[k] + choice_shift +
            choice_images[k]`` with ``x`` moyopy's standard coordinates (the frame of ``atom_map``,
            ``images`` and ``offset``): an isometry of the lattice, a translation, and each atom's image.
        symprec: the tolerance (Å) the frame was built with: the one asked for, or a smaller one
            where the search failed at it (:data:`SYMPREC_RETRIES`).
    """

    numbers: np.ndarray
    cell: np.ndarray
    positions: np.ndarray
    spacegroup: int
    rotations: np.ndarray
    translations: np.ndarray
    permutations: np.ndarray
    user_cell: np.ndarray
    atom_map: np.ndarray
    images: np.ndarray
    offset: np.ndarray
    rotation: np.ndarray
    choice_linear: np.ndarray
    choice_shift: np.ndarray
    choice_images: np.ndarray
    symprec: float

    @property
    def frac(self) -> np.ndarray:
        """``(m, 3)`` canonical fractional coordinates."""
        return self.positions @ self._cell_inverse

    # The maps below are used once or twice per crystal; computed once (a screening run spends its
    # frame time in small NumPy calls, not in arithmetic).
    @functools.cached_property
    def _cell_inverse(self) -> np.ndarray:
        return np.linalg.inv(self.cell)

    @functools.cached_property
    def _linear_inverse(self) -> np.ndarray:
        """``choice_linear^-1``, exact: the inverse of a unimodular integer matrix (a lattice isometry)."""
        return np.rint(np.linalg.inv(self.choice_linear))

    @functools.cached_property
    def _std_rotation(self) -> np.ndarray:
        """``Q = B^-1 P^T B``: the rotation (row action) the lattice isometry ``choice_linear`` amounts to."""
        return self._cell_inverse @ self.choice_linear.T @ self.cell

    @functools.cached_property
    def _cartesian_operations(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Q (k, 3, 3), inverse permutations (k, m))``: each operation as a Cartesian row action
        ``r -> r Q``, and the atom each atom's image comes from."""
        q_ops = self._cell_inverse @ np.swapaxes(self.rotations, 1, 2) @ self.cell
        return q_ops, np.argsort(self.permutations, axis=1)

    def to_user(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A prediction for the canonical cell (``positions (m, 3)``, ``cell (3, 3)``, Å, standard
        orientation) in the user's description: ``(positions (n, 3), cell (3, 3))`` in the user's
        orientation, basis, supercell and atom order, each atom at the image nearest its input."""
        # The map between the descriptions is affine in fractional coordinates: canonical fractions
        # x_c = P x + shift + choice image, moyopy's x, and each user atom x[atom_map] + images +
        # offset (fractions of moyopy's cell). Read through it, a homogeneous deformation of the
        # canonical cell is the same deformation of the user's cell about the user's own origin, as
        # in a relaxation (fractional coordinates kept). The cell follows the isometry P of the
        # lattice: in moyopy's basis it is P^T cell Q^T, Q = B^-1 P^T B the rotation P amounts to.
        linear = self.choice_linear
        frac = (positions @ np.linalg.inv(cell) - self.choice_shift - self.choice_images) @ self._linear_inverse.T
        std_cell = linear.T @ cell @ self._std_rotation.T
        offset = self.offset @ self._cell_inverse
        user_positions = (frac[self.atom_map] + self.images + offset) @ std_cell
        return user_positions @ self.rotation, (self.user_cell @ std_cell) @ self.rotation

    def from_user(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of :meth:`to_user`: a structure in the user's description (``positions (n, 3)``
        in the user's atom order, each atom the image that corresponds to its input position, and
        ``cell (3, 3)``, Å) as ``(positions (m, 3), cell (3, 3))`` of the canonical cell. The images
        of one canonical atom in a supercell are averaged (a target that breaks the supercell's
        translations is projected onto them)."""
        linear = self.choice_linear
        std_cell = np.linalg.solve(self.user_cell.astype(np.float64), cell @ self.rotation.T)
        per_atom = (positions @ self.rotation.T) @ np.linalg.inv(std_cell) - self.images \
            - self.offset @ self._cell_inverse
        frac = np.zeros((len(self.numbers), 3))
        np.add.at(frac, self.atom_map, per_atom)
        frac /= np.bincount(self.atom_map, minlength=len(self.numbers))[:, None]
        canonical_cell = np.linalg.solve(linear.T, std_cell) @ self._std_rotation
        canonical = frac @ linear.T + self.choice_shift + self.choice_images
        return canonical @ canonical_cell, canonical_cell

    def align(self, positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """``positions`` translated so that their centroid has the canonical input's fractional
        coordinates in ``cell``: the translation a relaxation gives (forces sum to zero, so atoms
        move with the cell about the origin) and which a translation-equivariant model cannot know."""
        return align_fractional_centroid(positions, cell, self.positions, self.cell)

    def symmetrize(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project a prediction for the canonical cell onto the input's space group.

        The prediction is split into a homogeneous deformation ``F`` of the input cell
        (``cell = self.cell @ F``) and per-atom displacements ``u`` on top of it; ``F`` and ``u`` are
        each averaged over the group's operations (in Cartesian form ``Q``: ``F -> mean Q^-1 F Q``,
        ``u[perm[j]] <- mean u[j] Q``). Returns ``(positions (m, 3), cell (3, 3))``; the result has
        every symmetry of the input.
        """
        base = self.cell
        deformation = self._cell_inverse @ cell  # cell = base @ F
        displacement = positions - self.positions @ deformation
        # Images: the prediction may have moved an atom across the cell; measure displacements from
        # the atom's own input position, not another image of it.
        frac_u = displacement @ np.linalg.inv(cell)
        displacement = (frac_u - np.round(frac_u)) @ cell
        q_ops, sources = self._cartesian_operations
        # Q^-1 = Q^T: the operations are isometries of the (refined) canonical cell.
        f_sym = np.mean(np.swapaxes(q_ops, 1, 2) @ deformation @ q_ops, axis=0)
        # u_sym[perm[g, j]] = mean_g u[j] Q_g, gathered: atom i receives from atom sources[g, i].
        u_sym = np.take_along_axis(displacement @ q_ops, sources[..., None], axis=1).mean(axis=0)
        return self.positions @ f_sym + u_sym, base @ f_sym


def align_fractional_centroid(positions: np.ndarray, cell: np.ndarray, reference: np.ndarray,
                              reference_cell: np.ndarray) -> np.ndarray:
    """``(n, 3)`` positions translated so that their centroid, in fractions of ``cell``, equals the
    centroid of ``reference`` in fractions of ``reference_cell`` (Å, rows)."""
    target = np.linalg.solve(reference_cell.T, reference.mean(axis=0)) @ cell
    return positions + (target - positions.mean(axis=0))


def canonical_frame(atomic_numbers, positions, cell, symprec: float = SYMPREC) -> CanonicalFrame:
    """The canonical description of one crystal (see the module docstring).

    Args:
        atomic_numbers: ``(n,)`` Z.  positions: ``(n, 3)`` Cartesian Å.  cell: ``(3, 3)`` Å, rows.
        symprec: symmetry tolerance in Å; symmetry found within it is made exact.

    Raises:
        FrameError: the symmetry search fails, or its bookkeeping is inconsistent, at ``symprec`` and
            at each of the SYMPREC_RETRIES smaller tolerances.
    """
    import moyopy

    z = np.asarray(atomic_numbers, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    lattice = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    # A logger's filters only see the records logged to it, not those its children propagate: the
    # filter sits on each logger that emits one of the two messages.
    for name in _MOYO_LOGGERS:
        log = logging.getLogger(name)
        if _MOYO_FILTER not in log.filters:
            log.addFilter(_MOYO_FILTER)
    for attempt in range(SYMPREC_RETRIES + 1):
        try:
            return _canonical_frame(moyopy, z, pos, lattice, symprec / 2**attempt)
        except FrameError as err:
            failure = err
    raise FrameError(f"{failure} (tried symprec {symprec:.3g} Å down to {symprec / 2**SYMPREC_RETRIES:.3g} Å)")


class _ExpectedMoyoWarnings(logging.Filter):
    """moyopy logs two warnings that are expected here and noise for a user screening thousands of
    crystals: "Omitted ... symmetry operations ... in the input-cell basis" for every supercell input
    (the primitive cell's operations are used), and "Large displacement during symmetrization" when an
    atom is moved to its exact Wyckoff position (what the frame does on purpose, by at most symprec).
    This filter drops those two messages and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Omitted") or message.startswith("Large displacement during symmetrization"))


_MOYO_FILTER = _ExpectedMoyoWarnings()
#: The loggers moyopy emits those two messages on ("Omitted": ``moyo``; the displacement:
#: ``moyo.symmetrize.symmetrization``, moyo's Rust module path).
_MOYO_LOGGERS = ("moyo", "moyo.symmetrize.symmetrization")


def _canonical_frame(moyopy, z, pos, lattice, symprec) -> CanonicalFrame:
    frac_in = pos @ np.linalg.inv(lattice)
    try:
        data = moyopy.MoyoDataset(moyopy.Cell(lattice.tolist(), frac_in.tolist(), z.tolist()), symprec=symprec,
                                  rotate_basis=True)
    except Exception as err:  # moyopy raises plain exceptions of several kinds; all mean "no symmetry found"
        raise FrameError(f"symmetry search failed (symprec {symprec} Å): {err}") from err
    prim = data.prim_std_cell
    basis = np.array(prim.basis, dtype=np.float64)
    basis_inverse = np.linalg.inv(basis)
    numbers = np.array(prim.numbers, dtype=np.int64)
    x_std = np.array(prim.positions, dtype=np.float64)
    group = _group(int(data.number), int(data.hall_number))
    rotations, translations = group.rotations, group.translations
    linear, shifts = _choose_description(data, basis, basis_inverse, x_std, numbers, group.polar)
    frac = x_std @ linear.T + shifts
    # The atoms in table order too: the graph's top-K cut breaks exact distance ties by atom index,
    # so the same crystal must also come with the same atom order.
    order = np.argsort(_table_keys(frac[None], numbers, sort=False)[0], kind="stable")
    numbers, frac, shifts, x_std = numbers[order], frac[order], shifts[order], x_std[order]
    # Every atom's shift is the same translation up to its image (an integer vector).
    images_choice = np.rint(shifts - shifts[0]).astype(np.int64)
    mapping = np.argsort(order)[np.asarray(data.mapping_std_prim, dtype=np.int64)]
    # The group is the same for the chosen description (a normalizer element maps it onto itself);
    # only the permutations of the atoms are recomputed.
    permutations = _permutations(group, frac, numbers, basis, symprec)
    rotation = np.array(data.std_rotation_matrix, dtype=np.float64)
    user_cell, atom_map, images, offset = _user_bookkeeping(lattice, pos, rotation, basis, basis_inverse, x_std,
                                                            mapping, symprec)
    return CanonicalFrame(numbers, basis, frac @ basis, int(data.number), rotations, translations, permutations,
                          user_cell, atom_map, images, offset, rotation, linear, shifts[0], images_choice, symprec)


# --- the candidates and the choice ----------------------------------------------------------------


def _wrap(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(wrapped, shift)``: ``frac - shift`` in [0, 1) with values within WRAP_EPS of 1 sent to 0."""
    shift = np.floor(frac + WRAP_EPS)
    return frac - shift, shift


def _table_keys(frac: np.ndarray, numbers: np.ndarray, sort: bool = True) -> np.ndarray:
    """``(c, m)`` int64 keys of ``c`` candidate descriptions ``frac (c, m, 3)`` (wrapped), sorted per
    candidate unless ``sort`` is false: Z and the fractional coordinates rounded to TABLE_DECIMALS,
    packed into one integer per atom."""
    scale = 10**TABLE_DECIMALS
    q = np.rint(frac * scale).astype(np.int64) % scale  # a coordinate that rounds to 1 is 0
    keys = ((numbers[None, :] * scale + q[..., 0]) * scale + q[..., 1]) * scale + q[..., 2]
    return np.sort(keys, axis=1) if sort else keys


def _normalizer(data) -> tuple[np.ndarray, np.ndarray]:
    """The chirality-preserving Euclidean normalizer of the space group on the primitive standard
    coordinates, as ``(linear (c, 3, 3), shift (c, 3))`` affine maps ``x -> P x + s``: the closure of
    moyopy's coset representatives and stabilizer under composition (translations mod 1)."""
    # Also for P1: the normalizer holds the isometries of a special lattice (a triclinic crystal in
    # a monoclinic-like cell has two reduced bases related by a 2-fold rotation).
    try:
        found = data.normalizer_wyckoff_positions(preserve_chirality=True, primitive=True)
    except Exception as err:  # moyopy's own exceptions (e.g. "Too large tolerance"): this symprec fails
        raise FrameError(f"the normalizer of the space group failed: {err}") from err
    generators = tuple((tuple(np.array(op.linear, dtype=np.int64).ravel()), tuple(op.origin_shift))
                       for op in [rep for rep, _ in found.coset_representatives] + list(found.stabilizer))
    return _closure(generators)


@functools.lru_cache(maxsize=1024)
def _closure(generators: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The group generated by ``(linear (9,) ints, shift (3,))`` affine maps, translations mod 1
    (cached: screening meets the same few hundred groups over and over)."""
    gens = [(np.array(lin, dtype=np.float64).reshape(3, 3), np.array(shift, dtype=np.float64))
            for lin, shift in generators]

    def key(op):
        return tuple(np.rint(op[0]).astype(int).ravel()) + tuple(np.rint((op[1] % 1.0) * 1e6).astype(int) % 10**6)

    group = {key((np.eye(3), np.zeros(3))): (np.eye(3), np.zeros(3))}
    frontier = list(group.values())
    while frontier:
        grown = []
        for p1, s1 in frontier:
            for p2, s2 in gens:
                op = (p2 @ p1, (p2 @ s1 + s2) % 1.0)
                if key(op) not in group:
                    group[key(op)] = op
                    grown.append(op)
        frontier = grown
    ops = list(group.values())
    return np.array([p for p, _ in ops]), np.array([s for _, s in ops])


def _choose_description(data, basis, basis_inverse, frac, numbers, polar) -> tuple[np.ndarray, np.ndarray]:
    """The smallest-table description among the equivalent ones: ``(P (3, 3), shifts (m, 3))`` with
    canonical fractions ``P @ x[k] + shifts[k]`` (wrapped) for moyopy's standard fractions ``x``;
    ``polar`` is the group's free origin directions (:attr:`_Group.polar`)."""
    linears, shifts = _normalizer(data)
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
            pinned = pinned @ (basis @ _projector(polar @ basis) @ basis_inverse)
        moved = (moved[:, None, :, :] - pinned[:, :, None, :]).reshape(-1, *frac.shape)
        linears = np.repeat(linears, len(atoms), axis=0)
    wrapped, _ = _wrap(moved)
    keys = _table_keys(wrapped, numbers)
    best = np.lexsort(keys.T[::-1])[0]
    return linears[best].copy(), wrapped[best] - frac @ linears[best].T


def _projector(rows: np.ndarray) -> np.ndarray:
    """``(3, 3)`` orthogonal projector (row action) onto the span of the independent ``rows (d, 3)``."""
    return rows.T @ np.linalg.solve(rows @ rows.T, rows)


@dataclass(frozen=True)
class _Group:
    """A space group's operations on the primitive standard cell's fractional coordinates, in the
    setting moyopy standardizes to (column action ``x' = R x + t``).

    Attributes:
        rotations: ``(k, 3, 3)`` int64.  translations: ``(k, 3)`` float64.
        moving: ``(k,)`` bool, False for the identity (which needs no permutation search).
        polar: ``(d, 3)`` fractional directions (rows) every rotation leaves fixed, ``d = 0`` for a
            non-polar group: the continuous freedom of the origin.
    """

    rotations: np.ndarray
    translations: np.ndarray
    moving: np.ndarray
    polar: np.ndarray


@functools.lru_cache(maxsize=1024)
def _group(number: int, hall_number: int) -> _Group:
    """The operations of space group ``number`` in the standard setting ``hall_number``, in the
    primitive basis moyopy standardizes to. Cached per setting (screening meets the same groups over
    and over); :func:`_permutations` checks that they map the refined cell onto itself."""
    import moyopy

    ops = moyopy.operations_from_number(number, setting=moyopy.Setting.hall_number(hall_number), primitive=True)
    rotations = np.array(ops.rotations, dtype=np.int64)
    translations = np.array(ops.translations, dtype=np.float64)
    identity = (rotations == np.eye(3, dtype=np.int64)).all(axis=(1, 2)) & (np.abs(translations) < 1e-12).all(axis=1)
    # Fixed directions: the null space of the stacked (R - 1); integer rotations, so the singular
    # values are either 0 or of order 1.
    _, sigma, vt = np.linalg.svd((rotations - np.eye(3, dtype=np.int64)).reshape(-1, 3).astype(np.float64))
    polar = vt[np.sum(sigma > 1e-6):]
    return _Group(rotations, translations, ~identity, polar)


def _permutations(group: _Group, frac, numbers, basis, symprec) -> np.ndarray:
    """``(k, m)``: operation g moves atom j onto atom ``perm[g, j]`` (same species, within symprec)."""
    perm = np.tile(np.arange(len(frac)), (len(group.rotations), 1))
    moving = group.moving
    if not moving.any():
        return perm
    moved = frac @ np.swapaxes(group.rotations[moving], 1, 2).astype(np.float64) + group.translations[moving, None, :]
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


def _user_bookkeeping(lattice, pos, rotation, basis, basis_inverse, x_std, mapping, symprec):
    """``(T, atom_map, images, offset)`` linking the user's description to moyopy's standard one."""
    rotated_cell = lattice @ rotation.T
    t_float = rotated_cell @ basis_inverse
    user_cell = np.rint(t_float).astype(np.int64)
    if np.abs(t_float - user_cell).max() > 1e-3 or round(abs(np.linalg.det(user_cell))) * len(x_std) != len(pos):
        raise FrameError("the input cell is not an integer combination of the primitive cell found")
    atom_map = np.asarray(mapping, dtype=np.int64)
    rotated = pos @ rotation.T
    reference = rotated[0] - x_std[atom_map[0]] @ basis
    images = np.rint((rotated - reference) @ basis_inverse - x_std[atom_map]).astype(np.int64)
    residual = rotated - (x_std[atom_map] + images) @ basis
    offset = residual.mean(axis=0)
    if np.abs(residual - offset).max() > 4 * symprec:
        raise FrameError("the input atoms do not map onto the refined primitive cell within symprec")
    return user_cell, atom_map, images, offset


# --- slabs ----------------------------------------------------------------------------------------

#: Vacuum (Å) below which a cell marked non-periodic along an axis is refused: atoms closer than
#: this across the gap would be bonded (covalent bonds reach ~3 Å), so it is a bulk crystal written
#: with a wrong pbc flag, not a slab.
MIN_SLAB_VACUUM = 3.0


@dataclass
class SlabFrame:
    """A slab (two periodic axes) as the model sees it, and the way back.

    The non-periodic lattice vector is replaced, for the model, by the slab's normal with length
    thickness + graph radius + 1 Å (so no edge or image crosses it, and the prediction does not
    depend on how much vacuum the user gave), and placed last; the atoms are made contiguous across
    the vacuum. The prediction keeps the user's non-periodic vector as given. The in-plane basis,
    orientation and atom order are the user's (no canonical choice among equivalent descriptions for
    slabs yet), and no symmetry projection is made (:meth:`symmetrize` returns its input).

    Attributes:
        numbers, positions, cell: the model's input (Å; ``cell[2]`` is the normal vector).
        axes: ``(3,)`` user axis of each model axis (a cyclic permutation, so handedness is kept).
        user_vector: ``(3,)`` the user's non-periodic lattice vector (Å).
        shifts: ``(n, 3)`` Cartesian shift applied to each atom for the model (Å).
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    axes: np.ndarray
    user_vector: np.ndarray
    shifts: np.ndarray

    def symmetrize(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return positions, cell

    def align(self, positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """Positions translated so that the centroid keeps its fractional in-plane coordinates and its
        height (a relaxation's translation; see :func:`align_fractional_centroid`)."""
        in_plane = np.vstack([cell[:2], self.cell[2]])
        return align_fractional_centroid(positions, in_plane, self.positions, self.cell)

    def to_user(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        user_cell = np.empty((3, 3))
        user_cell[self.axes[:2]] = cell[:2]
        user_cell[self.axes[2]] = self.user_vector
        return positions - self.shifts, user_cell


def slab_frame(atomic_numbers, positions, cell, pbc, radius: float) -> SlabFrame:
    """The model's view of a slab (see :class:`SlabFrame`); ``pbc`` has exactly one False entry.

    Raises:
        FrameError: the cell leaves less than MIN_SLAB_VACUUM of vacuum along the non-periodic axis.
    """
    z = np.asarray(atomic_numbers, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    lattice = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    k = int(np.flatnonzero(~np.asarray(pbc, dtype=bool))[0])
    axes = np.array([(k + 1) % 3, (k + 2) % 3, k])
    a, b, vector = lattice[axes[0]], lattice[axes[1]], lattice[k]
    normal = np.cross(a, b)
    normal /= np.linalg.norm(normal)  # points along the vector: the cell is right-handed (validated)
    # Contiguous across the vacuum: wrap the fractional heights into [0, 1), find the widest gap
    # between neighbouring atoms (cyclically) and move the atoms below it up by one period.
    raw = (pos @ np.linalg.inv(lattice))[:, k]
    wrapped = raw - np.floor(raw)
    order = np.argsort(wrapped)
    gaps = np.diff(np.concatenate([wrapped[order], wrapped[order[:1]] + 1.0]))
    cut = wrapped[order[(np.argmax(gaps) + 1) % len(order)]]
    periods = wrapped - raw + (wrapped < cut)
    unwrapped = pos + periods[:, None] * vector
    heights = unwrapped @ normal
    thickness = float(heights.max() - heights.min())
    vacuum = float(vector @ normal) - thickness
    if vacuum < MIN_SLAB_VACUUM:
        raise FrameError(f"slab (pbc {np.asarray(pbc).tolist()}): only {vacuum:.3g} Å of vacuum along the "
                         f"non-periodic axis (at least {MIN_SLAB_VACUUM} Å, or atoms bond across it: is it a bulk "
                         "crystal? then mark the axis periodic)")
    box = thickness + radius + 1.0
    # The slab centred in the model's box along the normal (the model is translation-invariant; this
    # keeps the graph builder's fractional coordinates tidy).
    shifts = unwrapped - pos + (0.5 * box - 0.5 * (heights.max() + heights.min())) * normal
    model_cell = np.vstack([a, b, box * normal])
    return SlabFrame(z, pos + shifts, model_cell, axes, vector.copy(), shifts)
