"""Reading structure files: the one entry point every reader of the package goes through."""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import itertools
import lzma
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Compression suffix -> its opener.
_DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: Compression suffixes ASE reads through (``frames.extxyz.gz``).
COMPRESSION = tuple(_DECOMPRESS)
#: File names a folder is expanded to (:func:`structure_files`), by suffix (after any compression
#: suffix) or, for VASP, by name: formats whose files hold nothing but structures.
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".traj", ".db")
VASP_NAMES = ("POSCAR", "CONTCAR")
#: ASE formats whose files usually hold many structures: read frame by frame
#: (:func:`iter_structures`) and split into segments by the screening workflow.
MULTI_FRAME_FORMATS = ("extxyz", "traj", "db")


class UnreadableFileError(ValueError):
    """A structure file cannot be read; the message names the file (and the frame) and the parser's
    complaint, on one line.

    Attributes:
        frame: the index of the first frame that could not be read (``None``: the file as a whole).
    """

    def __init__(self, message: str, frame: int | None = None) -> None:
        super().__init__(message)
        self.frame = frame

    def __reduce__(self):  # keep the frame when pickled
        return (type(self), (str(self), self.frame))


def _reason(err: BaseException) -> str:
    """An exception's message on one line (its first line; the type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def split_name(path: Path) -> tuple[str, str]:
    """``(stem, suffix)`` of a structure file, any compression suffix dropped: ``frames.extxyz.gz`` ->
    ``("frames", ".extxyz")``, ``POSCAR`` -> ``("POSCAR", "")``."""
    name = path.name
    for compression in COMPRESSION:
        if name.lower().endswith(compression):
            name = name[: -len(compression)]
            break
    stem, dot, suffix = name.rpartition(".")
    return (stem, dot + suffix) if stem else (name, "")


def file_format(path: str | Path) -> str | None:
    """ASE's name for the format of ``path``, guessed from its name alone (``"cif"``, ``"vasp"``,
    ``"extxyz"``, ``"traj"``, ``"db"``, ...; ``.xyz`` is read as ``"extxyz"``); ``None`` when the name
    says nothing."""
    from ase.io.formats import UnknownFileTypeError, filetype

    try:
        return filetype(str(path), read=False)
    except UnknownFileTypeError:
        return None


def is_structure_file(path: Path) -> bool:
    """A file a folder is expanded to: a suffix of :data:`STRUCTURE_SUFFIXES` or a VASP name."""
    stem, suffix = split_name(path)
    return suffix.lower() in STRUCTURE_SUFFIXES or any(stem.startswith(name) for name in VASP_NAMES)


def structure_files(folder: Path) -> list[Path]:
    """The structure files in ``folder`` and its sub-folders (:func:`is_structure_file`), sorted;
    hidden files and folders are left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and is_structure_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UnreadableFileError(f"cannot read {path}: it is a folder (give the files in it, or pass the folder to "
                                  "the relax command, which reads every structure file inside)")
    if not path.exists():
        raise UnreadableFileError(f"cannot read {path}: no such file")


def read_structures(path: str | Path) -> list:
    """Every structure in ``path`` as ASE ``Atoms`` (multi-frame files give several).

    ASE reads the file (format guessed from the name); if it cannot, pymatgen's
    ``Structure.from_file`` is tried. A ``.csv`` file is read as a table whose ``cif`` column holds
    one CIF text per row (the CDVAE datasets' format); each frame's ``info["row"]`` is then the row,
    without the CIF. Raises :class:`UnreadableFileError` naming the file when it cannot be read.
    """
    import ase.io

    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".csv":
        return _read_cif_table(path)
    try:
        with warnings.catch_warnings():  # parsers warn about what they then fail on: one message is enough
            warnings.simplefilter("ignore")
            source, fmt = _in_memory(path)
            frames = list(ase.io.read(source, index=":", format=fmt))
    # Parsers raise many exception types on malformed or unknown files; all mean "unreadable".
    except Exception as ase_error:
        try:
            from pymatgen.core import Structure
            from pymatgen.io.ase import AseAtomsAdaptor

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = [AseAtomsAdaptor.get_atoms(Structure.from_file(path))]
        except Exception:
            raise UnreadableFileError(f"cannot read {path}: {_reason(ase_error)}") from ase_error
    if not frames:
        raise UnreadableFileError(f"cannot read {path}: no structures in the file")
    return frames


def _compressed_text(path: Path) -> tuple | None:
    """``(opener, ASE format)`` of a compressed file in a text format ASE reads from a stream, or
    ``None`` (not compressed, a binary format, or a name ASE cannot place: ASE reads those itself)."""
    opener = _DECOMPRESS.get(path.suffix.lower())
    if opener is None:
        return None
    from ase.io.formats import filetype, ioformats

    try:
        fmt = filetype(path, read=False)  # from the name, the compression suffix set aside
    except Exception:
        return None
    spec = ioformats.get(fmt)
    if spec is None or spec.isbinary or not spec.acceptsfd:
        return None
    return opener, fmt


def _in_memory(path: Path) -> tuple:
    """``(source, format)`` for ``ase.io.read``: a compressed text file decompressed once into
    memory with its format named (ASE's extxyz reader seeks back to every frame, and each seek in a
    compressed stream decompresses it again from the start: reading the 2,456 training pairs of
    ``chgnet_v4d`` took 53 s, most of it in zlib); any other file as its path, format guessed."""
    compressed = _compressed_text(path)
    if compressed is None:
        return path, None
    opener, fmt = compressed
    with opener(path, "rt") as f:
        return io.StringIO(f.read()), fmt


def iter_structures(path: str | Path) -> Iterator:
    """The structures of a multi-frame file (:data:`MULTI_FRAME_FORMATS`), one at a time, as ASE
    ``Atoms``: a file of millions of frames is never held in memory.

    Raises:
        UnreadableFileError: naming the file and the first frame that cannot be read (its
            ``frame``); the frames before it have been yielded.
    """
    import ase.io

    path = Path(path)
    _check_file(path)
    frames = _compressed_xyz_frames(path) or ase.io.iread(path, index=":")
    k = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                atoms = next(frames)
        except StopIteration:
            break
        except Exception as err:  # as in read_structures: any parser failure means "unreadable"
            raise UnreadableFileError(f"cannot read {path}: frame {k}: {_reason(err)}", frame=k) from err
        yield atoms
        k += 1
    if k == 0:
        raise UnreadableFileError(f"cannot read {path}: no structures in the file", frame=0)


def _compressed_xyz_frames(path: Path) -> Iterator | None:
    """The frames of a compressed (ext)xyz file in one pass over the stream, or ``None`` for any other
    file. ASE's reader seeks back to every frame, and each seek in a compressed stream decompresses it
    again from the start: quadratic in the file (2,456 frames of a .extxyz.gz took 26 s instead of 0.6)."""
    compressed = _compressed_text(path)
    if compressed is None or compressed[1] not in ("extxyz", "xyz"):
        return None
    return _xyz_frames(*compressed, path)


def _xyz_frames(opener, fmt: str, path: Path) -> Iterator:
    """Each frame of an (ext)xyz text stream (an atom count, a comment line, one line per atom) parsed
    by ASE on its own; a bad count or a short frame raises as ASE's parser would."""
    import ase.io

    with opener(path, "rt") as f:
        while True:
            count = f.readline()
            if not count:
                return
            if not count.strip():  # blank lines between or after frames
                continue
            lines = [count, f.readline()] + [f.readline() for _ in range(int(count))]
            yield ase.io.read(io.StringIO("".join(lines)), format=fmt)


def read_frames(path: str | Path, start: int, stop: int) -> Iterator:
    """Frames ``start`` to ``stop - 1`` of a multi-frame file, one at a time (ASE ``Atoms``); a
    compressed (ext)xyz file in one pass over its stream, as :func:`iter_structures`."""
    import ase.io

    path = Path(path)
    streamed = _compressed_xyz_frames(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if streamed is not None:
            with contextlib.closing(streamed):  # the file is closed when the range ends, not at collection
                yield from itertools.islice(streamed, start, stop)
        else:
            yield from ase.io.iread(path, index=f"{start}:{stop}")


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
            raise UnreadableFileError(f"cannot read {path}: row {k}: {_reason(err)}", frame=k) from err
        atoms.info["row"] = {key: value for key, value in row.items() if key != "cif"}
        frames.append(atoms)
    return frames


__all__ = ["MULTI_FRAME_FORMATS", "UnreadableFileError", "file_format", "is_structure_file", "iter_structures",
           "read_cif_text", "read_frames", "read_structure", "read_structures", "split_name", "structure_files"]
