"""Writing structure files: whole files at once, replaced atomically (a crash never leaves half a file
where a finished one is expected)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: Output formats of the command line and the suffixes of the files they write.
FORMATS = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz", "traj": ".traj", "db": ".db"}
#: Formats whose files hold one structure (several structures need several files).
SINGLE_STRUCTURE_FORMATS = ("poscar",)
#: ASE's format names of :data:`FORMATS`.
_ASE_NAMES = {"cif": "cif", "poscar": "vasp", "extxyz": "extxyz", "traj": "traj", "db": "db"}
#: ``Atoms.info`` entries an ASE database row keeps as key-value pairs.
DB_KEYS = ("relax_status", "relax_error", "uncertainty")


def output_format(ase_format: str | None) -> str:
    """The output format matching an input file's ASE format: CIF stays CIF, VASP files POSCAR,
    trajectories and databases keep theirs; everything else becomes extxyz (it keeps ``info``)."""
    return {"cif": "cif", "vasp": "poscar", "traj": "traj", "db": "db"}.get(ase_format or "", "extxyz")


def write_structures(path: str | Path, structures: Iterable, fmt: str) -> None:
    """Write ASE ``Atoms`` (an iterable, consumed as written) to ``path`` in ``fmt`` (a key of
    :data:`FORMATS`), replacing any file there only once the new one is complete. Several structures
    need a format that holds several (not :data:`SINGLE_STRUCTURE_FORMATS`). A database row keeps the
    :data:`DB_KEYS` of ``info``."""
    from ase.io import write

    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt in SINGLE_STRUCTURE_FORMATS:
        structures = list(structures)
        if len(structures) != 1:
            raise ValueError(f"{fmt} holds one structure per file, got {len(structures)}")
        structures = structures[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    if fmt == "db":
        from ase.db import connect

        with connect(str(partial), type="db") as db:
            for atoms in structures:
                db.write(atoms, key_value_pairs={k: atoms.info[k] for k in DB_KEYS if k in atoms.info})
    else:
        write(partial, structures, format=_ASE_NAMES[fmt])  # a generator is written as it comes
    os.replace(partial, path)
