"""Everything that touches pymatgen and ASE: converting structures to arrays and back
(:mod:`.structures`), validating model inputs (:mod:`.validate`), reading and writing structure files
(:mod:`.read`, :mod:`.write`), pair datasets on disk (:mod:`.pairs`) and structure matching
(:mod:`.compare`). pymatgen and ASE are imported only when used."""

from .pairs import SPLITS, Pair, read_pairs, write_extxyz_pairs
from .read import UnreadableFileError, read_structure, read_structures
from .structures import (
    Constraints,
    constraints,
    from_arrays_like,
    periodicity,
    structure_kind,
    to_arrays,
    to_atoms,
    to_pymatgen,
)
from .validate import InvalidStructureError, validate
from .write import FORMATS, write_structures

__all__ = ["FORMATS", "SPLITS", "Constraints", "InvalidStructureError", "Pair", "UnreadableFileError", "constraints",
           "from_arrays_like", "periodicity", "read_pairs", "read_structure", "read_structures", "structure_kind",
           "to_arrays", "to_atoms", "to_pymatgen", "validate", "write_extxyz_pairs", "write_structures"]
