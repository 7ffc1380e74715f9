"""Benchmark: one CPU training step of the shipped recipe, each speed-up of the step undone in turn.

The variants, each one change from the one before, all on the same batches:

* ``subnormal, whole basis, loop`` — the radial basis as the spec writes it, with its far Gaussian
  tails as subnormal float32 numbers (``reference.rbf.radial_basis_with_subnormals``: x86 CPUs
  multiply subnormals many times slower than normal numbers; on an Intel Xeon the weight gradient
  of the radial projections, an ``(R, E) x (E, 3H)`` product, was half of a step), all 128 centres,
  the per-parameter AdamW loop and EMA;
* ``flushed, whole basis, loop`` — subnormals flushed to 0 (``reference.rbf.radial_basis``;
  ``tests/model/test_rbf.py``: the other values are the same bits, the gradients the same);
* ``flushed, window, loop`` — the basis computed and projected only over the centres that can be
  non-zero for the batch's distances (``reference.rbf.nonzero_window``: 39 of 128 for the 6 Å
  graph's edges in float32; the others are exact zeros);
* ``fused AdamW + EMA`` — also the fused AdamW and the multi-tensor EMA (``training.train.make_optimizer``,
  ``_ema_update``), the message ops still the reference's under autograd (``backend="reference"``);
* ``package`` — the package as it is: also the atom–atom message op's fused CPU backend with its fused
  backward (``backend="auto"``: ``csrc/message_passing_backward_cpu.cpp``; the lattice op stays the
  reference's under autograd);
* ``package, bond strain`` — the same step of the model with the bond strain (``cell_virial``, the
  model card's recipes A and A2, not shipped: ``model/virial.py``, pure PyTorch): what that term costs;
* ``package, both bond strains`` — also the relative-length bond strain (``bond_radii``,
  ``model/bond_radii.py``, pure PyTorch);
* ``package, both bond strains, forces`` — also its pair forces along the bonds (``bond_forces``): the
  shipped model's options (v6.1).

A step is what ``train`` does per optimiser step (``training.train._optimizer_step``: forward, the
layer-wise loss in the canonical-frame gauge, backward, clipping, AdamW + AMSGrad, EMA) with the
v5 recipe's model (H = 64, L = 4, ``cell_transport``, ``cell_strain``; the last three variants add
``cell_virial``, then ``bond_radii``, then ``bond_forces``: the shipped v6.1's) and batch size (16), on
the first training pairs of ``data/chgnet_v13sym``; each provider has its own copy of the model and optimiser,
started from the same seed, and steps through the same batches.

    python -m bench.bench_train_step                 # 1 thread, as `train` runs in the card (~2 min)
    python -m bench.bench_train_step --threads 2
    python -m bench.bench_train_step --write         # also into bench/RESULTS.md (its own section)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from pathlib import Path

from . import harness, report

BENCH = "train_step"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DATA = Path(__file__).resolve().parent.parent / "data" / "chgnet_v13sym"
BATCH = 16


@contextlib.contextmanager
def undone(subnormal: bool, window: bool, fused: bool):
    """Inside the block the reference message ops, and the EMA of ``train``, as the variant says."""
    import importlib

    import torch

    from e3relax_fast.reference import lattice_message, message_passing
    from e3relax_fast.reference.rbf import radial_basis_with_subnormals

    train = importlib.import_module("e3relax_fast.training.train")  # the package re-exports train()

    def ema_loop(ema, model, decay):
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)

    modules = (message_passing, lattice_message)
    saved = [(m.radial_basis, m.nonzero_window) for m in modules], train._ema_update
    for m in modules:
        if not window:
            m.nonzero_window = lambda *args: slice(None)
        if subnormal:
            m.radial_basis = radial_basis_with_subnormals
    if not fused:
        train._ema_update = ema_loop
    try:
        yield
    finally:
        for m, (basis, nonzero) in zip(modules, saved[0], strict=True):
            m.radial_basis, m.nonzero_window = basis, nonzero
        train._ema_update = saved[1]


#: name: (subnormal, window, fused optimiser, fused message op, bond strains), one change at a time; bond
#: strains: 0 none, 1 the virial one (cell_virial), 2 that and the relative-length one (bond_radii), 3 those
#: and its pair forces (bond_forces).
VARIANTS = {
    "subnormal, whole basis, loop": (True, False, False, False, 0),
    "flushed, whole basis, loop": (False, False, False, False, 0),
    "flushed, window, loop": (False, True, False, False, 0),
    "fused AdamW + EMA": (False, True, True, False, 0),
    "package": (False, True, True, True, 0),
    "package, bond strain": (False, True, True, True, 1),
    "package, both bond strains": (False, True, True, True, 2),
    "package, both bond strains, forces": (False, True, True, True, 3),
}


def run(batches: int, repeats: int, info: dict) -> str:
    import torch

    from e3relax_fast.io import read_pairs
    from e3relax_fast.model import E3Relax
    from e3relax_fast.training.dataset import PairDataset
    from e3relax_fast.training.train import TrainConfig, _optimizer_step, make_optimizer

    pairs = read_pairs(DATA, "train")[: batches * BATCH]
    data = PairDataset(pairs)
    atoms = sum(len(p.atomic_numbers) for p in pairs)
    config = TrainConfig(model={"hidden_channels": 64, "num_layers": 4, "cell_transport": True, "cell_strain": True},
                         lr=5e-4, batch_size=BATCH)
    initial = {}
    for strains in (0, 1, 2, 3):  # the same seed: the bond terms' layers are the only difference
        torch.manual_seed(config.seed)
        initial[strains] = E3Relax(**config.model, cell_virial=strains >= 1, bond_radii=strains >= 2,
                                   bond_forces=strains == 3)

    def provider(subnormal: bool, window: bool, fused: bool, fused_op: bool, strains: int):
        model = copy.deepcopy(initial[strains])
        model.backend = "auto" if fused_op else "reference"
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = make_optimizer(model, config, "cpu") if fused else torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
            amsgrad=True, foreach=False)
        position = [0]

        def step():
            k = position[0] % batches
            position[0] += 1
            items = [data[i] for i in range(k * BATCH, (k + 1) * BATCH)]
            with undone(subnormal, window, fused):
                _optimizer_step(model, model, ema, optimizer, items, config, "cpu", 1)

        return step

    fns = {name: provider(*flags) for name, flags in VARIANTS.items()}
    # Each timed round is one step of each variant; its batches go round the same fixed set.
    times = harness.measure_interleaved(fns, repeats=repeats, warmup=2)
    case = f"H=64 L=4, batch {BATCH}, {batches} batches of chgnet_v13sym ({atoms / len(pairs):.1f} atoms/crystal)"
    results = [harness.Result(BENCH, name, "reference", "cpu", case, statistics.median(t), BATCH / statistics.median(t),
                              "crystals/s", extra={"min_s": round(min(t), 6)}) for name, t in times.items()]
    first = next(iter(VARIANTS))
    harness.add_ratios(results, list(VARIANTS))
    report.append_csv(results, BENCH, baseline=first, info=info)
    rows = [[f"`{r.provider}`", f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})",
             report.fmt_num(r.throughput), report.fmt_ratio(r.ratios.get(above.provider)) if k else "",
             report.fmt_ratio(r.ratios.get(first))]
            for k, (r, above) in enumerate(zip(results, [results[0], *results[:-1]], strict=True))]
    table = report.markdown_table(["variant", "training step: median (min)", "crystals/s", "× vs the row above",
                                   f"× vs `{first}`"], rows)
    header = report.header_md(f"CPU training step ({case})",
                              f"python -m bench.bench_train_step --batches {batches} --repeats {repeats} "
                              f"--threads {info['torch_threads']} --write", info)
    return f"{header}\n{table}\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6, help="distinct batches of 16 training pairs (default 6)")
    ap.add_argument("--repeats", type=int, default=12, help="timed steps per provider (default 12)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the card's training)")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md (section train-step)")
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    md = run(args.batches, args.repeats, harness.machine())
    print(md)
    if args.write:
        RESULTS.write_text(report.splice_section(RESULTS.read_text(), "train-step", md))


if __name__ == "__main__":
    main()
