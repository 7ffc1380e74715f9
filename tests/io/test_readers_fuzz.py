"""Readers on truncated and garbled CIF, POSCAR and extxyz files: structures, or an UnreadableFileError
naming the file; never another exception, never a hang. Whatever is read then validates or is refused
with an InvalidStructureError."""

from __future__ import annotations

import gzip
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from e3relax_fast.io import (
    InvalidStructureError,
    UnreadableFileError,
    iter_structures,
    read_structures,
    to_arrays,
    validate,
)

hypothesis = pytest.importorskip("hypothesis")
ase_io = pytest.importorskip("ase.io")
from ase.build import bulk  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def texts(tmp: Path) -> dict[str, str]:
    """A valid file of each kind, as text, keyed by its suffix."""
    ase_io.write(tmp / "frames.extxyz", [bulk("Cu", "fcc", a=3.6), bulk("Si", "diamond", a=5.43) * (1, 1, 2)])
    ase_io.write(tmp / "POSCAR", bulk("NaCl", "rocksalt", a=5.64), format="vasp")
    return {".cif": (EXAMPLES / "ZnO_wurtzite.cif").read_text(), ".extxyz": (tmp / "frames.extxyz").read_text(),
            "POSCAR": (tmp / "POSCAR").read_text()}


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (POSIX alarm; the suite runs on Linux)."""
    def expired(signum, frame):
        raise AssertionError(f"reader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_refuse(path: Path) -> None:
    with time_limit(20):
        try:
            frames = read_structures(path)
        except UnreadableFileError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        if path.suffix == ".extxyz":  # the frame-by-frame reader agrees with the whole-file one
            assert len(list(iter_structures(path))) == len(frames)
    for k, atoms in enumerate(frames):
        try:
            validate(*to_arrays(atoms, index=k), index=k)
        except InvalidStructureError:
            pass


def mangle(text: str, data) -> str:
    """Cut the text short, drop or duplicate lines, or overwrite characters."""
    how = data.draw(st.sampled_from(["truncate", "lines", "bytes"]))
    if how == "truncate":
        return text[: data.draw(st.integers(0, len(text)))]
    lines = text.splitlines(keepends=True)
    if how == "lines":
        for _ in range(data.draw(st.integers(1, 4))):
            k = data.draw(st.integers(0, max(len(lines) - 1, 0)))
            if lines:
                lines[k:k + 1] = data.draw(st.sampled_from([[], [lines[k]] * 2, ["garbage 1 2 x\n"]]))
        return "".join(lines)
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 12))):
        if chars:
            chars[data.draw(st.integers(0, len(chars) - 1))] = data.draw(
                st.sampled_from(list("0123456789.-eE \n_#'\"xQ")))
    return "".join(chars)


@pytest.mark.parametrize("kind", [".cif", "POSCAR", ".extxyz"])
@FUZZ
@given(data=st.data())
def test_mangled_files_are_read_or_refused_by_name(tmp_path, kind, data):
    text = mangle(texts(tmp_path)[kind], data)
    path = tmp_path / ("POSCAR_fuzz" if kind == "POSCAR" else f"fuzz{kind}")
    path.write_text(text)
    read_or_refuse(path)


def test_truncated_gzip_and_folders_are_named(tmp_path):
    """Before: a truncated .extxyz.gz gave a message without the file; a folder, 'Not a BundleTrajectory'."""
    ase_io.write(tmp_path / "frames.extxyz", [bulk("Cu", "fcc", a=3.6)] * 20)
    data = gzip.compress((tmp_path / "frames.extxyz").read_bytes())
    (tmp_path / "frames.extxyz.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match=r"frames.extxyz.gz: .*(end-of-stream|ended)"):
        read_structures(tmp_path / "frames.extxyz.gz")
    read = []
    with pytest.raises(UnreadableFileError, match=r"frames.extxyz.gz: frame \d+") as info:
        read.extend(iter_structures(tmp_path / "frames.extxyz.gz"))
    assert info.value.frame == len(read) < 20  # the frames before it were yielded
    with pytest.raises(UnreadableFileError, match=f"cannot read {tmp_path}: it is a folder"):
        read_structures(tmp_path)
    with pytest.raises(UnreadableFileError, match="no such file"):
        read_structures(tmp_path / "missing.cif")
