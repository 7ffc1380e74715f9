"""bench/gpu_train.sh --cpu-dry-run end to end (tiny sizes, pymatgen blocked as on the GPU machine):
every stage runs, the checkpoint comes back in parts that reassemble into a loadable model, and the
stages stay inside the time budget."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None,
                                reason="needs bash and split")


def test_cpu_dry_run_trains_evaluates_and_returns_the_checkpoint(tmp_path):
    from e3relax_fast import load_pretrained

    env = {**os.environ, "OUT": str(tmp_path / "out"), "TRAIN_S": "3", "STEPS_PER_EPOCH": "2", "HIDDEN": "8",
           "LAYERS": "2", "BUDGET_S": "400", "TMPDIR": str(tmp_path), "ELEMENT_FEATURES": "1",
           "CELL_STRAIN": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh"), "--cpu-dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert proc.returncode == 0, proc.stderr + summary
    assert "smoke: backend auto trained 2 steps" in summary
    assert "train: exit 0" in summary and "eval (val, no match rate): | coordinate MAE" in summary
    parts = sorted((tmp_path / "out").glob("best.pt.part-*"))
    assert parts and (tmp_path / "out" / "train.log").exists() and (tmp_path / "out" / "eval.md").exists()
    assert "already relaxed within 3 %" in (tmp_path / "out" / "train.log").read_text()  # --val-minima reached it
    (tmp_path / "best.pt").write_bytes(b"".join(p.read_bytes() for p in parts))
    model = load_pretrained(tmp_path / "best.pt")
    assert (model.hidden_channels, model.num_layers, model.cell_transport) == (8, 2, True)
    assert model.config["element_features"] and model.config["cell_strain"]  # the options reached the training
    seconds = int(summary.split("- total: ")[1].split(" s")[0])
    assert seconds <= 400
