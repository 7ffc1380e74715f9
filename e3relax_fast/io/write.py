"""Writing structure files."""

from __future__ import annotations

from pathlib import Path

#: Output formats of the command line and their file suffixes.
FORMATS = {"cif": ".cif", "extxyz": ".extxyz"}


def write_structures(path: str | Path, structures: list, fmt: str) -> None:
    """Write ASE ``Atoms`` (several frames where the format allows) to ``path`` in ``fmt``."""
    from ase.io import write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, structures, format=fmt)
