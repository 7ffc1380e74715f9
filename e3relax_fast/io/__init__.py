"""Everything that touches pymatgen and ASE: converting structures to arrays and back
(:mod:`.structures`), validating model inputs (:mod:`.validate`), reading and writing structure files
(:mod:`.read`, :mod:`.write`), pair datasets on disk (:mod:`.pairs`) and structure matching
(:mod:`.compare`). pymatgen and ASE are imported only when used."""

from .original import original_reserved_slots
from .pairs import SPLITS, Pair, read_pairs, write_extxyz_pairs
from .read import (
    MULTI_FRAME_FORMATS,
    UnreadableFileError,
    file_format,
    iter_structures,
    read_frames,
    read_structure,
    read_structures,
    split_name,
    structure_files,
)
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
from .validate import InvalidStructureError, close_atoms, validate
from .write import FORMATS, SINGLE_STRUCTURE_FORMATS, output_format, write_structures

__all__ = ["FORMATS", "MULTI_FRAME_FORMATS", "SINGLE_STRUCTURE_FORMATS", "SPLITS", "Constraints",
           "InvalidStructureError", "Pair", "UnreadableFileError", "close_atoms", "constraints", "file_format",
           "from_arrays_like", "iter_structures", "original_reserved_slots", "output_format", "periodicity",
           "read_frames", "read_pairs", "read_structure", "read_structures", "split_name", "structure_files",
           "structure_kind", "to_arrays", "to_atoms", "to_pymatgen", "validate", "write_extxyz_pairs",
           "write_structures"]
