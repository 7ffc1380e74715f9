"""Validation of model inputs: what makes a structure unusable, named precisely.

Conventions: positions are Cartesian in Å; a cell is ``(3, 3)`` with the lattice vectors a, b, c as
rows, in Å.
"""

from __future__ import annotations

import functools

import numpy as np

from ..geometry import IMAGES_27

#: Atomic numbers the model's element table accepts (spec §2: 118 rows indexed by Z, row 0 unused).
MIN_Z, MAX_Z = 1, 117
#: Atoms closer than this (Å), periodic images included, are reported as overlapping.
MIN_DISTANCE = 0.1
#: Atoms closer than this (Å) are accepted but implausible (shorter than any bond but H2's 0.74 Å):
#: :func:`close_atoms` names them so that callers can warn.
PLAUSIBLE_DISTANCE = 0.5
#: Largest |x|, |y|, |z| (Å) of a position: beyond it float64 fractional coordinates lose the
#: precision the graph needs (the compiled graph builders refuse such positions; checked here, per
#: structure, before any graph work, so every backend and every ``on_error`` mode behave alike).
MAX_COORDINATE = 1e6
#: Lattice planes closer than this (Å) make a cell degenerate. Besides rejecting collapsed cells,
#: it guarantees that the minimum image in fractional coordinates finds every overlap below
#: ``MIN_DISTANCE`` (see :func:`_closest_pair`).
MIN_PLANE_SPACING = 0.5


class InvalidStructureError(ValueError):
    """A structure cannot be given to the model.

    Attributes:
        index: position of the structure in the caller's input (``None`` when not known).
        reason: the problem, without the index prefix.
    """

    def __init__(self, index: int | None, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(reason if index is None else f"structure {index}: {reason}")

    def __reduce__(self):  # keep (index, reason) when pickled, e.g. across worker processes
        return (type(self), (self.index, self.reason))


def check_shapes(z: np.ndarray, positions: np.ndarray, cell: np.ndarray, index: int | None) -> None:
    """Raise :class:`InvalidStructureError` unless ``z`` is ``(n,)``, positions ``(n, 3)`` and cell ``(3, 3)``."""
    if z.ndim != 1:
        raise InvalidStructureError(index, f"atomic numbers must have shape (n,), got {z.shape}")
    if positions.shape != (len(z), 3):
        raise InvalidStructureError(
            index, f"positions must have shape (n, 3) = ({len(z)}, 3), got {positions.shape}"
        )
    if cell.shape != (3, 3):
        raise InvalidStructureError(index, f"cell must have shape (3, 3), got {cell.shape}")


def plane_spacings(cell: np.ndarray) -> np.ndarray:
    """``(3,)`` float64 distances in Å between the lattice planes spanned by (b, c), (c, a), (a, b).

    ``cell`` is ``(3, 3)`` in Å with lattice vectors as rows; a singular cell gives zeros.
    """
    if np.linalg.det(cell) == 0:
        return np.zeros(3)
    # The spacing of the planes spanned by (b, c) is 1 / |a*|, a* the reciprocal vector: the first
    # column of cell^-1 (and so on); cheaper than volume / |b x c| with np.cross.
    return 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)


_PLANE_NAMES = ("b and c", "c and a", "a and b")
_OFFSETS = IMAGES_27.numpy()


# Up to this many atoms, measuring every pair at once is cheaper than binning (the 27 bin offsets'
# searches cost ~0.4 ms per structure; all pairs of 64 atoms ~0.05 ms).
_ALL_PAIRS_UP_TO = 64


@functools.lru_cache(maxsize=_ALL_PAIRS_UP_TO + 1)
def _pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)``, every pair ``i < j`` of ``n`` atoms (cached: ``np.triu_indices`` costs more than
    the distances it indexes; read-only, as the cache shares them)."""
    i, j = np.triu_indices(n, k=1)
    i.flags.writeable = j.flags.writeable = False
    return i, j


def _closest_pair_all(frac: np.ndarray, cell: np.ndarray, threshold: float) -> tuple[int, int, float] | None:
    """:func:`_closest_pair` by measuring every pair's minimum image (``frac``: ``(n, 3)`` wrapped
    fractional coordinates)."""
    i, j = _pair_indices(len(frac))
    if len(i) == 0:
        return None
    delta = frac[j] - frac[i]
    delta -= np.round(delta)
    dist = np.linalg.norm(delta @ cell, axis=1)
    k = int(np.argmin(dist))
    return (int(i[k]), int(j[k]), float(dist[k])) if dist[k] < threshold else None


def _closest_pair(positions: np.ndarray, cell: np.ndarray, threshold: float) -> tuple[int, int, float] | None:
    """The closest pair of distinct atoms nearer than ``threshold`` Å over all periodic images.

    Atoms are wrapped into the cell and binned on a fractional grid whose bins are at least
    ``threshold`` thick, so only pairs in the same or adjacent bins (periodically) are measured:
    O(n) work for ordinary structures. Each candidate pair's distance is its minimum image in
    fractional coordinates; that image is the closest one whenever the distance is below
    ``threshold`` because every plane spacing is at least ``MIN_PLANE_SPACING`` >= 2.5 *
    ``threshold`` (a closer image would need a fractional component > 0.5). Periodic images of an
    atom itself are at least one plane spacing apart and so never overlap.

    Args:
        positions: ``(n, 3)`` float64 Cartesian positions in Å.
        cell: ``(3, 3)`` float64 non-singular cell in Å, rows = lattice vectors.
        threshold: distance in Å.

    Returns:
        ``(i, j, distance)`` with ``i < j`` and distance in Å, or ``None`` if no pair is closer.
    """
    n = len(positions)
    frac = positions @ np.linalg.inv(cell)
    frac -= np.floor(frac)
    if n <= _ALL_PAIRS_UP_TO:
        return _closest_pair_all(frac, cell, threshold)
    return _closest_pair_binned(frac, cell, threshold)


def _closest_pair_binned(frac: np.ndarray, cell: np.ndarray, threshold: float) -> tuple[int, int, float] | None:
    """:func:`_closest_pair` over a fractional grid of bins (``frac``: ``(n, 3)`` wrapped fractional
    coordinates): only pairs in the same or adjacent bins are measured."""
    n = len(frac)
    nbins = np.maximum(np.floor(plane_spacings(cell) / threshold), 1).astype(np.int64)
    # frac can round to exactly 1.0 for tiny negative inputs, hence the clip.
    bins = np.minimum((frac * nbins).astype(np.int64), nbins - 1)

    def encode(b: np.ndarray) -> np.ndarray:
        return (b[..., 0] * nbins[1] + b[..., 1]) * nbins[2] + b[..., 2]

    order = np.argsort(encode(bins), kind="stable")
    sorted_keys = encode(bins)[order]
    best: tuple[int, int, float] | None = None
    for offset in _OFFSETS:
        keys = encode((bins + offset) % nbins)
        lo = np.searchsorted(sorted_keys, keys, side="left")
        counts = np.searchsorted(sorted_keys, keys, side="right") - lo
        total = int(counts.sum())
        if total == 0:
            continue
        i = np.repeat(np.arange(n), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        j = order[starts + np.arange(total)]
        keep = i < j
        i, j = i[keep], j[keep]
        if len(i) == 0:
            continue
        delta = frac[j] - frac[i]
        delta -= np.round(delta)
        dist = np.linalg.norm(delta @ cell, axis=1)
        k = int(np.argmin(dist))
        if dist[k] < threshold and (best is None or dist[k] < best[2]):
            best = (int(i[k]), int(j[k]), float(dist[k]))
    return best


def validate(z, positions, cell, index: int | None = None) -> tuple[int, int, float] | None:
    """Check that one structure is a valid model input; raise on the first problem found.

    Args:
        z: ``(n,)`` integer atomic numbers.
        positions: ``(n, 3)`` Cartesian positions in Å.
        cell: ``(3, 3)`` cell in Å, rows = lattice vectors.
        index: position of the structure in the caller's input, used in error messages.

    Returns:
        What :func:`close_atoms` returns for it (found in the same search as the overlap check):
        ``(i, j, distance)`` of the closest pair nearer than ``PLAUSIBLE_DISTANCE`` Å, or ``None``.

    Raises:
        InvalidStructureError: wrong shapes; no atoms; NaN/inf positions or cell; a coordinate
            beyond 1e6 Å; Z outside 1..117; a singular cell; a degenerate cell (lattice planes
            closer than 0.5 Å); a left-handed cell (det < 0); two atoms closer than 0.1 Å,
            periodic images included.
    """
    z = np.asarray(z)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    check_shapes(z, positions, cell, index)
    if len(z) == 0:
        raise InvalidStructureError(index, "empty structure (no atoms)")
    if not np.isfinite(cell).all():
        raise InvalidStructureError(index, "cell contains NaN or inf")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad):
        raise InvalidStructureError(
            index, f"positions contain NaN or inf ({len(bad)} atom(s), first: atom {bad[0]})"
        )
    bad = np.flatnonzero((np.abs(positions) > MAX_COORDINATE).any(axis=1))
    if len(bad):
        raise InvalidStructureError(
            index,
            f"atom {bad[0]} lies {np.abs(positions[bad[0]]).max():.3g} Å from the origin along an axis "
            f"({len(bad)} atom(s) beyond {MAX_COORDINATE:.0e} Å); wrap the positions into the cell",
        )
    bad = np.flatnonzero((z < MIN_Z) | (z > MAX_Z))
    if len(bad):
        raise InvalidStructureError(
            index,
            f"unknown element Z={int(z[bad[0]])} at atom {bad[0]} ({len(bad)} atom(s) out of range; "
            f"supported: Z = {MIN_Z}..{MAX_Z})",
        )
    det = float(np.linalg.det(cell))
    lengths = np.linalg.norm(cell, axis=1)
    if abs(det) <= 1e-9 * float(np.prod(lengths)):
        raise InvalidStructureError(
            index,
            f"singular cell (det = {det:.3g} Å^3, lattice vector lengths {np.round(lengths, 4).tolist()} "
            "Å): the lattice vectors are linearly dependent or zero",
        )
    spacings = plane_spacings(cell)
    k = int(np.argmin(spacings))
    if spacings[k] < MIN_PLANE_SPACING:
        raise InvalidStructureError(
            index,
            f"degenerate cell: the lattice planes spanned by {_PLANE_NAMES[k]} are only "
            f"{spacings[k]:.4g} Å apart (minimum {MIN_PLANE_SPACING} Å)",
        )
    if det < 0:
        raise InvalidStructureError(
            index,
            f"left-handed cell (det = {det:.6g} Å^3 < 0); swap two lattice vectors or negate one",
        )
    # One search serves the hard limit and the callers' warning: the closest pair below the larger
    # threshold is below MIN_DISTANCE exactly when some pair is (every pair's minimum image is at
    # least its true distance, and exact below MIN_DISTANCE; see _closest_pair).
    pair = _closest_pair(positions, cell, PLAUSIBLE_DISTANCE)
    if pair is not None and pair[2] < MIN_DISTANCE:
        i, j, dist = pair
        raise InvalidStructureError(
            index,
            f"atoms {i} and {j} overlap: {dist:.4g} Å apart (minimum {MIN_DISTANCE} Å, "
            "periodic images included)",
        )
    return pair


def close_atoms(positions, cell, threshold: float = PLAUSIBLE_DISTANCE) -> tuple[int, int, float] | None:
    """The closest pair of distinct atoms nearer than ``threshold`` Å (periodic images included), or
    ``None``: ``(i, j, distance)`` with ``i < j``. For a structure that passed :func:`validate`.

    The pair's distance is its minimum image in fractional coordinates, which is the closest image
    whenever the plane spacings are at least 2.5 ``threshold`` (1.25 Å here, see :func:`_closest_pair`);
    in thinner or very skewed cells a pair may be found at a longer image or missed, which only
    matters for this warning, never for :func:`validate`'s hard limit.
    """
    return _closest_pair(np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64), threshold)
