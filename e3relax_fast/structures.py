"""Conversion between structure objects and arrays, and validation of model inputs.

Three input types are supported: a pymatgen ``Structure`` (or ``IStructure``), an ASE ``Atoms``,
and an ``(atomic_numbers, positions, cell)`` triple of lists, NumPy arrays or torch tensors.
pymatgen and ASE are imported only when an object of theirs is passed, so the model and the
kernels import without them.

Conventions: positions are Cartesian in Å and never wrapped; a cell is ``(3, 3)`` with the lattice
vectors a, b, c as rows, in Å.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

#: Atomic numbers the model's element table accepts (spec §2: 118 rows indexed by Z, row 0 unused).
MIN_Z, MAX_Z = 1, 117
#: Atoms closer than this (Å), periodic images included, are reported as overlapping.
MIN_DISTANCE = 0.1
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


# --- type detection ----------------------------------------------------------------------------


def _library_of(obj) -> str | None:
    """``"pymatgen"`` or ``"ase"`` if ``obj``'s class (or a base) comes from that package."""
    for cls in type(obj).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in ("pymatgen", "ase"):
            return root
    return None


def _is_vector(x) -> bool:
    """A 1-D array or tensor, or a list/tuple of scalars (a candidate atomic-number list)."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 1
    return isinstance(x, (list, tuple)) and all(_library_of(v) is None and np.ndim(v) == 0 for v in x)


def structure_kind(obj) -> str | None:
    """``"pymatgen"``, ``"ase"`` or ``"triple"`` for a supported structure, else ``None``.

    A triple is a length-3 list/tuple whose first item is a 1-D list/array/tensor of atomic
    numbers (so a list of three structures is not taken for one). pymatgen and ASE are imported
    only if ``obj`` is one of their objects.
    """
    library = _library_of(obj)
    if library == "pymatgen":
        from pymatgen.core import IStructure

        return "pymatgen" if isinstance(obj, IStructure) else None
    if library == "ase":
        from ase import Atoms

        return "ase" if isinstance(obj, Atoms) else None
    if isinstance(obj, (list, tuple)) and len(obj) == 3 and _is_vector(obj[0]):
        return "triple"
    return None


# --- structure -> arrays -----------------------------------------------------------------------


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_shapes(z: np.ndarray, positions: np.ndarray, cell: np.ndarray, index: int | None) -> None:
    if z.ndim != 1:
        raise InvalidStructureError(index, f"atomic numbers must have shape (n,), got {z.shape}")
    if positions.shape != (len(z), 3):
        raise InvalidStructureError(
            index, f"positions must have shape (n, 3) = ({len(z)}, 3), got {positions.shape}"
        )
    if cell.shape != (3, 3):
        raise InvalidStructureError(index, f"cell must have shape (3, 3), got {cell.shape}")


def _triple_to_arrays(obj, index: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        z_raw = _as_numpy(obj[0])
        positions = _as_numpy(obj[1]).astype(np.float64)
        cell = _as_numpy(obj[2]).astype(np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidStructureError(index, f"cannot read (atomic_numbers, positions, cell): {err}") from err
    if z_raw.size and z_raw.dtype.kind not in "iuf":
        raise InvalidStructureError(index, f"atomic numbers must be integers, got dtype {z_raw.dtype}")
    if z_raw.dtype.kind == "f" and not np.array_equal(z_raw, np.round(z_raw)):
        raise InvalidStructureError(index, "atomic numbers must be integers, got non-integral values")
    z = z_raw.astype(np.int64)
    _check_shapes(z, positions, cell, index)
    return z, positions, cell


def _pymatgen_to_arrays(structure, index: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not structure.is_ordered:
        sites = [i for i, site in enumerate(structure) if not site.is_ordered]
        raise InvalidStructureError(
            index,
            f"disordered structure: {len(sites)} site(s) with partial occupancy or mixed species "
            f"(first: site {sites[0]}, {structure[sites[0]].species}); order it first, e.g. with "
            "pymatgen's OrderDisorderedStructureTransformation",
        )
    z = np.array([site.specie.Z for site in structure], dtype=np.int64)
    positions = np.array(structure.cart_coords, dtype=np.float64).reshape(-1, 3)
    cell = np.array(structure.lattice.matrix, dtype=np.float64)
    return z, positions, cell


def _ase_to_arrays(atoms, index: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if atoms.cell.rank < 3:
        raise InvalidStructureError(
            index,
            f"ASE Atoms without a full 3D cell (pbc={atoms.pbc.tolist()}, cell rank "
            f"{atoms.cell.rank}); every structure is treated as periodic in 3D, so give it a cell, "
            "e.g. atoms.center(vacuum=10.0)",
        )
    # ASE's CIF reader keeps one species per partially occupied site and records the real
    # occupancies here; relaxing that silently would relax a different compound.
    for kind, occupancy in (atoms.info.get("occupancy") or {}).items():
        if len(occupancy) != 1 or not np.isclose(sum(occupancy.values()), 1.0):
            raise InvalidStructureError(
                index,
                f"disordered structure: site kind {kind} has occupancy {dict(occupancy)} "
                "(ASE info['occupancy'])",
            )
    z = np.array(atoms.numbers, dtype=np.int64)
    positions = np.array(atoms.positions, dtype=np.float64).reshape(-1, 3)
    cell = np.array(atoms.cell.array, dtype=np.float64)
    return z, positions, cell


def to_arrays(structure, index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert one structure to arrays (no validation beyond types and shapes; see :func:`validate`).

    Args:
        structure: a pymatgen ``Structure``/``IStructure``, an ASE ``Atoms`` with a full 3D cell,
            or an ``(atomic_numbers, positions, cell)`` triple of lists, arrays or tensors.
        index: position of the structure in the caller's input, used in error messages.

    Periodic-boundary flags (ASE ``pbc``, pymatgen ``Lattice.pbc``) are not consulted: the model
    treats every structure as periodic in all three directions (spec §3.1).

    Returns:
        ``(z, positions, cell)``: ``(n,)`` int64 atomic numbers, ``(n, 3)`` float64 Cartesian
        positions in Å (as given, not wrapped), ``(3, 3)`` float64 cell in Å with the lattice
        vectors as rows.

    Raises:
        InvalidStructureError: unsupported type, disordered pymatgen/ASE sites, an ASE ``Atoms``
            without a 3D cell, or arrays of the wrong shape.
    """
    kind = structure_kind(structure)
    if kind == "pymatgen":
        return _pymatgen_to_arrays(structure, index)
    if kind == "ase":
        return _ase_to_arrays(structure, index)
    # Any other length-3 sequence is read as a triple so that shape problems are named precisely.
    if kind == "triple" or (
        isinstance(structure, (list, tuple)) and len(structure) == 3 and _library_of(structure[0]) is None
    ):
        return _triple_to_arrays(structure, index)
    raise InvalidStructureError(
        index,
        f"unsupported structure type {type(structure).__module__}.{type(structure).__qualname__}; "
        "expected a pymatgen Structure, an ASE Atoms or an (atomic_numbers, positions, cell) triple",
    )


# --- validation --------------------------------------------------------------------------------


def plane_spacings(cell: np.ndarray) -> np.ndarray:
    """``(3,)`` float64 distances in Å between the lattice planes spanned by (b, c), (c, a), (a, b).

    ``cell`` is ``(3, 3)`` in Å with lattice vectors as rows; a singular cell gives zeros.
    """
    cross = np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]])
    areas = np.linalg.norm(cross, axis=1)
    volume = abs(np.linalg.det(cell))
    return np.divide(volume, areas, out=np.zeros(3), where=areas > 0)


_PLANE_NAMES = ("b and c", "c and a", "a and b")
_OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int64)


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


def validate(z, positions, cell, index: int | None = None) -> None:
    """Check that one structure is a valid model input; raise on the first problem found.

    Args:
        z: ``(n,)`` integer atomic numbers.
        positions: ``(n, 3)`` Cartesian positions in Å.
        cell: ``(3, 3)`` cell in Å, rows = lattice vectors.
        index: position of the structure in the caller's input, used in error messages.

    Raises:
        InvalidStructureError: wrong shapes; no atoms; NaN/inf positions or cell; Z outside
            1..117; a singular cell; a degenerate cell (lattice planes closer than 0.5 Å); a
            left-handed cell (det < 0); two atoms closer than 0.1 Å, periodic images included.
    """
    z = np.asarray(z)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    _check_shapes(z, positions, cell, index)
    if len(z) == 0:
        raise InvalidStructureError(index, "empty structure (no atoms)")
    if not np.isfinite(cell).all():
        raise InvalidStructureError(index, "cell contains NaN or inf")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad):
        raise InvalidStructureError(
            index, f"positions contain NaN or inf ({len(bad)} atom(s), first: atom {bad[0]})"
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
    pair = _closest_pair(positions, cell, MIN_DISTANCE)
    if pair is not None:
        i, j, dist = pair
        raise InvalidStructureError(
            index,
            f"atoms {i} and {j} overlap: {dist:.4g} Å apart (minimum {MIN_DISTANCE} Å, "
            "periodic images included)",
        )


# --- arrays -> structure -----------------------------------------------------------------------


def from_arrays_like(template, positions, cell):
    """A copy of ``template`` with new positions and cell, of the same type as ``template``.

    Args:
        template: a structure accepted by :func:`to_arrays`, with ``n`` atoms.
        positions: ``(n, 3)`` Cartesian positions in Å (array or tensor), kept as given (not wrapped).
        cell: ``(3, 3)`` cell in Å, rows = lattice vectors (array or tensor).

    Returns:
        - pymatgen: a new structure of ``type(template)`` with the same species (oxidation states
          included), site order, site properties, labels, charge, properties and lattice ``pbc``.
        - ASE: ``template.copy()`` (numbers, info, arrays, pbc and constraints kept; calculator
          dropped) with the new cell and positions. Constraints are carried over but not applied:
          the positions are the prediction as is.
        - triple: ``(z (n,) int64, positions (n, 3) float64, cell (3, 3) float64)`` NumPy arrays.
    """
    positions = _as_numpy(positions).astype(np.float64).reshape(-1, 3)
    cell = _as_numpy(cell).astype(np.float64).reshape(3, 3)
    kind = structure_kind(template)
    if kind == "pymatgen":
        from pymatgen.core import Lattice

        if len(template) != len(positions):
            raise ValueError(f"template has {len(template)} sites but {len(positions)} positions given")
        return type(template)(
            Lattice(cell, pbc=template.lattice.pbc),
            [site.species for site in template],
            positions,
            charge=template.charge,
            coords_are_cartesian=True,
            site_properties=template.site_properties,
            labels=template.labels,
            properties=dict(template.properties),
        )
    if kind == "ase":
        if len(template) != len(positions):
            raise ValueError(f"template has {len(template)} atoms but {len(positions)} positions given")
        atoms = template.copy()
        atoms.set_cell(cell, scale_atoms=False)
        atoms.set_positions(positions, apply_constraint=False)
        return atoms
    z, template_positions, _ = to_arrays(template)
    if template_positions.shape != positions.shape:
        raise ValueError(f"template has {len(z)} atoms but {len(positions)} positions given")
    return z, positions, cell
