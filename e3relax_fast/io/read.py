"""Reading structure files: the one entry point every reader of the package goes through."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path


class UnreadableFileError(ValueError):
    """A structure file cannot be read; the message names the file and the parser's complaint."""


def read_structures(path: str | Path) -> list:
    """Every structure in ``path`` as ASE ``Atoms`` (multi-frame files give several).

    ASE reads the file (format guessed from the name); if it cannot, pymatgen's
    ``Structure.from_file`` is tried. A ``.csv`` file is read as a table whose ``cif`` column holds
    one CIF text per row (the CDVAE datasets' format); each frame's ``info["row"]`` is then the row,
    without the CIF. Raises :class:`UnreadableFileError` naming the file when it cannot be read.
    """
    import ase.io

    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_cif_table(path)
    try:
        frames = list(ase.io.read(path, index=":"))
    # Parsers raise many exception types on malformed or unknown files; all mean "unreadable".
    except Exception as ase_error:
        try:
            from pymatgen.core import Structure
            from pymatgen.io.ase import AseAtomsAdaptor

            frames = [AseAtomsAdaptor.get_atoms(Structure.from_file(path))]
        except Exception:
            reason = str(ase_error) or type(ase_error).__name__
            raise UnreadableFileError(f"cannot read {path}: {reason}") from ase_error
    if not frames:
        raise UnreadableFileError(f"cannot read {path}: no structures in the file")
    return frames


def read_structure(path: str | Path):
    """The single structure in ``path`` (the first frame of a multi-frame file) as ASE ``Atoms``."""
    return read_structures(path)[0]


def read_cif_text(text: str):
    """One CIF given as text, as ASE ``Atoms``."""
    from ase.io import read

    return read(io.StringIO(text), format="cif")


def _read_cif_table(path: Path) -> list:
    csv.field_size_limit(sys.maxsize)  # CIF texts are longer than the csv module's default limit
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "cif" not in rows[0]:
        raise UnreadableFileError(f"cannot read {path}: a .csv needs a 'cif' column")
    frames = []
    for k, row in enumerate(rows):
        try:
            atoms = read_cif_text(row["cif"])
        except Exception as err:  # as above: any parser failure means this row is unreadable
            raise UnreadableFileError(f"cannot read {path}: row {k}: {err or type(err).__name__}") from err
        atoms.info["row"] = {key: value for key, value in row.items() if key != "cif"}
        frames.append(atoms)
    return frames


__all__ = ["UnreadableFileError", "read_cif_text", "read_structure", "read_structures"]
