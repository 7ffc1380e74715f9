"""Training refuses what would end silently wrong or in a crash mid-run, naming the set or the pair."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import denoising_pairs

from e3relax_fast.training import PairDataset
from e3relax_fast.training.train import TrainConfig, train

CONFIG = TrainConfig(model={"hidden_channels": 8, "num_layers": 1}, batch_size=4, steps_per_epoch=1)


@pytest.fixture(scope="module")
def train_set():
    torch.set_num_threads(1)
    return PairDataset(denoising_pairs(8, 0))


def test_an_empty_validation_set_is_refused(tmp_path, train_set):
    """E.g. every validation CIF missing: before, train exited 0 with 'best validation |dp| 0.0000 A'."""
    with pytest.raises(ValueError, match="the validation set is empty"):
        train(CONFIG, train_set, PairDataset([]), tmp_path, max_steps=1, progress=False)
    assert not (tmp_path / "best.pt").exists()


def test_pairs_are_validated_like_inference_inputs_and_named():
    """Before: a pair with Z = 118 ended in an IndexError mid-training."""
    pairs = denoising_pairs(3, 1)
    z = pairs[1].atomic_numbers.copy()
    z[0] = 118
    pairs[1] = dataclasses.replace(pairs[1], atomic_numbers=z)
    with pytest.raises(ValueError, match=r"^pair p1: unrelaxed structure: unknown element Z=118 at atom 0"):
        PairDataset(pairs)
    pairs = denoising_pairs(4, 2)
    pair = next(p for p in pairs if len(p.atomic_numbers) > 1)
    pair.pos_relaxed[1] = pair.pos_relaxed[0]
    with pytest.raises(ValueError, match=rf"^pair {pair.id}: relaxed structure: atoms 0 and 1 overlap"):
        PairDataset(pairs)


def test_elements_outside_a_smaller_models_table_are_named(tmp_path, train_set):
    config = dataclasses.replace(CONFIG, model={"hidden_channels": 8, "num_layers": 1, "num_elements": 12})
    with pytest.raises(ValueError, match=r"the training set's pair p\d+ has element Z=\d+, outside the model's "
                                         r"table \(num_elements=12\)"):
        train(config, train_set, train_set, tmp_path, max_steps=1, progress=False)


def test_with_minima_adds_already_relaxed_pairs_of_the_chosen_fraction():
    from e3relax_fast.training import with_minima

    pairs = denoising_pairs(10, 0)
    grown = with_minima(pairs, 0.3, seed=1)
    assert grown[:10] == pairs and len(grown) == 13
    originals = {p.id: p for p in pairs}
    for pair in grown[10:]:
        source = originals[pair.id.removesuffix(":min")]
        assert pair.protocol == "minimum"
        for got, want in ((pair.pos_unrelaxed, source.pos_relaxed), (pair.pos_relaxed, source.pos_relaxed),
                          (pair.cell_unrelaxed, source.cell_relaxed), (pair.cell_relaxed, source.cell_relaxed)):
            assert np.array_equal(got, want)
    assert [p.id for p in with_minima(pairs, 0.3, seed=1)] == [p.id for p in grown]  # the seed decides
    assert len(with_minima(pairs, 1.0)) == 20 and with_minima(pairs, 0.0) == pairs
    # above 1: repeated, so that they weigh more; 1.5 = one each and a second for half of them
    assert [p.id for p in with_minima(pairs, 1.0)[10:]] == [f"{p.id}:min" for p in pairs]
    more = with_minima(pairs, 1.5, seed=1)
    assert len(more) == 25 and more[:20] == with_minima(pairs, 1.0)
    assert all(p.id.endswith(":min2") and p.protocol == "minimum" for p in more[20:])
    assert np.array_equal(more[20].pos_unrelaxed, originals[more[20].id.removesuffix(":min2")].pos_relaxed)
    assert len({p.id for p in with_minima(pairs, 2.0)}) == 30
    with pytest.raises(ValueError, match=r"must be in \[0, 4\], got 4.5"):
        with_minima(pairs, 4.5)


def test_perturbed_twins_stretch_and_rattle_the_relaxed_structure():
    from e3relax_fast.datagen.protocols import RATTLE_SIGMA, STRAIN
    from e3relax_fast.training import perturbed_twins

    pairs = denoising_pairs(40, 0)
    twins = perturbed_twins(pairs, 0.5, seed=1)
    assert len(twins) == 20 and all(t.protocol == "perturbed" for t in twins)
    originals = {p.id: p for p in pairs}
    noise = []
    for twin in twins:
        source = originals[twin.id.removesuffix(":perturbed")]
        assert np.array_equal(twin.pos_relaxed, source.pos_relaxed)  # the minimum is the target
        assert np.array_equal(twin.cell_relaxed, source.cell_relaxed)
        stretch = np.linalg.solve(source.cell_relaxed, twin.cell_unrelaxed)
        np.testing.assert_allclose(stretch, stretch.T, atol=1e-12)  # a pure stretch: no rotation
        assert 0 < np.abs(stretch - np.eye(3)).max() <= STRAIN
        noise.append(twin.pos_unrelaxed - source.pos_relaxed @ stretch)
    noise = np.concatenate(noise)
    assert abs(noise.std() - RATTLE_SIGMA) < 0.15 * RATTLE_SIGMA and abs(noise.mean()) < 0.2 * RATTLE_SIGMA
    again = perturbed_twins(pairs, 0.5, seed=1)
    assert all(np.array_equal(a.pos_unrelaxed, b.pos_unrelaxed) for a, b in zip(twins, again, strict=True))
    other = perturbed_twins(pairs, 0.5, seed=2)
    assert not np.array_equal(other[0].pos_unrelaxed, twins[0].pos_unrelaxed)
    assert perturbed_twins(pairs, 0.0) == []
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got -0.1"):
        perturbed_twins(pairs, -0.1)


def test_train_cli_minima_and_a_bad_value_is_one_line(tmp_path, capsys):
    from e3relax_fast.cli import main
    from e3relax_fast.io import write_extxyz_pairs

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    common = ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
              "--steps-per-epoch", "1", "--max-steps", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "r"), "--minima", "0.5"]) == 0
    assert len(torch.load(tmp_path / "r" / "graphs" / "train.pt", weights_only=True)["items"]) == 12
    # perturbed twins of the measured pairs only, beside the minima (not twins of the twins)
    assert main([*common, "--out", str(tmp_path / "p"), "--minima", "0.5", "--perturbed", "0.25"]) == 0
    assert len(torch.load(tmp_path / "p" / "graphs" / "train.pt", weights_only=True)["items"]) == 14
    assert len(torch.load(tmp_path / "r" / "graphs" / "val.pt", weights_only=True)["items"]) == 2  # val untouched
    assert main([*common, "--out", str(tmp_path / "bad"), "--minima", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "got 5.0" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "eval", "lofo", "train --init"])
def test_missing_data_or_checkpoint_is_one_line(tmp_path, capsys, command):
    """A folder without the split's files, or an --init checkpoint that does not exist: one error line
    naming it, exit status 2 (before: a FileNotFoundError traceback)."""
    from e3relax_fast.cli import main
    from e3relax_fast.io import write_extxyz_pairs

    empty = tmp_path / "empty"
    empty.mkdir()
    options = {"train": ["train", "--data", str(empty), "--out", str(tmp_path / "r")],
               "eval": ["eval", "--data", str(empty), "--out", str(tmp_path / "e")],
               "lofo": ["lofo", "--data", str(empty), "--out", str(tmp_path / "l")]}
    if command == "train --init":
        write_extxyz_pairs(denoising_pairs(4, 0), tmp_path / "d", "train")
        write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
        argv = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--hidden", "8", "--layers",
                "1", "--max-steps", "1", "--quiet", "--init", str(tmp_path / "missing.pt")]
        named = "missing.pt"
    else:
        argv, named = options[command], str(empty)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err and err.count("\n") == 1


def _tiny_train_command(tmp_path, steps: int) -> list[str]:
    """``e3relax-fast train`` arguments (without ``--out``) for a few tiny pairs written under ``tmp_path``."""
    from e3relax_fast.io import write_extxyz_pairs

    write_extxyz_pairs(denoising_pairs(4, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    return ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "1", "--batch-size", "2",
            "--max-steps", str(steps), "--steps-per-epoch", str(steps), "--quiet"]


class _Families:
    """What the sampler reads of a training set: its length and each pair's seed family."""

    def __init__(self, families: list[str]) -> None:
        self.pairs = [SimpleNamespace(family=f) for f in families]

    def __len__(self) -> int:
        return len(self.pairs)


@pytest.mark.parametrize(("power", "share"), [(1.0, 0.5), (0.5, 10**0.5 / (10**0.5 + 90**0.5))])
def test_family_balance_gives_a_small_family_its_share_of_the_steps(power, share):
    from e3relax_fast.training.train import _pass_order

    data = _Families(["big"] * 90 + ["small"] * 10)
    config = dataclasses.replace(CONFIG, family_balance=power)
    drawn = [k for data_pass in range(20) for k in _pass_order(data, config, data_pass)]
    assert len(drawn) == 2000 and set(drawn) <= set(range(100))
    assert abs(np.mean(np.array(drawn) >= 90) - share) < 0.05  # 2,000 draws: the standard error is ~0.011
    assert _pass_order(data, config, 3) == _pass_order(data, config, 3)  # resuming replays the order
    # Without balancing: every pair once per pass, in an order that changes from pass to pass.
    once = [_pass_order(data, CONFIG, data_pass) for data_pass in range(2)]
    assert sorted(once[0]) == sorted(once[1]) == list(range(100)) and once[0] != once[1]


def test_a_negative_family_balance_is_refused(tmp_path, train_set, capsys):
    config = dataclasses.replace(CONFIG, family_balance=-1.0)
    with pytest.raises(ValueError, match="family_balance must be >= 0, got -1.0"):
        train(config, train_set, train_set, tmp_path, max_steps=1, progress=False)
    from e3relax_fast.cli import main

    command = _tiny_train_command(tmp_path, steps=2)
    assert main([*command, "--out", str(tmp_path / "r"), "--family-balance", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: family_balance must be >= 0") and "Traceback" not in err
    assert main([*command, "--out", str(tmp_path / "ok"), "--family-balance", "1"]) == 0
    saved = torch.load(tmp_path / "ok" / "last.pt", weights_only=False)
    assert saved["train_config"]["family_balance"] == 1.0


def test_a_backend_that_cannot_train_is_refused_before_any_step(tmp_path, train_set, capsys):
    """Before: backend 'cpu' (its lattice op forward only) failed at the first step with a traceback."""
    config = dataclasses.replace(CONFIG, model={**CONFIG.model, "backend": "cpu"})
    with pytest.raises(ValueError, match=r"backend 'cpu' of lattice_message is forward only"):
        train(config, train_set, train_set, tmp_path / "a", max_steps=1, progress=False)
    assert not (tmp_path / "a" / "last.pt").exists()
    from e3relax_fast import ops
    from e3relax_fast.cli import MODEL_BACKENDS, main

    assert MODEL_BACKENDS == ops.BACKENDS  # the parser's copy of the names
    command = _tiny_train_command(tmp_path, steps=1)
    assert main([*command, "--out", str(tmp_path / "c"), "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: backend 'cuda' cannot train here") and "Traceback" not in err
    assert main([*command, "--out", str(tmp_path / "r"), "--backend", "reference"]) == 0


def test_a_truncated_graph_cache_is_rebuilt_and_saves_leave_no_partial_file(tmp_path):
    """Before: the ranks of a torchrun job built the same cache at once and one read the file while
    another wrote it (EOFError in torch.load, the job died); saves are atomic now, and a cache that
    cannot be read (truncated by an older version) is rebuilt instead of ending the run."""
    pairs = denoising_pairs(4, 5)
    cache = tmp_path / "graphs" / "train.pt"
    built = PairDataset(pairs, cache=cache)
    assert cache.exists() and [p.name for p in cache.parent.iterdir()] == ["train.pt"]  # no *.partial left
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 3])
    rebuilt = PairDataset(pairs, cache=cache)
    assert len(rebuilt) == len(built) and cache.read_bytes() != whole[: len(whole) // 3]
    for a, b in zip(built.items, rebuilt.items, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert PairDataset(pairs, cache=cache).items[0]["positions"].equal(built.items[0]["positions"])  # read back


def test_validation_report_counts_already_relaxed_pairs_kept_within_3_percent():
    """The share of the validation twins (protocol "minimum") whose predicted volume is within 3 % of
    the target's; ordinary pairs do not count; without twins the share is None."""
    from types import SimpleNamespace

    from e3relax_fast.training import PairDataset, with_minima
    from e3relax_fast.training.train import validation_report

    pairs = denoising_pairs(4, 0)
    factors = torch.tensor([1.0, 1.01, 1.029, 0.96, 1.05])  # volume factors of the first five pairs' predictions

    class ScaleCells(torch.nn.Module):
        """Returns the input structures with the k-th crystal's cell (and positions) scaled so that its
        volume is ``factors[k]`` times the input's (1.0 from the sixth on)."""

        def forward(self, batch):
            scale = torch.ones(batch.cells.shape[0], dtype=batch.cells.dtype)
            n = min(len(scale), len(factors))
            scale[:n] = factors[:n].to(scale.dtype) ** (1 / 3)
            per_atom = scale[batch.graph_index()][:, None]
            return SimpleNamespace(positions=[batch.positions * per_atom], cells=[batch.cells * scale[:, None, None]])

    twins = PairDataset(with_minima(pairs, 1.0)[4:], frame="input")  # inputs = targets: volume ratio = factor
    report = validation_report(ScaleCells(), twins, "cpu")
    assert report["minima_within_3pct"] == 3 / 4  # 1.0, 1.01, 1.029 kept; 0.96 not
    # The signal: |Δp| pooled over atoms × xyz; inputs are the targets, so Δp = p (s − 1) per crystal.
    expected = torch.cat([torch.from_numpy(p.pos_relaxed) * (f ** (1 / 3) - 1)
                          for p, f in zip(twins.pairs, factors.double(), strict=False)]).abs().mean()
    assert report["val_mae"] == pytest.approx(float(expected), rel=1e-6) and report["val_mae"] > 0
    mixed = PairDataset(with_minima(pairs, 1.0), frame="input")  # the twins follow the 4 pairs: factor 1.05
    assert validation_report(ScaleCells(), mixed, "cpu")["minima_within_3pct"] == 3 / 4  # 4 twins, 1 left out
    assert validation_report(ScaleCells(), PairDataset(pairs, frame="input"), "cpu")["minima_within_3pct"] is None


def test_train_cli_val_minima_adds_twins_to_the_validation_split_and_logs_their_share(tmp_path, capsys):
    from e3relax_fast.cli import main
    from e3relax_fast.io import write_extxyz_pairs

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    assert main(["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
                 "--steps-per-epoch", "1", "--max-steps", "1", "--out", str(tmp_path / "r"), "--val-minima", "1"]) == 0
    assert len(torch.load(tmp_path / "r" / "graphs" / "val.pt", weights_only=True)["items"]) == 4
    assert len(torch.load(tmp_path / "r" / "graphs" / "train.pt", weights_only=True)["items"]) == 8  # train untouched
    assert "already relaxed within 3 %" in capsys.readouterr().err
    history = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["state"]["history"]
    assert 0 <= history[-1]["val_minima_within_3pct"] <= 1


def test_train_cli_val_data_validates_on_other_sources(tmp_path, capsys):
    """--val-data: the validation split comes from those sources (families never trained on), the
    training split still from --data."""
    from e3relax_fast.cli import main
    from e3relax_fast.io import write_extxyz_pairs

    write_extxyz_pairs(denoising_pairs(8, 0), tmp_path / "d", "train")
    write_extxyz_pairs(denoising_pairs(2, 1), tmp_path / "d", "val")
    write_extxyz_pairs(denoising_pairs(3, 2), tmp_path / "other", "val")
    common = ["train", "--data", str(tmp_path / "d"), "--hidden", "8", "--layers", "2", "--batch-size", "4",
              "--steps-per-epoch", "1", "--max-steps", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "r"), "--val-data", str(tmp_path / "other")]) == 0
    assert len(torch.load(tmp_path / "r" / "graphs" / "val.pt", weights_only=True)["items"]) == 3
    assert len(torch.load(tmp_path / "r" / "graphs" / "train.pt", weights_only=True)["items"]) == 8
    assert main([*common, "--out", str(tmp_path / "m"), "--val-data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err
