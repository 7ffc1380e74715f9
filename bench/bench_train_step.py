"""Benchmark: one CPU training step of the shipped recipe, with and without subnormal radial-basis values.

The radial basis's far Gaussian tails are subnormal float32 numbers (about 1 % of the values), and
x86 CPUs multiply subnormals many times slower than normal numbers: the weight gradient of the
radial projections, an ``(R, E) x (E, 3H)`` product, was half of a training step.
``reference/rbf.py`` flushes them to zero (``tests/model/test_rbf.py``: the other values are the same
bits, the gradients the same). This benchmark times the step both ways on the same batches:

* ``flushed`` — the package as it is;
* ``subnormal`` — the basis as the spec writes it (``reference.rbf.radial_basis_with_subnormals``),
  patched into the two reference message ops for the duration of its calls.

A step is what ``train`` does per optimiser step (``training.train._optimizer_step``: forward, the
layer-wise loss in the canonical-frame gauge, backward, clipping, AdamW + AMSGrad, EMA) with the
shipped recipe's model (H = 64, L = 4, ``cell_transport``) and batch size (16), on the first
training pairs of ``data/chgnet_v13sym``; each provider has its own copy of the model and optimiser,
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
def unflushed_basis():
    """The two reference message ops evaluate the basis with its subnormal tails inside the block."""
    from e3relax_fast.reference import lattice_message, message_passing
    from e3relax_fast.reference.rbf import radial_basis_with_subnormals

    saved = message_passing.radial_basis, lattice_message.radial_basis
    message_passing.radial_basis = lattice_message.radial_basis = radial_basis_with_subnormals
    try:
        yield
    finally:
        message_passing.radial_basis, lattice_message.radial_basis = saved


def run(batches: int, repeats: int, info: dict) -> str:
    import torch

    from e3relax_fast.io import read_pairs
    from e3relax_fast.model import E3Relax
    from e3relax_fast.training.dataset import PairDataset
    from e3relax_fast.training.train import TrainConfig, _optimizer_step

    pairs = read_pairs(DATA, "train")[: batches * BATCH]
    data = PairDataset(pairs)
    atoms = sum(len(p.atomic_numbers) for p in pairs)
    config = TrainConfig(model={"hidden_channels": 64, "num_layers": 4, "cell_transport": True}, lr=5e-4,
                         batch_size=BATCH)
    torch.manual_seed(config.seed)
    initial = E3Relax(**config.model)

    def provider(context):
        model = copy.deepcopy(initial)
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, amsgrad=True)
        position = [0]

        def step():
            k = position[0] % batches
            position[0] += 1
            items = [data[i] for i in range(k * BATCH, (k + 1) * BATCH)]
            with context():
                _optimizer_step(model, model, ema, optimizer, items, config, "cpu", 1)

        return step

    fns = {"flushed": provider(contextlib.nullcontext), "subnormal": provider(unflushed_basis)}
    # Each timed round is one step of each provider; its batches go round the same fixed set.
    times = harness.measure_interleaved(fns, repeats=repeats, warmup=2)
    case = f"H=64 L=4, batch {BATCH}, {batches} batches of chgnet_v13sym ({atoms / len(pairs):.1f} atoms/crystal)"
    results = [harness.Result(BENCH, name, "reference", "cpu", case, statistics.median(t), BATCH / statistics.median(t),
                              "crystals/s", extra={"min_s": round(min(t), 6)}) for name, t in times.items()]
    harness.add_ratios(results, ["subnormal"])
    report.append_csv(results, BENCH, baseline="subnormal", info=info)
    rows = [[f"`{r.provider}`", f"{report.fmt_time(r.median_s)} ({report.fmt_time(r.extra['min_s'])})",
             report.fmt_num(r.throughput), report.fmt_ratio(r.ratios.get("subnormal"))] for r in results]
    table = report.markdown_table(["radial basis", "training step: median (min)", "crystals/s", "× vs subnormal"],
                                  rows)
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
