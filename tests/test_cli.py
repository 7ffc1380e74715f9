"""The ``e3relax-fast relax`` command on example files with a tiny saved model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from e3relax_fast.cli import main
from e3relax_fast.model import E3Relax, pretrained

ase_io = pytest.importorskip("ase.io")
pmg = pytest.importorskip("pymatgen.core")
from ase.build import bulk  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "config": model.config}, path)
    return str(path)


def test_relax_example_cif(tmp_path, checkpoint, capsys):
    source = EXAMPLES / "NaCl_rocksalt.cif"
    status = main(["relax", str(source), "-o", str(tmp_path / "out"), "--checkpoint", checkpoint])
    assert status == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("relaxed 1 of 1 structure(s) from 1 of 1 file(s)")

    written = tmp_path / "out" / "NaCl_rocksalt_relaxed.cif"
    before = pmg.Structure.from_file(source)
    after = pmg.Structure.from_file(written)  # parses with pymatgen ...
    frames = ase_io.read(written, index=":")  # ... and with ASE
    assert len(frames) == 1
    assert [str(s.specie) for s in after] == [str(s.specie) for s in before]
    assert np.isfinite(after.lattice.matrix).all() and abs(after.volume / before.volume - 1) < 0.5


def test_multi_frame_file_with_a_bad_frame_and_an_unreadable_file(tmp_path, checkpoint, capsys):
    good = bulk("Cu", "fcc", a=3.6)
    bad = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    bad.positions[1] = bad.positions[0] + [0.0, 0.0, 0.05]
    ase_io.write(tmp_path / "frames.extxyz", [good, bad, bulk("Si", "diamond", a=5.43)], format="extxyz")
    (tmp_path / "broken.cif").write_text("this is not a crystal file\n")
    shutil.copy(EXAMPLES / "ZnO_wurtzite.cif", tmp_path)

    args = ["relax", *(str(tmp_path / n) for n in ("frames.extxyz", "broken.cif", "ZnO_wurtzite.cif"))]
    status = main([*args, "--checkpoint", checkpoint, "--on-error", "skip", "--format", "extxyz"])
    assert status == 0
    captured = capsys.readouterr()
    assert "broken.cif" in captured.err
    assert "frames.extxyz (structure 1): atoms 0 and 1 overlap" in captured.err
    assert "relaxed 3 of 4 structure(s) from 2 of 3 file(s)" in captured.out

    frames = ase_io.read(tmp_path / "frames_relaxed.extxyz", index=":")
    assert [f.get_chemical_formula() for f in frames] == ["Cu", "Si2"]
    zno = ase_io.read(tmp_path / "ZnO_wurtzite_relaxed.extxyz", index=":")
    assert len(zno) == 1 and zno[0].get_chemical_formula() == "O2Zn2"
    assert not (tmp_path / "broken_relaxed.extxyz").exists()

    # Without --on-error skip the first problem stops the run.
    assert main([*args, "--checkpoint", checkpoint]) == 1
    assert "error:" in capsys.readouterr().err


def test_missing_pretrained_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "_bundled_path", lambda name: tmp_path / f"{name}.pt")
    assert main(["relax", str(EXAMPLES / "Si_diamond.cif"), "-o", str(tmp_path)]) == 2
    assert "no pretrained E3Relax model" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "relax" in capsys.readouterr().err
