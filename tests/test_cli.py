"""The ``e3relax-fast relax`` command with a tiny saved model: input kinds, formats, frame alignment,
--on-error modes and exit codes, the summary and the manifest, resume after a kill, torchrun, and a
one-line message (never a traceback) for every usage error."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from e3relax_fast import screen as screen_module
from e3relax_fast.cli import main
from e3relax_fast.model import E3Relax, pretrained

ase_io = pytest.importorskip("ase.io")
pmg = pytest.importorskip("pymatgen.core")
from ase.build import bulk  # noqa: E402
from ase.db import connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CIFS = sorted(EXAMPLES.glob("*.cif"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """The default manifest (./manifest.jsonl) lands in the test's folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "config": model.config}, path)
    return str(path)


def relax(*args, checkpoint) -> int:
    return main(["relax", *map(str, args), "--checkpoint", checkpoint])


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def overlapping() -> object:
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.positions[1] = atoms.positions[0] + [0.0, 0.0, 0.05]
    return atoms


def test_cif_in_cif_out_with_progress_summary_and_manifest(tmp_path, checkpoint, capsys):
    source = EXAMPLES / "NaCl_rocksalt.cif"
    assert relax(source, "-o", tmp_path / "out", checkpoint=checkpoint) == 0
    captured = capsys.readouterr()
    assert "structures/s" in captured.err  # the progress bar
    summary = captured.out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("relaxed 1 structure(s) from 1 file(s) in ")
    assert "0 failed" in summary[0] and f"manifest {tmp_path / 'out' / 'manifest.jsonl'}" in summary[0]

    written = tmp_path / "out" / "NaCl_rocksalt_relaxed.cif"
    before, after = pmg.Structure.from_file(source), pmg.Structure.from_file(written)
    assert len(ase_io.read(written, index=":")) == 1
    assert [str(s.specie) for s in after] == [str(s.specie) for s in before]
    assert np.isfinite(after.lattice.matrix).all() and abs(after.volume / before.volume - 1) < 0.5
    (line,) = manifest(tmp_path / "out" / "manifest.jsonl")
    assert line["input"] == str(source) and line["frame"] == 0 and line["output"] == str(written)
    assert line["status"] == "relaxed" and line["reason"] is None and line["seconds"] > 0


def test_poscar_stays_poscar(tmp_path, checkpoint):
    """Before: a POSCAR's prediction was written as extxyz."""
    ase_io.write(tmp_path / "POSCAR", bulk("NaCl", "rocksalt", a=5.64), format="vasp")
    assert relax(tmp_path / "POSCAR", checkpoint=checkpoint) == 0
    out = tmp_path / "POSCAR_relaxed"
    assert out.read_text().splitlines()[5].split() == ["Na", "Cl"]  # VASP 5 species line
    assert ase_io.read(out, format="vasp").get_chemical_formula() == "ClNa"
    assert relax(tmp_path / "POSCAR", "--format", "extxyz", "--manifest", tmp_path / "m2.jsonl",
                 checkpoint=checkpoint) == 0
    assert ase_io.read(tmp_path / "POSCAR_relaxed.extxyz", format="extxyz").get_chemical_formula() == "ClNa"
    # POSCAR holds one structure: a multi-frame input gets one file per frame, none for a failed one.
    ase_io.write(tmp_path / "frames.extxyz", [bulk("Cu", "fcc", a=3.6), overlapping(), bulk("Si", "diamond", a=5.43)])
    assert relax(tmp_path / "frames.extxyz", "--format", "poscar", "--on-error", "skip", "--manifest",
                 tmp_path / "m3.jsonl", checkpoint=checkpoint) == 0
    written = sorted(p.name for p in tmp_path.glob("frames_relaxed*"))
    assert written == ["frames_relaxed_0.vasp", "frames_relaxed_2.vasp"]
    assert ase_io.read(tmp_path / "frames_relaxed_2.vasp").get_chemical_formula() == "Si2"


def test_folders_and_globs(tmp_path, checkpoint, capsys):
    """Before: a folder as input ended in 'Not a BundleTrajectory'."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for cif in CIFS[:3]:
        shutil.copy(cif, data)
    shutil.copy(CIFS[3], data / "sub")
    (data / "README.md").write_text("not a structure\n")
    assert relax(data, "-o", tmp_path / "out", checkpoint=checkpoint) == 0
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.cif"))
    assert written == sorted([Path(f"{c.stem}_relaxed.cif") for c in CIFS[:3]]
                             + [Path("sub") / f"{CIFS[3].stem}_relaxed.cif"])
    assert len(manifest(tmp_path / "out" / "manifest.jsonl")) == 4
    # Outputs written next to the inputs are not inputs of the next run on the folder.
    assert relax(data, checkpoint=checkpoint) == 0
    assert "relaxed 4 structure(s) from 4 file(s)" in capsys.readouterr().out
    assert relax(f"{data}/*.cif", "-o", tmp_path / "globbed", checkpoint=checkpoint) == 0
    assert len(list((tmp_path / "globbed").glob("*_relaxed.cif"))) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert relax(empty, checkpoint=checkpoint) == 2
    assert capsys.readouterr().err.strip() == f"error: {empty}: no structure files in this folder (looked for CIF, " \
        "POSCAR/CONTCAR/*.vasp, extxyz/xyz, ASE .traj and .db files, also compressed)"


def test_multi_frame_file_keeps_frames_aligned(tmp_path, checkpoint, capsys):
    """Before: with --on-error skip the frames after a bad one were written shifted up."""
    frames = [bulk("Cu", "fcc", a=3.6), overlapping(), bulk("Si", "diamond", a=5.43)]
    ase_io.write(tmp_path / "frames.extxyz", frames, format="extxyz")
    assert relax(tmp_path / "frames.extxyz", "--on-error", "skip", "--chunk", "2", checkpoint=checkpoint) == 0
    captured = capsys.readouterr()
    assert "error: " + str(tmp_path / "frames.extxyz") + " (frame 1): atoms 0 and 1 overlap" in captured.err
    assert "relaxed 2 structure(s) from 1 file(s)" in captured.out and "1 failed" in captured.out
    out = ase_io.read(tmp_path / "frames_relaxed.extxyz", index=":")
    assert [a.get_chemical_formula() for a in out] == ["Cu", "Cu2", "Si2"]
    assert [a.info["relax_status"] for a in out] == ["relaxed", "failed", "relaxed"]
    assert "overlap" in out[1].info["relax_error"]
    np.testing.assert_array_equal(out[1].positions, frames[1].positions)  # the input, as given
    assert not list(tmp_path.glob(".frames_relaxed.extxyz.frames*"))  # the parts are gone
    lines = manifest(tmp_path / "manifest.jsonl")
    assert [(line["frame"], line["status"]) for line in lines] == [(0, "relaxed"), (1, "failed"), (2, "relaxed")]


def test_ase_database_rows_stay_aligned(tmp_path, checkpoint):
    with connect(tmp_path / "candidates.db") as db:
        for atoms in (bulk("Cu", "fcc", a=3.6), overlapping(), bulk("Si", "diamond", a=5.43)):
            db.write(atoms)
    assert relax(tmp_path / "candidates.db", "--on-error", "skip", checkpoint=checkpoint) == 0
    rows = list(connect(tmp_path / "candidates_relaxed.db").select())
    assert [row.formula for row in rows] == ["Cu", "Cu2", "Si2"]
    assert [row.relax_status for row in rows] == ["relaxed", "failed", "relaxed"]


@pytest.mark.parametrize(("on_error", "status"), [("raise", 1), ("skip", 0), ("return_input", 1)])
def test_on_error_modes_and_exit_codes(tmp_path, checkpoint, capsys, on_error, status):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(CIFS[0], inputs / "a.cif")
    ase_io.write(inputs / "b_overlap.cif", overlapping())
    (inputs / "c_broken.cif").write_text("data_x\n_cell_length_a 4\n_cell_length_b\nloop_\n_atom_site_label\nNa 0.1\n")
    shutil.copy(CIFS[1], inputs / "d.cif")
    assert relax(inputs, "-o", tmp_path / "out", "--on-error", on_error, "--chunk", "1",
                 checkpoint=checkpoint) == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"error: {inputs / 'b_overlap.cif'} (frame 0): atoms 0 and 1 overlap" in captured.err
    written = sorted(p.name for p in (tmp_path / "out").glob("*.cif"))
    lines = {(Path(line["input"]).name, line["status"]) for line in manifest(tmp_path / "out" / "manifest.jsonl")}
    if on_error == "raise":  # stopped after the chunk of the first failure
        assert written == ["a_relaxed.cif"] and "stopped at the first failure" in captured.out
        assert lines == {("a.cif", "relaxed"), ("b_overlap.cif", "failed")}
        return
    assert f"error: {inputs / 'c_broken.cif'}: " in captured.err  # unreadable: one line, the file named
    assert lines == {("a.cif", "relaxed"), ("b_overlap.cif", "failed"), ("c_broken.cif", "failed"),
                     ("d.cif", "relaxed")}
    expected = ["a_relaxed.cif", "d_relaxed.cif"]
    if on_error == "return_input":  # the failed structure's input, unchanged
        expected.insert(1, "b_overlap_relaxed.cif")
        np.testing.assert_allclose(ase_io.read(tmp_path / "out" / "b_overlap_relaxed.cif").positions,
                                   ase_io.read(inputs / "b_overlap.cif").positions, atol=1e-6)
    assert written == expected


def test_uncertainty_goes_into_the_manifest(tmp_path, checkpoint):
    assert relax(CIFS[0], "-o", tmp_path / "out", "--uncertainty", checkpoint=checkpoint) == 0
    (line,) = manifest(tmp_path / "out" / "manifest.jsonl")
    assert line["uncertainty"] >= 0
    assert ase_io.read(next((tmp_path / "out").glob("*.cif"))) is not None


def test_usage_errors_are_one_line_and_come_before_any_work(tmp_path, checkpoint, capsys, monkeypatch):
    """Before: tracebacks, some (an existing file as -o) after all the inference had run."""
    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the usage error was reported")

    monkeypatch.setattr(screen_module, "relax_batch", no_inference)
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "taken.cif").write_text("")
    torch.save(E3Relax(hidden_channels=8, num_layers=1).state_dict(), tmp_path / "bare.pt")
    cases = [
        ([CIFS[0], "-o", tmp_path / "taken.cif", "--checkpoint", checkpoint],
         f"-o {tmp_path / 'taken.cif'}: an existing file; -o names the folder the outputs go to"),
        ([CIFS[0], "--checkpoint", tmp_path / "notes.pt"],
         f"{tmp_path / 'notes.pt'}: not a PyTorch checkpoint that loads with weights_only=True"),
        ([CIFS[0], "--checkpoint", tmp_path / "bare.pt"], "bare state dict"),
        ([tmp_path / "missing.cif", "--checkpoint", checkpoint], f"{tmp_path / 'missing.cif'}: no such file or folder"),
        ([tmp_path / "*.xyz", "--checkpoint", checkpoint], "no file matches this pattern"),
        ([CIFS[0], "--backend", "cuda", "--checkpoint", checkpoint], "message_passing"),
        ([CIFS[0], CIFS[0].parent / ".." / "examples" / CIFS[0].name, "-o", tmp_path, "--checkpoint", checkpoint],
         "would both write"),
    ]
    if not torch.cuda.is_available():
        cases.append(([CIFS[0], "--device", "cuda", "--checkpoint", checkpoint], "CUDA is not available"))
    for args, message in cases:
        assert main(["relax", *map(str, args)]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_outputs_the_manifest_does_not_know_need_overwrite(tmp_path, checkpoint, capsys):
    """Before: a run silently replaced the outputs of an earlier one."""
    shutil.copy(CIFS[0], tmp_path / "a.cif")
    (tmp_path / "a_relaxed.cif").write_text("precious\n")
    assert relax(tmp_path / "a.cif", checkpoint=checkpoint) == 2
    assert "a_relaxed.cif exists and" in capsys.readouterr().err
    assert (tmp_path / "a_relaxed.cif").read_text() == "precious\n"
    assert relax(tmp_path / "a.cif", "--overwrite", checkpoint=checkpoint) == 0
    assert ase_io.read(tmp_path / "a_relaxed.cif") is not None
    # The manifest knows it now: a re-run skips it, --overwrite redoes it.
    assert relax(tmp_path / "a.cif", checkpoint=checkpoint) == 0
    assert "relaxed 0 structure(s)" in capsys.readouterr().out.splitlines()[-1]
    assert relax(tmp_path / "a.cif", "--overwrite", checkpoint=checkpoint) == 0
    assert "relaxed 1 structure(s)" in capsys.readouterr().out


def test_bare_state_dict_needs_paper_compat_on_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(E3Relax(hidden_channels=8, num_layers=1).state_dict(), tmp_path / "bare.pt")
    args = ["relax", str(CIFS[0]), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "bare.pt")]
    assert main(args) == 2
    assert "--no-paper-compat" in capsys.readouterr().err
    assert main([*args, "--no-paper-compat"]) == 0


def inputs_for_runs(folder: Path) -> None:
    """Eight CIFs and a five-frame extxyz (its third frame bad)."""
    folder.mkdir()
    for k, cif in enumerate(CIFS):
        shutil.copy(cif, folder / f"{k}_{cif.name}")
    ase_io.write(folder / "6_extra.cif", bulk("MgO", "rocksalt", a=4.3))
    ase_io.write(folder / "7_extra.cif", bulk("Al", "fcc", a=4.05))
    frames = [bulk("Cu", "fcc", a=3.6), bulk("Ni", "fcc", a=3.5), overlapping(), bulk("Ge", "diamond", a=5.6),
              bulk("Ag", "fcc", a=4.1)]
    ase_io.write(folder / "8_frames.extxyz", frames, format="extxyz")


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.jsonl"}


def same_lines(a: Path, b: Path) -> None:
    """The manifests list the same structures with the same outcomes, each once."""
    def key(line):
        return line["input"], line["frame"], line["status"], line["reason"]
    lines_a, lines_b = manifest(a), manifest(b)
    assert [key(line) for line in lines_a] == [key(line) for line in lines_b]
    assert len({(line["input"], line["frame"]) for line in lines_a}) == len(lines_a) == 13


KILL_ON_THIRD_CHUNK = textwrap.dedent("""
    import os, signal, sys
    import e3relax_fast.screen as screen
    real, calls = screen.relax_batch, []
    def relax_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # as a pre-empted node: no cleanup at all
        return real(*args, **kwargs)
    screen.relax_batch = relax_then_die
    from e3relax_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_a_kill_mid_run(tmp_path, checkpoint, capsys):
    inputs_for_runs(tmp_path / "in")
    common = ["--checkpoint", checkpoint, "--on-error", "skip", "--chunk", "2", "--batch-size", "1", "--quiet"]
    killed = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_CHUNK, "relax", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), *common], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    started = [line for line in manifest(tmp_path / "out" / "manifest.jsonl.part0") if line["status"] == "started"]
    assert len(started) == 6  # three chunks begun, the third killed
    assert main(["relax", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *common]) == 0
    summary = capsys.readouterr().out
    assert "relaxed 8 structure(s)" in summary and "4 already relaxed (manifest)" in summary and "1 failed" in summary
    assert main(["relax", str(tmp_path / "in"), "-o", str(tmp_path / "clean"), *common]) == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")
    same_lines(tmp_path / "out" / "manifest.jsonl", tmp_path / "clean" / "manifest.jsonl")


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_outputs(tmp_path, checkpoint):
    inputs_for_runs(tmp_path / "in")
    common = ["--checkpoint", checkpoint, "--on-error", "skip", "--chunk", "2", "--batch-size", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free rendezvous port itself (no race with other tests).
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "e3relax_fast", "relax", str(tmp_path / "in"), "-o", str(tmp_path / "two"),
                             *common], capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("relaxed 12 structure(s) from 9 file(s)") == 1  # rank 0 alone sums up
    assert main(["relax", str(tmp_path / "in"), "-o", str(tmp_path / "one"), *common]) == 0
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    same_lines(tmp_path / "two" / "manifest.jsonl", tmp_path / "one" / "manifest.jsonl")
    assert not list((tmp_path / "two").glob("manifest.jsonl.part*"))


def test_truncated_gzip_is_named(tmp_path, checkpoint, capsys):
    ase_io.write(tmp_path / "frames.extxyz", [bulk("Cu", "fcc", a=3.6)] * 20)
    data = gzip.compress((tmp_path / "frames.extxyz").read_bytes())
    (tmp_path / "cut.extxyz.gz").write_bytes(data[: len(data) // 2])
    assert relax(tmp_path / "cut.extxyz.gz", checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'cut.extxyz.gz'} (frame 0): Compressed file ended" in err
    assert "Traceback" not in err


def test_missing_pretrained_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "_bundled_path", lambda name: tmp_path / f"{name}.pt")
    assert main(["relax", str(EXAMPLES / "Si_diamond.cif"), "-o", str(tmp_path)]) == 2
    assert "no pretrained E3Relax model" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "relax" in capsys.readouterr().err
