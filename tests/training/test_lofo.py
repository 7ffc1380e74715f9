"""Leave one family out (``e3relax-fast lofo``): each fold trains without its family, is scored on
all of that family's pairs, and the table says whether the recipe beats Dummy there."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import denoising_pairs

from e3relax_fast.cli import main
from e3relax_fast.training.lofo import beats_dummy, heldout_summary, lofo_table

pytest.importorskip("ase")


def _dataset(root):
    """Two families, 'perov' (ids a*) and 'oqmd' (ids b*), in all three splits."""
    from e3relax_fast.io import write_extxyz_pairs

    rows = []
    for split, n, seed in (("train", 12, 0), ("val", 4, 1), ("test", 4, 2)):
        pairs = denoising_pairs(n, seed)
        for k, pair in enumerate(pairs):
            family = "perov" if k % 2 == 0 else "oqmd"
            pair.id = f"{split}-{family}-{k}"
            rows.append({"atoms_id": pair.id, "protocol": "rattle", "seed_id": f"{family}-{k}", "family": family})
        write_extxyz_pairs(pairs, root, split)
    with (root / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_lofo_trains_without_each_family_and_scores_on_it(tmp_path, capsys):
    data, out = tmp_path / "pairs", tmp_path / "lofo"
    _dataset(data)
    options = "--hidden 8 --layers 2 --batch-size 4 --steps-per-epoch 2 --max-steps 2 --quiet"
    assert main(["lofo", "--data", str(data), "--out", str(out), "--train-options", options]) == 0
    table = (out / "lofo.md").read_text()
    assert f"--train-options '{options}'" in table  # the command that made it
    for family in ("perov", "oqmd"):
        summary = json.loads((out / family / "heldout.json").read_text())
        assert summary["n"] == 10  # all splits of the held-out family: 6 + 2 + 2
        assert f"| {family} | 10 |" in table
        # The fold never saw its family: its training and validation sets hold the other family's
        # pairs only (6 of the 12 training pairs, 2 of the 4 validation pairs).
        for split, n in (("train", 6), ("val", 2)):
            assert len(torch.load(out / family / "graphs" / f"{split}.pt", weights_only=True)["items"]) == n
    # A finished fold is kept: a rerun reads the scores instead of training again.
    (out / "perov" / "best.pt").unlink()
    assert main(["lofo", "--data", str(data), "--out", str(out), "--family", "perov",
                 "--train-options", options]) == 0
    assert not (out / "perov" / "best.pt").exists()


def test_a_recipe_of_three_steps_runs_each_without_the_family_from_the_one_before(tmp_path, capsys):
    first_data, data, out = tmp_path / "first", tmp_path / "pairs", tmp_path / "lofo"
    _dataset(first_data)
    _dataset(data)
    options = "--hidden 8 --layers 2 --batch-size 4 --steps-per-epoch 2 --max-steps 2 --quiet"
    # The shipped recipe's second step names the shipped first step: the fold's own replaces it (the
    # named file does not exist, so the fold would fail had it been used).
    assert main(["lofo", "--data", str(data), "--out", str(out), "--family", "oqmd",
                 "--first-step", f"--data {first_data} {options}",
                 "--train-options", f"{options} --init {tmp_path / 'no_such_first_step.pt'}",
                 "--then", f"{options} --lr 1e-4 --lr-schedule cosine"]) == 0
    first, second, third = out / "oqmd" / "first", out / "oqmd", out / "oqmd" / "step3"
    for step in (first, second, third):  # no oqmd in any step's training pairs (6 of the 12 are oqmd)
        assert len(torch.load(step / "graphs" / "train.pt", weights_only=True)["items"]) == 6
    configs = [torch.load(step / "last.pt", weights_only=True)["train_config"] for step in (second, third)]
    assert configs[0]["init"] == str(first / "best.pt") and configs[1]["init"] == str(second / "best.pt")
    assert configs[1]["lr_schedule"] == "cosine" and configs[1]["lr"] == 1e-4
    summary = json.loads((second / "heldout.json").read_text())
    assert summary["n"] == 10 and summary["model"] == str(third / "best.pt")  # the last step is scored
    assert "--first-step" in (out / "lofo.md").read_text() and "--then" in (out / "lofo.md").read_text()


def test_a_model_trained_without_the_family_is_scored_as_its_fold(tmp_path, capsys):
    """--trained-without: e.g. the shipped model on a seed family added after it was trained."""
    data, out = tmp_path / "pairs", tmp_path / "lofo"
    _dataset(data)
    options = ["--hidden", "8", "--layers", "2", "--batch-size", "4", "--steps-per-epoch", "2", "--max-steps", "2",
               "--quiet"]
    assert main(["train", "--data", str(data), "--exclude-family", "oqmd", "--out", str(tmp_path / "m"),
                 *options]) == 0
    checkpoint = str(tmp_path / "m" / "best.pt")
    assert main(["lofo", "--data", str(data), "--out", str(out), "--family", "oqmd",
                 "--trained-without", checkpoint]) == 0
    summary = json.loads((out / "oqmd" / "heldout.json").read_text())
    assert summary["n"] == 10 and summary["model"] == checkpoint
    assert not (out / "oqmd" / "graphs").exists()  # no fold was trained
    assert f"--trained-without {checkpoint}" in (out / "lofo.md").read_text()
    # With training options it is refused (the model is trained already).
    assert main(["lofo", "--data", str(data), "--out", str(tmp_path / "o2"), "--trained-without", checkpoint,
                 "--train-options", "--hidden 8"]) == 2
    assert "no --train-options, --first-step or --then" in capsys.readouterr().err


def test_lofo_names_a_family_that_is_not_in_the_data(tmp_path, capsys):
    data = tmp_path / "pairs"
    _dataset(data)
    assert main(["lofo", "--data", str(data), "--out", str(tmp_path / "o"), "--family", "carbon"]) == 2
    err = capsys.readouterr().err
    assert "no pairs of family carbon" in err and "families there: oqmd, perov" in err


def test_heldout_summary_and_table_say_which_family_is_not_beaten():
    def result(model_coord, model_volume):
        means = {"model": {"coord_mae": model_coord, "volume_error": model_volume, "volume_within": 0.5},
                 "dummy": {"coord_mae": 0.2, "volume_error": 4.0, "volume_within": 0.25},
                 "rescale": {"coord_mae": 0.15, "volume_error": 2.0, "volume_within": 0.5}}
        return {**means, "ratio_ci": {"coord_mae": (0.4, 0.6), "volume_error": (0.3, 0.7)},
                "per_structure": {"model": {"coord_mae": [0.1] * 7}}}

    good, bad = heldout_summary(result(0.1, 2.0)), heldout_summary(result(0.1, 5.0))
    assert good["n"] == 7 and beats_dummy(good) and not beats_dummy(bad)
    table = lofo_table({"mp": good, "nomad": bad})
    assert "| mp | 7 | 0.500 (0.40–0.60) | 0.750 | 0.500 (0.30–0.70) | 0.500 | 50 % | 25 % | yes |" in table
    assert table.rstrip().endswith("| **no** |")


@pytest.mark.parametrize("rotation", ["remove", "keep"])
def test_folds_read_targets_as_lofo_does(tmp_path, monkeypatch, rotation):
    """Every step of a fold gets lofo's --target-rotation (its own scoring reads the pairs that way)."""
    import e3relax_fast.cli as cli

    data = tmp_path / "pairs"
    _dataset(data)
    seen = []
    monkeypatch.setattr(cli, "run_train", lambda args: seen.append(args.target_rotation) or 0)
    argv = ["lofo", "--data", str(data), "--out", str(tmp_path / "lofo"), "--family", "oqmd",
            "--first-step", f"--data {data}", "--then", "--lr 1e-4", "--target-rotation", rotation]
    assert main(argv) == 2  # the stand-in trained nothing: scoring finds no checkpoint and says so
    assert seen == [rotation, rotation, rotation]


def test_train_anchors_add_other_sources_relaxed_structures_as_inputs_and_targets(tmp_path, capsys):
    """--anchors: another source's relaxed structures join the training split as input = target (its
    pairs do not), and --exclude-family leaves that family's anchors out too."""
    import argparse

    from e3relax_fast.cli import _anchor_pairs
    from e3relax_fast.io import read_pairs, write_extxyz_pairs

    anchors, data = tmp_path / "anchors", tmp_path / "d"
    _dataset(anchors)  # 12 training pairs: 6 perov, 6 oqmd
    write_extxyz_pairs(denoising_pairs(8, 3), data, "train")
    write_extxyz_pairs(denoising_pairs(2, 4), data, "val")
    args = argparse.Namespace(anchors=[str(anchors)], train_split="train", target_rotation="remove",
                              exclude_family=["oqmd"], anchor_strain=0.0, seed=0)
    added = _anchor_pairs(args)
    sources = {p.id: p for p in read_pairs([str(anchors)], "train")}
    assert len(added) == 6 and {p.family for p in added} == {"perov"} and {p.protocol for p in added} == {"minimum"}
    for pair in added:
        source = sources[pair.id.removesuffix(":min")]
        assert np.array_equal(pair.pos_unrelaxed, source.pos_relaxed) and np.array_equal(pair.pos_relaxed,
                                                                                          source.pos_relaxed)
        assert np.array_equal(pair.cell_unrelaxed, source.cell_relaxed)
    options = ["--hidden", "8", "--layers", "2", "--batch-size", "4", "--steps-per-epoch", "1", "--max-steps", "1",
               "--quiet", "--anchors", str(anchors)]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), *options]) == 0
    assert len(torch.load(tmp_path / "r" / "graphs" / "train.pt", weights_only=True)["items"]) == 8 + 12
    assert len(torch.load(tmp_path / "r" / "graphs" / "val.pt", weights_only=True)["items"]) == 2  # val untouched
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), *options, "--exclude-family", "oqmd"]) == 0
    assert len(torch.load(tmp_path / "x" / "graphs" / "train.pt", weights_only=True)["items"]) == 8 + 6
    # --anchor-strain: each anchor also stretched, no displacement, its relaxed structure the target.
    args.anchor_strain = 0.1
    strained = _anchor_pairs(args)[6:]
    assert len(strained) == 6 and {p.protocol for p in strained} == {"perturbed"}
    for pair in strained:
        source = sources[pair.id.removesuffix(":perturbed")]
        stretch = np.linalg.solve(source.cell_relaxed, pair.cell_unrelaxed)
        np.testing.assert_allclose(stretch, stretch.T, atol=1e-12)
        assert 0 < np.abs(stretch - np.eye(3)).max() <= 0.1
        np.testing.assert_allclose(pair.pos_unrelaxed, source.pos_relaxed @ stretch, atol=1e-12)  # no rattle
        assert np.array_equal(pair.cell_relaxed, source.cell_relaxed)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "s"), *options, "--anchor-strain", "0.05"]) == 0
    assert len(torch.load(tmp_path / "s" / "graphs" / "train.pt", weights_only=True)["items"]) == 8 + 12 + 12
    for bad, message in ((["--anchor-strain", "0.05"], "give --anchors too"),
                         (["--anchors", str(anchors), "--anchor-strain", "-0.1"], "in [0, 1)")):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "bad"), *options[:-2], *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
