"""Training: the loss falls, resuming continues exactly, and 2-process DDP equals 1 process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from e3relax_fast.io import Pair, read_pairs, write_extxyz_pairs
from e3relax_fast.training import PairDataset
from e3relax_fast.training.train import TrainConfig, train


def _denoising_pairs(n: int, seed: int) -> list[Pair]:
    """Rattled + strained rock-salt-like cells (unrelaxed) and the ideal cells (relaxed)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        a = rng.uniform(3.8, 4.6)
        frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0.5]])[: rng.integers(1, 5)]
        z = rng.choice([3, 8, 11, 12, 17, 19], size=len(frac))
        cell_r = np.eye(3) * a
        strain = np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))
        cell_u = cell_r @ (strain + strain.T) / 2
        pos_r = frac @ cell_r
        pos_u = frac @ cell_u + rng.normal(0, 0.08, frac.shape)
        pairs.append(Pair(f"p{k}", z.astype(np.int64), pos_u, cell_u, pos_r, cell_r))
    return pairs


@pytest.fixture(scope="module")
def datasets():
    torch.set_num_threads(1)
    return PairDataset(_denoising_pairs(24, 0)), PairDataset(_denoising_pairs(6, 1))


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


def test_best_checkpoint_loads_for_inference(tmp_path, datasets):
    from e3relax_fast import load_pretrained

    train_set, val_set = datasets
    cfg = TrainConfig(model={"hidden_channels": 8, "num_layers": 2}, batch_size=4, steps_per_epoch=2)
    train(cfg, train_set, val_set, tmp_path, max_steps=2, progress=False)
    model = load_pretrained(tmp_path / "best.pt")
    assert model.hidden_channels == 8 and not model.paper_compat


def test_extxyz_pairs_round_trip(tmp_path):
    pairs = _denoising_pairs(5, 2)
    write_extxyz_pairs(pairs, tmp_path, "train")
    back = read_pairs(tmp_path, "train")
    assert [p.id for p in back] == [p.id for p in pairs]
    for a, b in zip(pairs, back, strict=True):
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        for field in ("pos_unrelaxed", "cell_unrelaxed", "pos_relaxed", "cell_relaxed"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-8)


def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch on 1 and on 2 gloo processes: same weights after a few steps."""
    data = tmp_path / "data"
    write_extxyz_pairs(_denoising_pairs(16, 3), data, "train")
    write_extxyz_pairs(_denoising_pairs(4, 4), data, "val")
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


def test_ase_db_and_cif_folder_readers(tmp_path):
    """The other two dataset formats read back the same pairs."""
    from ase import Atoms
    from ase.db import connect
    from ase.io import write

    pairs = _denoising_pairs(4, 6)
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
