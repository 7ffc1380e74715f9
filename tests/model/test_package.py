"""``e3relax-fast package``: a train run's best.pt and a model card as one file, the way the shipped
``weights/default.pt`` is made from ``weights/default.card.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import denoising_pairs

import e3relax_fast
from e3relax_fast import load_pretrained
from e3relax_fast.cli import main

WEIGHTS = Path(e3relax_fast.__file__).parent / "weights"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A train run of two optimiser steps (its best.pt and last.pt)."""
    from e3relax_fast.io import write_extxyz_pairs

    root = tmp_path_factory.mktemp("package")
    write_extxyz_pairs(denoising_pairs(8, 0), root / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), root / "d", "val")
    assert main(["train", "--data", str(root / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--max-steps", "2", "--steps-per-epoch", "1", "--cell-strain", "--quiet",
                 "--out", str(root / "run")]) == 0
    return root


def test_package_writes_the_ema_weights_config_and_card_that_load_pretrained_reads(run, capsys):
    card = {"version": "E3Relax-Test-v1", "data": "eight denoising pairs", "test_coord_mae_A": 0.1}
    (run / "card.json").write_text(json.dumps(card))
    out = run / "model.pt"
    assert main(["package", "--checkpoint", str(run / "run" / "best.pt"), "--card", str(run / "card.json"),
                 "--out", str(out)]) == 0
    assert "E3Relax-Test-v1" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)
    assert set(written) == {"state_dict", "config", "card"} and written["card"] == card
    ours, theirs = load_pretrained(out).state_dict(), load_pretrained(run / "run" / "best.pt").state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_pretrained(out).config == load_pretrained(run / "run" / "best.pt").config  # cell_strain kept


@pytest.mark.parametrize("case", ["last.pt", "missing checkpoint", "card not JSON", "card a list"])
def test_package_refuses_in_one_line_naming_the_file(run, capsys, case):
    checkpoint, card = run / "run" / "best.pt", run / "card.json"
    card.write_text(json.dumps({"version": "v"}))
    if case == "last.pt":  # raw weights beside the EMA ones: not what ships
        checkpoint = run / "run" / "last.pt"
    elif case == "missing checkpoint":
        checkpoint = run / "run" / "nothing.pt"
    elif case == "card not JSON":
        card.write_text("version: v")
    else:
        card.write_text("[1, 2]")
    assert main(["package", "--checkpoint", str(checkpoint), "--card", str(card), "--out", str(run / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(card if case.startswith("card") else checkpoint) in err
    assert ("best.pt" in err) == (case == "last.pt")  # a last.pt is told what to ship instead
    assert not (run / "x.pt").exists()


def test_the_shipped_model_file_carries_the_committed_card():
    """default.pt is `e3relax-fast package` of the shipping run with default.card.json: the card a
    reviewer reads in the repository is the one inside the wheel's model."""
    committed = json.loads((WEIGHTS / "default.card.json").read_text())
    assert torch.load(WEIGHTS / "default.pt", weights_only=True)["card"] == committed
    assert committed["version"].startswith("E3Relax-CHGNetPairs-")
