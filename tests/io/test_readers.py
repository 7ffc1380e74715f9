"""Reading and writing training pairs (unrelaxed, relaxed) in the three dataset formats: extxyz,
an ASE database, and the original's CIF folder with split CSVs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import denoising_pairs

from e3relax_fast.io import read_pairs, write_extxyz_pairs


def test_extxyz_pairs_round_trip(tmp_path):
    pairs = denoising_pairs(5, 2)
    write_extxyz_pairs(pairs, tmp_path, "train")
    back = read_pairs(tmp_path, "train")
    assert [p.id for p in back] == [p.id for p in pairs]
    for a, b in zip(pairs, back, strict=True):
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        for field in ("pos_unrelaxed", "cell_unrelaxed", "pos_relaxed", "cell_relaxed"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-8)


def test_ase_db_and_cif_folder_readers(tmp_path):
    """The other two dataset formats read back the same pairs."""
    from ase import Atoms
    from ase.db import connect
    from ase.io import write

    pairs = denoising_pairs(4, 6)
    db = connect(str(tmp_path / "pairs.db"))
    for k, p in enumerate(pairs):
        atoms = Atoms(numbers=p.atomic_numbers, positions=p.pos_unrelaxed, cell=p.cell_unrelaxed, pbc=True)
        db.write(atoms, atoms_id=p.id, split="train" if k < 3 else "val",
                 data={"pos_relaxed": p.pos_relaxed, "cell_relaxed": p.cell_relaxed})
    (tmp_path / "CIF").mkdir()
    for p in pairs:  # the original's MP naming: CIF/<id>_U.cif / CIF/<id>_R.cif, ids in column mp_id
        for tag, pos, cell in (("U", p.pos_unrelaxed, p.cell_unrelaxed), ("R", p.pos_relaxed, p.cell_relaxed)):
            write(tmp_path / "CIF" / f"{p.id}_{tag}.cif", Atoms(numbers=p.atomic_numbers, positions=pos, cell=cell,
                                                                  pbc=True))
    (tmp_path / "train.csv").write_text("mp_id\n" + "\n".join(p.id for p in pairs[:3]) + "\n")
    for source in (tmp_path / "pairs.db", tmp_path):
        back = read_pairs(source, "train")
        assert [p.id for p in back] == [p.id for p in pairs[:3]]
        for a, b in zip(pairs, back, strict=False):
            np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
            # CIF stores cell parameters, so compare frame-independent quantities there.
            np.testing.assert_allclose(np.linalg.det(b.cell_relaxed), np.linalg.det(a.cell_relaxed), rtol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(b.pos_relaxed - b.pos_relaxed[:1], axis=1),
                                       np.linalg.norm(a.pos_relaxed - a.pos_relaxed[:1], axis=1), atol=1e-5)


def test_compressed_multi_frame_files_read_as_the_uncompressed_ones(tmp_path):
    """A compressed text file is decompressed once (ASE's extxyz reader seeks back to every frame,
    and each seek in a gzip stream decompressed it again from the start); frames and their info
    are the same as from the plain file, for every compression."""
    import bz2
    import gzip
    import lzma

    import ase.io

    from e3relax_fast.io.read import (
        UnreadableFileError,
        _compressed_xyz_frames,
        _in_memory,
        iter_structures,
        read_frames,
        read_structures,
    )

    frames = [ase.Atoms(pair.atomic_numbers, pair.pos_unrelaxed, cell=pair.cell_unrelaxed, pbc=True,
                        info={"id": pair.id}) for pair in denoising_pairs(30, 3)]
    plain = tmp_path / "frames.extxyz"
    ase.io.write(plain, frames, format="extxyz")
    want = read_structures(plain)
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        packed = tmp_path / f"frames.extxyz{suffix}"
        with opener(packed, "wb") as f:
            f.write(plain.read_bytes())
        assert _in_memory(packed)[1] == "extxyz" and _compressed_xyz_frames(packed) is not None
        for got in (read_structures(packed), list(iter_structures(packed))):  # all at once; streamed in one pass
            assert [a.info["id"] for a in got] == [a.info["id"] for a in want] == [p.id for p in denoising_pairs(30, 3)]
            for a, b in zip(got, want, strict=True):
                assert np.array_equal(a.numbers, b.numbers) and np.array_equal(a.positions, b.positions)
                assert np.array_equal(a.cell.array, b.cell.array)
        # a range of frames (what assembling an output's parts reads), streamed too
        got = list(read_frames(packed, 4, 9))
        assert [a.info["id"] for a in got] == [a.info["id"] for a in want[4:9]]
        assert all(np.array_equal(a.positions, b.positions) for a, b in zip(got, want[4:9], strict=True))
    assert _in_memory(plain) == (plain, None) and _compressed_xyz_frames(plain) is None
    # A bad atom count in frame 2 of a streamed file: frames 0 and 1 come out, then the frame is named.
    lines = plain.read_text().splitlines(keepends=True)
    start = 0
    for _ in range(2):  # frames have their own sizes: walk to frame 2's count line
        start += int(lines[start]) + 2
    lines[start] = "two\n"
    with gzip.open(tmp_path / "bad.extxyz.gz", "wt") as f:
        f.write("".join(lines))
    streamed = []
    with pytest.raises(UnreadableFileError, match=r"bad.extxyz.gz: frame 2") as info:
        streamed.extend(iter_structures(tmp_path / "bad.extxyz.gz"))
    assert info.value.frame == len(streamed) == 2
