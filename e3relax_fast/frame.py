"""The canonical frame: one description per crystal, whatever way the user wrote it.

The model is not invariant to how a crystal is written: its three lattice nodes have their own
weights (so the choice of basis matters), and the default mode centres positions per crystal (so the
periodic image chosen for each atom matters). :func:`canonical_frame` therefore maps every input to
one description of its crystal before the model sees it, and :meth:`CanonicalFrame.to_user` maps the
prediction back to the user's description:

1. **Symmetry and the standard primitive cell** (moyopy, ``symprec`` in Å): the primitive cell of
   the crystal (an exact supercell is reduced), in the standard setting of its space group, in the
   standard orientation; lattice and positions symmetrized (refined) within ``symprec``.
   Most screened crystals (strained, rattled, substituted) are P1 on a lattice with no isometry
   but ±1; where the op ``frame_p1_certificate`` proves that (no pure translation, no inversion,
   with a margin), moyopy's answer is known and its search is skipped (:func:`_certified_p1`).
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

Steps 2 and 3 are the op ``frame_bookkeeping`` and the way back (projection, translation gauge,
step 3 in reverse) the op ``frame_map_back`` (:meth:`CanonicalFrame.map_back`): NumPy reference
twins in :mod:`e3relax_fast.reference`, C++ in ``csrc/frame_cpu.cpp`` (backend ``cpu``, taken by
``auto``): a screening run spends the frame's time in per-call overheads, not in arithmetic.

Units: Å; cells are ``(3, 3)`` with the lattice vectors as rows; fractional coordinates are rows
``x`` with Cartesian ``r = x @ cell``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from . import ops
from .reference.frame_bookkeeping import FrameError
from .reference.frame_map_back import align_fractional_centroid, symmetrize_prediction, to_user

#: Default tolerance of the symmetry search, Å (spglib/moyopy ``symprec``).
SYMPREC = 1e-3
#: A crystal just outside a higher symmetry can make moyopy's search or its normalizer fail at one
#: tolerance ("Too large tolerance") and pass at a smaller one: the frame retries at symprec / 2,
#: / 4, ... this many times before it gives up on the crystal.
SYMPREC_RETRIES = 4

__all__ = ["SYMPREC", "SYMPREC_RETRIES", "CanonicalFrame", "FrameError", "SlabFrame", "align_fractional_centroid",
           "canonical_frame", "slab_frame"]


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
        choice_linear, choice_shift, choice_images: ``(3, 3)`` int64, ``(3,)`` float64 and ``(m, 3)``
            int64: the chosen description among the equivalent ones, ``frac[k] = choice_linear @ x[k] +
            choice_shift + choice_images[k]`` with ``x`` moyopy's standard coordinates (the frame of
            ``atom_map``, ``images`` and ``offset``): an isometry of the lattice, a translation, and
            each atom's image.
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
        return self.positions @ np.linalg.inv(self.cell)

    def map_back(self, positions: np.ndarray, cell: np.ndarray, symmetrize: bool,
                 backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """A prediction for the canonical cell (``positions (m, 3)``, ``cell (3, 3)``, Å, standard
        orientation) in the user's description: :meth:`symmetrize` when ``symmetrize``, then
        :meth:`align`, then :meth:`to_user`, in one call of the op ``frame_map_back`` (``backend``:
        ``"auto"``, ``"reference"`` or ``"cpu"``). Returns ``(positions (n, 3), cell (3, 3))`` float64."""
        return _implementation(ops.FRAME_MAP_BACK, backend)(
            positions, cell, self.positions, self.cell, self.rotations, self.permutations, self.choice_linear,
            self.choice_shift, self.choice_images, self.atom_map, self.images, self.offset, self.user_cell,
            self.rotation, symmetrize)

    def to_user(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A prediction for the canonical cell (``positions (m, 3)``, ``cell (3, 3)``, Å, standard
        orientation) in the user's description: ``(positions (n, 3), cell (3, 3))`` in the user's
        orientation, basis, supercell and atom order, each atom at the image nearest its input."""
        return to_user(positions, cell, self.cell, self.choice_linear, self.choice_shift, self.choice_images,
                       self.atom_map, self.images, self.offset, self.user_cell, self.rotation)

    def from_user(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of :meth:`to_user`: a structure in the user's description (``positions (n, 3)``
        in the user's atom order, each atom the image that corresponds to its input position, and
        ``cell (3, 3)``, Å) as ``(positions (m, 3), cell (3, 3))`` of the canonical cell. The images
        of one canonical atom in a supercell are averaged (a target that breaks the supercell's
        translations is projected onto them)."""
        linear = self.choice_linear
        cell_inverse = np.linalg.inv(self.cell)
        std_cell = np.linalg.solve(self.user_cell.astype(np.float64), cell @ self.rotation.T)
        per_atom = (positions @ self.rotation.T) @ np.linalg.inv(std_cell) - self.images - self.offset @ cell_inverse
        frac = np.zeros((len(self.numbers), 3))
        np.add.at(frac, self.atom_map, per_atom)
        frac /= np.bincount(self.atom_map, minlength=len(self.numbers))[:, None]
        std_rotation = cell_inverse @ linear.T @ self.cell  # the rotation the lattice isometry amounts to
        canonical_cell = np.linalg.solve(linear.T, std_cell) @ std_rotation
        canonical = frac @ linear.T + self.choice_shift + self.choice_images
        return canonical @ canonical_cell, canonical_cell

    def align(self, positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """``positions`` translated so that their centroid has the canonical input's fractional
        coordinates in ``cell``: the translation a relaxation gives (forces sum to zero, so atoms
        move with the cell about the origin) and which a translation-equivariant model cannot know."""
        return align_fractional_centroid(positions, cell, self.positions, self.cell)

    def symmetrize(self, positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project a prediction for the canonical cell onto the input's space group (``F`` and ``u``
        averaged over the group, as ASE's ``FixSymmetry`` does for a relaxation step; see
        :func:`~e3relax_fast.reference.frame_map_back.symmetrize_prediction`). Returns
        ``(positions (m, 3), cell (3, 3))``; the result has every symmetry of the input."""
        return symmetrize_prediction(positions, cell, self.positions, self.cell, self.rotations, self.permutations)


def canonical_frame(atomic_numbers, positions, cell, symprec: float = SYMPREC, backend: str = "auto") -> CanonicalFrame:
    """The canonical description of one crystal (see the module docstring).

    Args:
        atomic_numbers: ``(n,)`` Z.  positions: ``(n, 3)`` Cartesian Å.  cell: ``(3, 3)`` Å, rows.
        symprec: symmetry tolerance in Å; symmetry found within it is made exact.
        backend: the backend of the ops ``frame_bookkeeping`` and ``frame_p1_certificate``,
            ``"auto"``, ``"reference"`` or ``"cpu"`` (the same frame either way).

    Raises:
        FrameError: the symmetry search fails, or its bookkeeping is inconsistent, at ``symprec`` and
            at each of the SYMPREC_RETRIES smaller tolerances.
    """
    import moyopy

    z = np.ascontiguousarray(atomic_numbers, dtype=np.int64)
    pos = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3)
    lattice = np.ascontiguousarray(cell, dtype=np.float64).reshape(3, 3)
    bookkeeping = _implementation(ops.FRAME_BOOKKEEPING, backend)
    certificate = _implementation(ops.FRAME_P1_CERTIFICATE, backend)
    _filter_moyo_warnings()
    frac = pos @ _inverse(lattice)
    for attempt in range(SYMPREC_RETRIES + 1):
        try:
            return _canonical_frame(moyopy, bookkeeping, certificate, z, frac, pos, lattice, symprec / 2**attempt)
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


def _filter_moyo_warnings() -> None:
    """Put the filter on each logger that emits one of the two messages (a logger's filters only see
    the records logged to it, not those its children propagate); again if it was removed."""
    for log in _moyo_loggers():
        if _MOYO_FILTER not in log.filters:
            log.addFilter(_MOYO_FILTER)


@functools.lru_cache(maxsize=1)
def _moyo_loggers() -> tuple[logging.Logger, ...]:
    return tuple(logging.getLogger(name) for name in _MOYO_LOGGERS)  # loggers live as long as the process


# A screening run builds thousands of frames, each in a few tens of microseconds outside moyopy:
# the two helpers below keep per-crystal overhead out of that budget.


@functools.cache
def _implementation(op: str, backend: str):
    """The op's implementation for ``backend`` on host arrays (resolved once per name)."""
    return ops.resolve(op, backend, "cpu")[1]


def _inverse(m: np.ndarray) -> np.ndarray:
    """``(3, 3)`` inverse of a non-singular (validated) cell by the adjugate, in plain Python floats
    (np.linalg.inv costs ten times more on a 3 x 3 matrix, per call)."""
    (a, b, c), (d, e, f), (g, h, i) = m.tolist()
    cof = ((e * i - f * h, c * h - b * i, b * f - c * e),
           (f * g - d * i, a * i - c * g, c * d - a * f),
           (d * h - e * g, b * g - a * h, a * e - b * d))
    det = a * cof[0][0] + b * cof[1][0] + c * cof[2][0]
    return np.array(cof) / det


def _canonical_frame(moyopy, bookkeeping, certificate, z, frac, pos, lattice, symprec) -> CanonicalFrame:
    """The search (moyopy), then the op ``frame_bookkeeping`` on what it found; ``frac``: the
    user's fractional coordinates."""
    number, inputs = search(moyopy, z, frac, pos, lattice, symprec, certificate)
    basis, rotations, translations, rotation = inputs[0], inputs[6], inputs[7], inputs[10]
    (numbers, positions, linear, shift, choice_images, permutations, user_cell, atom_map, images,
     offset) = bookkeeping(*inputs)
    return CanonicalFrame(numbers, basis, positions, number, rotations, translations, permutations, user_cell,
                          atom_map, images, offset, rotation, linear, shift, choice_images, symprec)


def search(moyopy, z, frac, pos, lattice, symprec, certificate=None) -> tuple[int, tuple]:
    """moyopy's symmetry search on one crystal: ``(space group number, the arguments of the op
    frame_bookkeeping)``; ``z (n,)`` int64, ``frac``, ``pos (n, 3)`` the user's fractional and
    Cartesian (Å) coordinates, ``lattice (3, 3)`` Å. A crystal :func:`_certified_p1` proves P1
    gets moyopy's answer without the search (``certificate``: the op ``frame_p1_certificate``'s
    implementation; None: ``auto``'s).

    Raises:
        FrameError: the search or the normalizer fails at ``symprec``.
    """
    p1 = _certified_p1(moyopy, z, frac, pos, lattice, symprec,
                       certificate or _implementation(ops.FRAME_P1_CERTIFICATE, "auto"))
    if p1 is not None:
        return 1, p1
    try:
        data = moyopy.MoyoDataset(moyopy.Cell(lattice.tolist(), frac.tolist(), z.tolist()), symprec=symprec,
                                  rotate_basis=True)
    except Exception as err:  # moyopy raises plain exceptions of several kinds; all mean "no symmetry found"
        raise FrameError(f"symmetry search failed (symprec {symprec} Å): {err}") from err
    prim = data.prim_std_cell
    number, hall_number, basis = int(data.number), int(data.hall_number), prim.basis
    group = _group(number, hall_number)
    linears, shifts = _normalizer(data, number, hall_number, basis, symprec)
    return number, (
        np.array(basis, dtype=np.float64), np.array(prim.numbers, dtype=np.int64),
        np.array(prim.positions, dtype=np.float64), linears, shifts, group.polar, group.rotations, group.translations,
        group.moving, np.array(data.mapping_std_prim, dtype=np.int64),
        np.array(data.std_rotation_matrix, dtype=np.float64), lattice, pos, symprec)


def _certified_p1(moyopy, z, frac, pos, lattice, symprec, certificate) -> tuple | None:
    """The arguments of the op frame_bookkeeping that moyopy's search would give, for a crystal
    proven to be P1 at ``symprec`` with ``GENERIC_LATTICE_MARGIN`` to spare; None when it is not
    proven (the caller searches).

    Proof: its Niggli-reduced lattice has no isometry but ±1 (:func:`_generic_lattice`), and no
    pure translation and no inversion maps it onto itself (op ``frame_p1_certificate``): nothing
    else is left for a space-group operation. moyopy's answer for such a crystal is then known:
    the primitive standard cell of P1 is the Niggli-reduced cell in the standard orientation (a along
    x, b in the xy plane), its atoms the user's in the user's order, unwrapped, and the normalizer
    the one every generic P1 lattice has (tests compare the frames with moyopy's)."""
    try:
        reduced, linear = moyopy.niggli_reduce(lattice.tolist())
    except Exception:  # moyopy's own exceptions (a reduction that does not converge): the search decides
        return None
    margin = GENERIC_LATTICE_MARGIN * symprec
    if not _generic_lattice(reduced, margin):
        return None
    (p, q, r), (s, t, u), (v, w, y) = linear  # reduced = linear^T @ lattice, integer and unimodular
    if p * (t * y - u * w) - q * (s * y - u * v) + r * (s * w - t * v) != 1:
        return None  # a left-handed reduced basis: moyopy's standard cell is another one
    # x = frac @ inv(linear)^T, by the adjugate (the inverse of a unimodular integer matrix is integer).
    inverse_t = np.array([[t * y - u * w, u * v - s * y, s * w - t * v],
                          [r * w - q * y, p * y - r * v, q * v - p * w],
                          [q * u - r * t, r * s - p * u, p * t - q * s]], dtype=np.float64)
    x = frac @ inverse_t
    basis = np.array(reduced, dtype=np.float64)
    if not certificate(z, x, basis, margin):
        return None
    # The standard orientation: rows e1 along a, e2 in the (a, b) plane, e3 = e1 x e2.
    (a1, a2, a3), (b1, b2, b3) = reduced[0], reduced[1]
    la = math.sqrt(a1 * a1 + a2 * a2 + a3 * a3)
    e1 = (a1 / la, a2 / la, a3 / la)
    along = b1 * e1[0] + b2 * e1[1] + b3 * e1[2]
    f1, f2, f3 = b1 - along * e1[0], b2 - along * e1[1], b3 - along * e1[2]
    lf = math.sqrt(f1 * f1 + f2 * f2 + f3 * f3)
    e2 = (f1 / lf, f2 / lf, f3 / lf)
    e3 = (e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0])
    rotation = np.array((e1, e2, e3))
    linears, shifts = _generic_p1_normalizer(moyopy)
    group = _group(1, 1)
    return (basis @ rotation.T, z, x, linears, shifts, group.polar, group.rotations, group.translations, group.moving,
            np.arange(len(z), dtype=np.int64), rotation, lattice, pos, symprec)


def _generic_p1_normalizer(moyopy) -> tuple[np.ndarray, np.ndarray]:
    """P1's normalizer on a generic lattice (the same for every such crystal), from moyopy once."""
    cached = _GENERIC_TRICLINIC_NORMALIZERS.get(1)
    if cached is None:
        # Any P1 crystal on a generic lattice gives it: this one has three species and a skewed cell.
        lattice = [[3.1, 0.0, 0.0], [0.4, 4.3, 0.0], [0.7, 0.9, 5.9]]
        data = moyopy.MoyoDataset(moyopy.Cell(lattice, [[0.0, 0.0, 0.0], [0.13, 0.27, 0.41], [0.61, 0.19, 0.83]],
                                              [1, 2, 3]), symprec=SYMPREC)
        assert data.number == 1 and _generic_lattice(data.prim_std_cell.basis, GENERIC_LATTICE_MARGIN * SYMPREC)
        cached = _GENERIC_TRICLINIC_NORMALIZERS[1] = _crystal_normalizer(data)
    return cached


#: Space groups from this ITA number on (tetragonal, trigonal, hexagonal, cubic) have a Euclidean
#: normalizer that no lattice metric enlarges (ITA Vol. A, §3.5.2: specialized metrics exist only for
#: triclinic, monoclinic and orthorhombic groups), so it depends on the setting alone.
METRIC_FREE_NORMALIZERS_FROM = 75
# Hall number -> its normalizer, for those groups: moyopy's Wyckoff-resolved normalizer costs 0.6-1.4 ms
# (median; up to 50 ms) per symmetric crystal, several times its symmetry search.
_SETTING_NORMALIZERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
# Space group (1 or 2) -> its normalizer on a lattice with no isometry but +-1 (see _generic_lattice).
_GENERIC_TRICLINIC_NORMALIZERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
#: A triclinic lattice counts as generic (no isometry but +-1) when no lattice vector of the
#: reduced basis's {-1, 0, 1} combinations comes within this many ``symprec`` of a basis vector's
#: length, and no pair of basis vectors within it of being perpendicular (the projection of one
#: onto the other): four times the tolerance of moyo's own Bravais-group search (``symprec`` on
#: lengths, and on ``sin`` of the angle change times the mean length), so the two never disagree.
#: 87 % of the MP-like mix's P1/P-1 crystals are generic at 4, 92 % at 2, 71 % at 10.
GENERIC_LATTICE_MARGIN = 4.0


def _normalizer(data, number: int, hall_number: int, basis: list, symprec: float) -> tuple[np.ndarray, np.ndarray]:
    """The chirality-preserving Euclidean normalizer of the space group on the primitive standard
    coordinates, as ``(linear (c, 3, 3), shift (c, 3))`` affine maps ``x -> P x + s``: the closure of
    moyopy's coset representatives and stabilizer under composition (translations mod 1); computed
    once per setting for the groups whose normalizer no metric changes, and once per group for P1 and
    P-1 on a generic lattice (``basis``: moyopy's primitive standard basis, rows, Å)."""
    if number >= METRIC_FREE_NORMALIZERS_FROM:
        cached = _SETTING_NORMALIZERS.get(hall_number)
        if cached is None:
            cached = _SETTING_NORMALIZERS[hall_number] = _crystal_normalizer(data)
        return cached
    # moyopy may have changed the tolerance to find a consistent group: the larger one counts.
    if number <= 2 and _generic_lattice(basis, GENERIC_LATTICE_MARGIN * max(symprec, data.symprec)):
        # Most screened crystals (strained, rattled, substituted) are P1 or P-1 on such a lattice,
        # where moyopy's answer costs a quarter of its symmetry search and is always the same.
        cached = _GENERIC_TRICLINIC_NORMALIZERS.get(number)
        if cached is None:
            cached = _GENERIC_TRICLINIC_NORMALIZERS[number] = _crystal_normalizer(data)
        return cached
    return _crystal_normalizer(data)


def _generic_lattice(basis: list, margin: float) -> bool:
    """Whether the lattice of a Minkowski-reduced ``basis`` (rows a, b, c, Å) has no isometry but
    +-1, with ``margin`` (Å) to spare; False when unsure (``basis`` not reduced: the caller asks moyopy).

    An isometry of a lattice maps a Minkowski-reduced basis to lattice vectors of the same lengths
    whose coefficients are in {-1, 0, 1} (moyo's Bravais-group search rests on the same fact). In
    such a basis every other one of those vectors is at least as long as b. So when no two of
    |a|, |b|, |c| and no other such vector's length come within ``margin`` of each other, an
    isometry can only flip the signs of a, b and c, and when no two of them are within ``margin``
    of perpendicular (the projection of one onto the other), only all three together."""
    import moyopy

    if not moyopy.is_minkowski_reduced(basis):
        return False
    (a1, a2, a3), (b1, b2, b3), (c1, c2, c3) = basis
    aa, bb, cc = a1 * a1 + a2 * a2 + a3 * a3, b1 * b1 + b2 * b2 + b3 * b3, c1 * c1 + c2 * c2 + c3 * c3
    ab, bc, ac = a1 * b1 + a2 * b2 + a3 * b3, b1 * c1 + b2 * c2 + b3 * c3, a1 * c1 + a2 * c2 + a3 * c3
    la, lb, lc = math.sqrt(aa), math.sqrt(bb), math.sqrt(cc)  # la <= lb <= lc (reduced)
    if lb - la <= margin or lc - lb <= margin:
        return False
    if abs(ab) <= margin * lb or abs(bc) <= margin * lc or abs(ac) <= margin * lc:
        return False
    # Squared lengths of a +- b, b +- c, a +- c and a +- b +- c, against the bands around |b| and |c|.
    low_b, high_b, low_c, high_c = (lb - margin) ** 2, (lb + margin) ** 2, (lc - margin) ** 2, (lc + margin) ** 2
    abc = aa + bb + cc
    for q in (aa + bb + 2 * ab, aa + bb - 2 * ab, bb + cc + 2 * bc, bb + cc - 2 * bc, aa + cc + 2 * ac,
              aa + cc - 2 * ac, abc + 2 * (ab + bc + ac), abc + 2 * (ab - bc - ac), abc + 2 * (ac - ab - bc),
              abc + 2 * (bc - ab - ac)):
        if low_b <= q <= high_b or low_c <= q <= high_c:
            return False
    return True


def _crystal_normalizer(data) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_normalizer` from moyopy's answer for this crystal."""
    # Also for P1: the normalizer holds the isometries of a special lattice (a triclinic crystal in
    # a monoclinic-like cell has two reduced bases related by a 2-fold rotation).
    try:
        found = data.normalizer_wyckoff_positions(preserve_chirality=True, primitive=True)
    except Exception as err:  # moyopy's own exceptions (e.g. "Too large tolerance"): this symprec fails
        raise FrameError(f"the normalizer of the space group failed: {err}") from err
    generators = tuple((tuple(itertools.chain.from_iterable(op.linear)), tuple(op.origin_shift))
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
    # In the order of their keys, not of their discovery: the same group gives the same arrays
    # whichever generators (crystal) produced it, so a cached normalizer breaks ties in the choice
    # of description exactly as a fresh one would.
    ops_ = [group[k] for k in sorted(group)]
    shifts = np.array([s for _, s in ops_])
    # Composition leaves float noise that depends on the order of discovery: snap the shifts to
    # multiples of 1/24 (every origin shift of a normalizer's finite part, ITA §3.5.2) where they
    # are that within 1e-9, so every crystal of a setting gets the same bits.
    grid = np.round(shifts * 24.0) / 24.0
    shifts = np.where(np.abs(shifts - grid) < 1e-9, grid % 1.0, shifts)
    linears = np.array([p for p, _ in ops_])
    linears.flags.writeable = shifts.flags.writeable = False  # shared by every frame of the group (cached)
    return linears, shifts


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
    and over); the op ``frame_bookkeeping`` checks that they map the refined cell onto itself."""
    import moyopy

    ops_ = moyopy.operations_from_number(number, setting=moyopy.Setting.hall_number(hall_number), primitive=True)
    rotations = np.array(ops_.rotations, dtype=np.int64)
    translations = np.array(ops_.translations, dtype=np.float64)
    identity = (rotations == np.eye(3, dtype=np.int64)).all(axis=(1, 2)) & (np.abs(translations) < 1e-12).all(axis=1)
    # Fixed directions: the null space of the stacked (R - 1); integer rotations, so the singular
    # values are either 0 or of order 1.
    _, sigma, vt = np.linalg.svd((rotations - np.eye(3, dtype=np.int64)).reshape(-1, 3).astype(np.float64))
    polar = np.ascontiguousarray(vt[np.sum(sigma > 1e-6):])
    return _Group(rotations, translations, ~identity, polar)


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

    def map_back(self, positions: np.ndarray, cell: np.ndarray, symmetrize: bool) -> tuple[np.ndarray, np.ndarray]:
        """A prediction (``positions (n, 3)``, ``cell (3, 3)``, Å) in the user's description: :meth:`align`,
        then :meth:`to_user` (no symmetry projection for slabs: ``symmetrize`` is ignored)."""
        return self.to_user(self.align(positions, cell), cell)

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
