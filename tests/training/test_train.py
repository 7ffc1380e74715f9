"""Training: the loss falls, resuming continues exactly, and 2-process DDP equals 1 process."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import denoising_pairs

from e3relax_fast import cli
from e3relax_fast.io import write_extxyz_pairs
from e3relax_fast.training import PairDataset, layerwise_loss
from e3relax_fast.training.train import GUARD_WINDOW, TrainConfig, _ema_update, make_optimizer, train


@pytest.fixture(scope="module")
def datasets():
    torch.set_num_threads(1)
    return PairDataset(denoising_pairs(24, 0)), PairDataset(denoising_pairs(6, 1))


def test_loss_falls_and_resume_continues(tmp_path, datasets):
    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 16, "num_layers": 2}, batch_size=8, steps_per_epoch=10,
                      lr=2e-3, ema_decay=0.9, dtype="float64")
    full = train(cfg, train_set, val_set, tmp_path / "full", max_steps=40, progress=False)
    losses = [h["train_loss"] for h in full["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]

    # Interrupted after 20 steps, then resumed to 40: same trajectory as the uninterrupted run.
    train(cfg, train_set, val_set, tmp_path / "split", max_steps=20, progress=False)
    resumed = train(cfg, train_set, val_set, tmp_path / "split", max_steps=40, progress=False)
    assert resumed["step"] == 40
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["step"] == b["step"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-10
        assert abs(a["val_mae"] - b["val_mae"]) < 1e-10
    ckpt_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    ckpt_split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, value in ckpt_full["model"].items():
        torch.testing.assert_close(value, ckpt_split["model"][name], rtol=0, atol=1e-12)


def test_the_same_command_gives_the_same_weights_bit_for_bit(tmp_path, datasets):
    """Shipped weights are reproducible: two fresh runs of one float32 config (the shipped model's
    options) end on identical tensors; another seed does not (so the comparison can fail)."""
    train_set, val_set = datasets

    def weights(name: str, seed: int) -> dict:
        cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2, "cell_transport": True, "cell_strain": True},
                          batch_size=4, steps_per_epoch=3, lr=5e-4, seed=seed)
        train(cfg, train_set, val_set, tmp_path / name, max_steps=6, progress=False)
        return torch.load(tmp_path / name / "best.pt", weights_only=True)["state_dict"]

    first, again, other = weights("first", 0), weights("again", 0), weights("other", 1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_best_checkpoint_loads_for_inference(tmp_path, datasets):
    from e3relax_fast import load_pretrained

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=4, steps_per_epoch=2)
    train(cfg, train_set, val_set, tmp_path, max_steps=2, progress=False)
    model = load_pretrained(tmp_path / "best.pt")
    assert model.hidden_channels == 8 and not model.paper_compat


def test_init_starts_from_a_checkpoint_and_refuses_another_architecture(tmp_path, datasets):
    """--init: the run's first validation is the source's EMA weights trained one more step (not the
    seeded start); optimiser and best signal start afresh; another architecture is named."""
    from e3relax_fast import load_pretrained

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=4, steps_per_epoch=1,
                      lr=1e-3, ema_decay=0.0, dtype="float64")  # EMA decay 0: the EMA is the model
    train(cfg, train_set, val_set, tmp_path / "a", max_steps=3, progress=False)
    source = load_pretrained(tmp_path / "a" / "best.pt")
    fresh = train(cfg, train_set, val_set, tmp_path / "fresh", max_steps=1, progress=False)
    cfg.init = str(tmp_path / "a" / "best.pt")
    tuned = train(cfg, train_set, val_set, tmp_path / "b", max_steps=1, progress=False)
    assert tuned["step"] == 1 and tuned["history"][0]["val_mae"] != fresh["history"][0]["val_mae"]
    weights = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    moved = max((weights[k] - v).abs().max().item() for k, v in source.state_dict().items())
    assert 0 < moved < 0.05  # one AdamW step of lr 1e-3 away from the source, not from a fresh start
    with pytest.raises(ValueError, match="hidden_channels is 8, this run's is 16"):
        train(TrainConfig(model={"hidden_channels": 16, "num_layers": 2}, init=cfg.init), train_set, val_set,
              tmp_path / "c", max_steps=1, progress=False)


def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch on 1 and on 2 gloo processes: same weights after a few steps."""
    data = tmp_path / "data"
    write_extxyz_pairs(denoising_pairs(16, 3), data, "train")
    write_extxyz_pairs(denoising_pairs(4, 4), data, "val")
    args = ["--data", str(data), "--hidden", "8", "--layers", "2", "--batch-size", "8", "--steps-per-epoch", "3",
            "--max-steps", "3", "--dtype", "float64", "--lr", "1e-3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "e3relax_fast.cli", "train", "--out", str(tmp_path / "one"), *args]
    # --standalone: torchrun picks a free rendezvous port itself (no race with other tests).
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "e3relax_fast.cli", "train", "--out", str(tmp_path / "two"), *args]
    for cmd in (single, double):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert one["state"]["step"] == two["state"]["step"] == 3
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-9, atol=1e-12)
    # Training moved the weights (so the comparison above is not between two untouched inits).
    from e3relax_fast import E3Relax

    torch.manual_seed(0)
    init = E3Relax(hidden_channels=8, num_layers=2).double().state_dict()
    assert max((one["model"][k] - v).abs().max().item() for k, v in init.items()) > 1e-4
    assert abs(one["state"]["history"][-1]["train_loss"] - two["state"]["history"][-1]["train_loss"]) < 1e-10


def test_time_limit_stops_at_a_pseudo_epoch_boundary_and_resumes(tmp_path, datasets):
    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 1}, batch_size=4, steps_per_epoch=2, max_epochs=50)
    first = train(cfg, train_set, val_set, tmp_path, time_limit=0.0, progress=False)
    assert (first["epoch"], first["step"]) == (1, 2)
    again = train(cfg, train_set, val_set, tmp_path, time_limit=0.0, progress=False)
    assert (again["epoch"], again["step"]) == (2, 4)


def test_a_run_killed_while_saving_keeps_its_previous_checkpoints(tmp_path, datasets, monkeypatch):
    """Before: torch.save wrote best.pt and last.pt in place, so a run killed mid-save (a time limit,
    a lost machine) left a truncated checkpoint that neither loads nor resumes."""
    train_module = importlib.import_module("e3relax_fast.training.train")  # the package re-exports train()

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 1}, batch_size=4, steps_per_epoch=2, lr=1e-2)
    train(cfg, train_set, val_set, tmp_path, max_steps=2, progress=False)
    before = {name: (tmp_path / name).read_bytes() for name in ("best.pt", "last.pt")}

    def killed_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, train_set, val_set, tmp_path, max_steps=4, progress=False)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    resumed = train(cfg, train_set, val_set, tmp_path, max_steps=4, progress=False)
    assert resumed["step"] == 4


@pytest.mark.parametrize("option, new_weight", [("element_features", "element_features.proj.weight"),
                                                ("cell_strain", "cell_strain_layers.1.2.weight"),
                                                ("cell_mix", "cell_mix_layers.1.2.weight"),
                                                ("volume_prior", "volume_prior.out.weight"),
                                                ("cell_virial", "cell_virial_layers.1.out.weight"),
                                                ("bond_radii", "bond_radii_layers.1.out.weight")])
def test_init_grows_a_checkpoint_into_a_model_with_a_part_that_starts_at_zero(tmp_path, datasets, option,
                                                                              new_weight):
    """--init from a model without the element features, the cell strain, the cell mix, the volume prior or either
    bond strain:
    every other weight comes from it, the new part starts at zero (so the first step starts from its
    predictions) and then learns."""
    from e3relax_fast import load_pretrained

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=4, steps_per_epoch=1,
                      lr=1e-3, ema_decay=0.0, dtype="float64")
    train(cfg, train_set, val_set, tmp_path / "a", max_steps=2, progress=False)
    source = load_pretrained(tmp_path / "a" / "best.pt")
    grown = TrainConfig(model={"hidden_channels": 8, "num_layers": 2, option: True}, batch_size=4,
                        steps_per_epoch=1, lr=1e-3, ema_decay=0.0, dtype="float64",
                        init=str(tmp_path / "a" / "best.pt"), prior_weight=1.0 if option == "volume_prior" else 0.0)
    train(grown, train_set, val_set, tmp_path / "b", max_steps=1, progress=False)
    weights = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert 0 < weights[new_weight].abs().max() < 0.05  # from zero, one step
    moved = max((weights[k] - v).abs().max().item() for k, v in source.state_dict().items())
    assert moved < 0.05
    with pytest.raises(ValueError, match=f"{option} is True, this run's is False"):  # not the other way
        train(TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, init=str(tmp_path / "b" / "best.pt")),
              train_set, val_set, tmp_path / "c", max_steps=1, progress=False)


def test_the_progress_line_names_a_few_skipped_pairs_and_counts_the_rest():
    """A diverging epoch skips up to 100 steps of 16 pairs: the progress line names 8 of them and
    counts the rest (the history in last.pt keeps every id) instead of printing 1,600 ids."""
    from e3relax_fast.training.train import _named

    ids = [f"p{k:03d}" for k in range(20)]
    assert _named(ids) == f"their pairs: {', '.join(ids[:8])} and 12 more (all in last.pt's history)"
    assert _named(ids[:3]) == "their pairs: p000, p001, p002"


def test_a_step_with_a_non_finite_gradient_is_skipped_and_all_skipped_stops_the_run(tmp_path, datasets, monkeypatch):
    """One batch whose loss is NaN (a degenerate cell, say) would make every weight NaN for good: its
    step is skipped (weights and EMA untouched, counted in the history) and the run goes on; a
    pseudo-epoch of nothing but such steps stops the run with TrainingDivergedError naming the step."""
    from e3relax_fast.training import TrainingDivergedError

    train_module = importlib.import_module("e3relax_fast.training.train")  # the package's `train` is the function

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=4, steps_per_epoch=3, lr=2e-3,
                      dtype="float64")
    real_loss, calls = train_module.layerwise_loss, []

    def poisoned(*args, **kwargs):  # the 2nd optimiser step's loss (and so its gradient) is NaN
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(train_module, "layerwise_loss", poisoned)
    summary = train(cfg, train_set, val_set, tmp_path / "run", max_steps=6, progress=False)
    assert [h["skipped_steps"] for h in summary["history"]] == [1, 0]
    skipped = summary["history"][0]["skipped_pairs"]  # the 2nd step's batch, named
    assert len(skipped) == 4 and set(skipped) <= {p.id for p in train_set.pairs}
    assert summary["history"][1]["skipped_pairs"] == []
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_mae"]) for h in summary["history"])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())

    def always_nan(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(train_module, "layerwise_loss", always_nan)
    with pytest.raises(TrainingDivergedError, match=r"all 3 optimiser steps up to step 9 .* pseudo-epoch 2"):
        train(cfg, train_set, val_set, tmp_path / "run", max_steps=12, progress=False)


def test_train_cli_reports_a_diverged_run_in_one_line(tmp_path, capsys, monkeypatch):
    from e3relax_fast.cli import main

    train_module = importlib.import_module("e3relax_fast.training.train")
    real_loss = train_module.layerwise_loss

    def always_nan(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(train_module, "layerwise_loss", always_nan)
    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    assert main(["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--steps-per-epoch", "2", "--max-steps", "4", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged: all 2 optimiser steps up to step 2") and "Traceback" not in err


def test_cell_weight_scales_the_cell_term_and_reaches_the_loss_from_the_cli(tmp_path, monkeypatch):
    from e3relax_fast.cli import main
    from e3relax_fast.model import E3RelaxOutput

    torch.manual_seed(0)
    cells = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 4.0
    positions = torch.rand(5, 3, dtype=torch.float64)
    output = E3RelaxOutput([positions + 0.1, positions - 0.2], [cells * 1.05, cells * 0.9])
    ptr = torch.tensor([0, 2, 5])
    plain = layerwise_loss(output, positions, cells, ptr)
    heavy = layerwise_loss(output, positions, cells, ptr, cell_weight=3.0)
    for a, b in zip(plain.positions, heavy.positions, strict=True):
        assert a == b
    for a, b in zip(plain.cells, heavy.cells, strict=True):
        assert float(b) == pytest.approx(3.0 * float(a), rel=1e-15) and a > 0

    train_module = importlib.import_module("e3relax_fast.training.train")
    real_loss, weights = train_module.layerwise_loss, []

    def recording(*args, **kwargs):
        weights.append(args[8] if len(args) > 8 else kwargs.get("cell_weight", 1.0))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "layerwise_loss", recording)
    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    assert main(["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--steps-per-epoch", "2", "--max-steps", "2", "--cell-weight", "2.5", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    assert weights == [2.5, 2.5]


def test_the_prior_term_supervises_the_volume_priors_scale_with_the_targets_volume(tmp_path, monkeypatch):
    from e3relax_fast.cli import main
    from e3relax_fast.model import E3RelaxOutput

    inputs = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 4.0
    targets = inputs * torch.tensor([1.1, 0.95], dtype=torch.float64)[:, None, None]
    positions = torch.rand(5, 3, dtype=torch.float64)
    ptr = torch.tensor([0, 2, 5])
    output = E3RelaxOutput([positions], [targets], log_scale=torch.tensor([0.05, 0.0], dtype=torch.float64))
    terms = layerwise_loss(output, positions, targets, ptr, prior_weight=2.0, input_cells=inputs)
    # per crystal |ln s - ln(V*/V)/3| = |0.05 - ln 1.1| + |0 - ln 0.95|, over the 2 crystals, times 2
    expected = 2.0 * (abs(0.05 - math.log(1.1)) + abs(math.log(0.95))) / 2
    assert float(terms.prior) == pytest.approx(expected, rel=1e-12)
    assert float(terms.total) == pytest.approx(expected + float(terms.positions[0] + terms.cells[0]), rel=1e-12)
    assert layerwise_loss(output, positions, targets, ptr).prior is None  # off by default
    with pytest.raises(ValueError, match="prior_weight needs a model with volume_prior=True"):
        layerwise_loss(E3RelaxOutput([positions], [targets]), positions, targets, ptr, prior_weight=1.0,
                       input_cells=inputs)

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    common = ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
              "--steps-per-epoch", "2", "--max-steps", "2", "--prior-weight", "3", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "without")]) == 2  # a user error: no prior to supervise
    unsupervised = [a for a in common if a not in ("--prior-weight", "3")]
    assert main([*unsupervised, "--volume-prior", "--out", str(tmp_path / "alone")]) == 2  # nothing to learn from
    train_module = importlib.import_module("e3relax_fast.training.train")
    real_loss, priors = train_module.layerwise_loss, []

    def recording(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        priors.append(terms.prior)
        return terms

    monkeypatch.setattr(train_module, "layerwise_loss", recording)
    assert main([*common, "--volume-prior", "--out", str(tmp_path / "with")]) == 0
    assert len(priors) == 2 and all(p is not None and float(p.detach()) >= 0 for p in priors)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_fused_optimizer_and_ema_are_the_recipe(dtype, rel):
    """The fused AdamW that ``train`` builds updates every weight as the per-parameter AdamW with the
    recipe's AMSGrad, betas, eps and weight decay, and the multi-tensor EMA as ``e + (1 - decay) (p - e)``:
    five steps on the same gradients."""
    from e3relax_fast.model import E3Relax

    config = TrainConfig(model={"hidden_channels": 8, "num_layers": 2, "cell_strain": True}, lr=1e-2,
                         weight_decay=0.05)
    torch.manual_seed(0)
    fused_model = E3Relax(**config.model).to(dtype)
    loop_model = E3Relax(**config.model).to(dtype)
    loop_model.load_state_dict(fused_model.state_dict())
    initial = {name: w.detach().clone() for name, w in fused_model.named_parameters()}
    fused = make_optimizer(fused_model, config, "cpu")
    assert fused.defaults["fused"] and fused.defaults["amsgrad"]
    loop = torch.optim.AdamW(loop_model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, amsgrad=True, foreach=False)
    ema = E3Relax(**config.model).to(dtype).requires_grad_(False)
    expected_ema = [e.detach().clone() for e in ema.parameters()]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator, dtype=dtype)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
        _ema_update(ema, fused_model, config.ema_decay)
        expected_ema = [e + (1 - config.ema_decay) * (p.detach() - e)
                        for e, p in zip(expected_ema, fused_model.parameters(), strict=True)]
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=rel, atol=rel, msg=name)
        assert not torch.equal(a, initial[name]), name  # both moved: the comparison is not vacuous
    for e, expected in zip(ema.parameters(), expected_ema, strict=True):
        torch.testing.assert_close(e, expected, rtol=rel, atol=rel)


def test_the_cosine_schedule_sets_each_steps_rate_resumes_exactly_and_reaches_the_cli(tmp_path, datasets,
                                                                                        monkeypatch):
    """--lr-schedule cosine: the rate of optimiser step s is lr at 0, halfway at S/2 and min_lr from S =
    max_epochs * steps_per_epoch on; the optimiser runs each step at that rate (the plateau scheduler
    is not stepped), and a resumed run continues the same trajectory."""
    from e3relax_fast.cli import main
    from e3relax_fast.training.train import TrainingSetupError, cosine_lr

    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=8, steps_per_epoch=5, max_epochs=4,
                      lr=1e-3, min_lr=1e-5, lr_schedule="cosine", dtype="float64")
    assert cosine_lr(cfg, 0) == 1e-3 and cosine_lr(cfg, 20) == cosine_lr(cfg, 35) == 1e-5
    assert cosine_lr(cfg, 10) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)

    train_set, val_set = datasets
    train_module = importlib.import_module("e3relax_fast.training.train")
    rates, real_step = [], train_module._optimizer_step

    def recording(net, model, ema, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return real_step(net, model, ema, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", recording)
    full = train(cfg, train_set, val_set, tmp_path / "full", progress=False)
    assert rates == [cosine_lr(cfg, s) for s in range(20)]
    assert [h["lr"] for h in full["history"]] == [cosine_lr(cfg, s) for s in (4, 9, 14, 19)]
    train(cfg, train_set, val_set, tmp_path / "split", max_steps=10, progress=False)
    resumed = train(cfg, train_set, val_set, tmp_path / "split", progress=False)
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["val_mae"] == pytest.approx(b["val_mae"], rel=0, abs=1e-12)
    with pytest.raises(TrainingSetupError, match="unknown lr_schedule 'step'"):
        train(TrainConfig(lr_schedule="step"), train_set, val_set, tmp_path / "bad", progress=False)

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    rates.clear()
    assert main(["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--steps-per-epoch", "2", "--max-epochs", "2", "--lr", "1e-3", "--lr-schedule", "cosine",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert rates[0] == 1e-3 and rates[-1] == pytest.approx(1e-8 + (1e-3 - 1e-8) * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_train_cli_trains_the_relative_bonds_and_refuses_their_forces_alone(tmp_path, capsys):
    """--bond-radii (and --bond-forces with it) train end to end and the checkpoint says so; --bond-forces
    alone is a one-line user error."""
    from e3relax_fast import load_pretrained
    from e3relax_fast.cli import main

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    common = ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
              "--steps-per-epoch", "2", "--max-steps", "2", "--quiet"]
    assert main([*common, "--bond-radii", "--bond-forces", "--out", str(tmp_path / "r")]) == 0
    config = load_pretrained(tmp_path / "r" / "best.pt").config
    assert config["bond_radii"] and config["bond_forces"]
    assert main([*common, "--bond-forces", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "give --bond-radii too" in err and "Traceback" not in err


def test_the_spike_guard_skips_a_step_whose_gradient_spikes_and_resumes_exactly(tmp_path, datasets, monkeypatch):
    """A finite step whose gradient norm is far above the recent median (an update that carried the weights
    to where one crystal's prediction explodes) is skipped with --spike-guard, like a non-finite one, and
    taken without it; the median's window is saved, so a resumed run skips the same steps."""
    from e3relax_fast.cli import main

    train_module = importlib.import_module("e3relax_fast.training.train")
    monkeypatch.setattr(train_module, "GUARD_WINDOW", 3)
    train_set, val_set = datasets
    real_loss, calls = train_module.layerwise_loss, []

    def spiking(*args, **kwargs):  # the 6th optimiser step's loss (so its gradient) is 1e4 times too large
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) % 8 == 6:
            terms.total = terms.total * 1e4
        return terms

    monkeypatch.setattr(train_module, "layerwise_loss", spiking)
    config = {"model": {"hidden_channels": 8, "num_layers": 2}, "batch_size": 4, "steps_per_epoch": 4,
              "lr": 2e-3, "dtype": "float64"}
    unguarded = train(TrainConfig(**config), train_set, val_set, tmp_path / "off", max_steps=8, progress=False)
    assert [h["skipped_steps"] for h in unguarded["history"]] == [0, 0]
    calls.clear()
    guarded = TrainConfig(**config, spike_guard=20.0)
    full = train(guarded, train_set, val_set, tmp_path / "on", max_steps=8, progress=False)
    assert [h["skipped_steps"] for h in full["history"]] == [0, 1]
    assert len(full["history"][1]["skipped_pairs"]) == 4
    calls.clear()
    train(guarded, train_set, val_set, tmp_path / "split", max_steps=4, progress=False)
    resumed = train(guarded, train_set, val_set, tmp_path / "split", max_steps=8, progress=False)
    assert [h["skipped_steps"] for h in resumed["history"]] == [0, 1]
    for name in ("last.pt", "best.pt"):
        ours = torch.load(tmp_path / "split" / name, weights_only=True)
        theirs = torch.load(tmp_path / "on" / name, weights_only=True)
        key = "model" if name == "last.pt" else "state_dict"
        assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key])

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    assert main(["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--max-steps", "1", "--quiet", "--spike-guard", "20", "--out", str(tmp_path / "cli")]) == 0
    assert torch.load(tmp_path / "cli" / "last.pt", weights_only=True)["train_config"]["spike_guard"] == 20.0
    assert cli.GUARD_WINDOW == GUARD_WINDOW  # the parser's copy, named in --spike-guard's help


def test_compiled_bond_terms_train_as_the_eager_ones_and_need_bond_terms(tmp_path, capsys, monkeypatch):
    """--compile-bond-terms compiles each bond-term module (and nothing else) and trains as the eager
    run does, up to the rounding of fused kernels, and on one thread as itself bit for bit; its
    checkpoint is an ordinary one. Without bond terms the flag is a one-line user error."""
    from e3relax_fast import load_pretrained
    from e3relax_fast.cli import main
    from e3relax_fast.model.bond_radii import BondRadiiStrain
    from e3relax_fast.model.virial import CellVirial

    torch.set_num_threads(1)  # as the card trains: compiled scatter-adds on several threads sum in varying order
    compiled = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **options: (compiled.append(type(self)), original(self, **options)))
    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    common = ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
              "--steps-per-epoch", "2", "--max-steps", "4", "--lr", "1e-3", "--quiet"]
    bonds = ["--cell-virial", "--bond-radii", "--bond-forces"]
    assert main([*common, *bonds, "--out", str(tmp_path / "eager")]) == 0 and not compiled
    for name in ("compiled", "again"):  # the same command twice: the same weights bit for bit
        assert main([*common, *bonds, "--compile-bond-terms", "--out", str(tmp_path / name)]) == 0
    assert sorted(compiled, key=str) == [BondRadiiStrain] * 4 + [CellVirial] * 4  # two layers of each, twice
    runs = {name: torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("eager", "compiled", "again")}
    assert all(torch.equal(runs["again"]["model"][k], v) for k, v in runs["compiled"]["model"].items())
    for a, b in zip(runs["eager"]["state"]["history"], runs["compiled"]["state"]["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    eager, ours = runs["eager"]["model"], runs["compiled"]["model"]
    assert eager.keys() == ours.keys()
    for term in ("cell_virial_layers", "bond_radii_layers"):  # their zero-started maps have trained
        assert eager[f"{term}.0.out.weight"].abs().max() > 0
    for k in eager:
        torch.testing.assert_close(ours[k], eager[k], rtol=1e-3, atol=1e-5)
    assert load_pretrained(tmp_path / "compiled" / "best.pt").config["bond_radii"]
    assert main([*common, "--compile-bond-terms", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no bond terms" in err and "Traceback" not in err
