"""Conversion between structure objects and arrays, and validation of model inputs.

Three input types are supported: a pymatgen ``Structure`` (or ``IStructure``), an ASE ``Atoms``,
and an ``(atomic_numbers, positions, cell)`` triple of lists, NumPy arrays or torch tensors.
pymatgen and ASE are imported only when an object of theirs is passed, so the model and the
kernels import without them.

Conventions: positions are Cartesian in Å and never wrapped; a cell is ``(3, 3)`` with the lattice
vectors a, b, c as rows, in Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .validate import InvalidStructureError, check_shapes

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
    check_shapes(z, positions, cell, index)
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
    if int(np.sum(atoms.pbc)) < 2:
        raise InvalidStructureError(
            index,
            f"a molecule or a wire (pbc={atoms.pbc.tolist()}): the model is for periodic crystals and slabs "
            "(at least two periodic axes)",
        )
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


# --- periodicity and constraints --------------------------------------------------------------


def periodicity(structure) -> np.ndarray:
    """``(3,)`` bool: which lattice vectors are periodic (ASE ``pbc``, pymatgen ``Lattice.pbc``; a
    triple is periodic along all three)."""
    kind = structure_kind(structure)
    if kind == "ase":
        return np.array(structure.pbc, dtype=bool)
    if kind == "pymatgen":
        return np.array(structure.lattice.pbc, dtype=bool)
    return np.ones(3, dtype=bool)


@dataclass
class Constraints:
    """What a structure's constraints fix in a prediction.

    cartesian: ``(n, 3)`` bool, components kept at their input Cartesian coordinates (ASE
        ``FixAtoms``, ``FixCartesian``); fractional: ``(n, 3)`` bool, components kept at their input
        fractional coordinates (pymatgen ``selective_dynamics`` False entries, VASP's convention);
        symmetry: ASE ``FixSymmetry`` is set (the input's symmetry must be kept).
    """

    cartesian: np.ndarray
    fractional: np.ndarray
    symmetry: bool = False

    @property
    def any(self) -> bool:
        return bool(self.cartesian.any() or self.fractional.any() or self.symmetry)


def constraints(structure, index: int | None = None) -> Constraints:
    """The constraints of one structure (none for a triple).

    Raises:
        InvalidStructureError: an ASE constraint other than ``FixAtoms``, ``FixCartesian`` and
            ``FixSymmetry`` (a one-shot prediction cannot honour it), or malformed
            ``selective_dynamics``.
    """
    kind = structure_kind(structure)
    n = len(structure) if kind in ("ase", "pymatgen") else len(_as_numpy(structure[0]))
    out = Constraints(np.zeros((n, 3), dtype=bool), np.zeros((n, 3), dtype=bool))
    if kind == "ase":
        for constraint in structure.constraints:
            name = type(constraint).__name__
            if name == "FixAtoms":
                out.cartesian[constraint.index] = True
            elif name == "FixCartesian":
                out.cartesian[constraint.index] |= np.asarray(constraint.mask, dtype=bool)
            elif name == "FixSymmetry":
                out.symmetry = True
            else:
                raise InvalidStructureError(
                    index, f"ASE constraint {name} cannot be honoured by a one-shot prediction (supported: "
                    "FixAtoms, FixCartesian, FixSymmetry); remove it or relax with a potential")
    elif kind == "pymatgen" and "selective_dynamics" in structure.site_properties:
        sites = structure.site_properties["selective_dynamics"]
        flags = np.array([[True, True, True] if f is None else f for f in sites])
        if flags.shape != (n, 3):
            raise InvalidStructureError(index, f"selective_dynamics must give 3 flags per site, got {flags.shape}")
        out.fractional = ~flags.astype(bool)  # VASP: True = free to move
    return out


# --- arrays -> structure -----------------------------------------------------------------------


def to_atoms(atomic_numbers, positions, cell, **info):
    """An ASE ``Atoms``, periodic in 3D, from ``(n,)`` Z, ``(n, 3)`` Cartesian positions and a
    ``(3, 3)`` cell in Å (rows = lattice vectors); ``info`` entries go to ``Atoms.info``."""
    from ase import Atoms

    return Atoms(numbers=_as_numpy(atomic_numbers), positions=_as_numpy(positions).reshape(-1, 3),
                 cell=_as_numpy(cell).reshape(3, 3), pbc=True, info=info)


def to_pymatgen(atomic_numbers, positions, cell):
    """A pymatgen ``Structure`` from ``(n,)`` Z, ``(n, 3)`` Cartesian positions and a ``(3, 3)``
    cell in Å (rows = lattice vectors)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(_as_numpy(cell).reshape(3, 3)), _as_numpy(atomic_numbers).tolist(),
                     _as_numpy(positions).reshape(-1, 3), coords_are_cartesian=True)


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
