"""Layer-wise supervised training of E3Relax (spec §8–9), on CPU, one GPU or many with torchrun.

The recipe follows the original: AdamW (amsgrad), EMA of the weights, ReduceLROnPlateau stepped
once per pseudo-epoch on the EMA model's validation signal, gradient clipping, early stopping,
model selection on the best validation signal. Added: fixed seeds, exact resume (a checkpoint per
pseudo-epoch holds raw + EMA weights, optimizer, scheduler, step and RNG state), and a loss that is
identical whether a global batch runs in one process or is split across several.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import ops
from ..geometry import align_fractional_centroid
from ..model import E3Relax, predict_batches
from ..model.bond_radii import BondRadiiStrain
from ..model.virial import CellVirial
from .dataset import PairDataset, save_atomically
from .loss import layerwise_loss


@dataclass
class TrainConfig:
    """Training hyper-parameters; defaults are the original recipe except the pseudo-epoch size."""

    model: dict = field(default_factory=lambda: {"hidden_channels": 64, "num_layers": 4})
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 150.0
    ema_decay: float = 0.999
    batch_size: int = 32  # crystals per optimiser step, summed over all processes
    steps_per_epoch: int = 100  # pseudo-epoch: validation, scheduler, checkpoint
    max_epochs: int = 800
    lr_factor: float = 0.8
    lr_patience: int = 5
    min_lr: float = 1e-8
    early_stop: int = 15  # pseudo-epochs without improvement before stopping
    # "plateau": the original's ReduceLROnPlateau on the validation signal; "cosine": the learning rate
    # of optimiser step s is min_lr + (lr - min_lr) (1 + cos(pi s / S)) / 2 over S = max_epochs *
    # steps_per_epoch steps. In a run of a few thousand steps the EMA-smoothed validation signal keeps
    # falling, so the plateau schedule never lowers the rate; the cosine one does (a function of the
    # step alone: resuming needs no state). On v3's second step it scored level with the plateau's.
    lr_schedule: str = "plateau"
    # Weight of the cell term against the position term (1: the paper's). Most of the coordinate
    # error is the cell's: atoms ride along with it, so a wrong cell moves every atom.
    cell_weight: float = 1.0
    # Weight of the term supervising the volume prior's ln s with the target's volume: > 0 exactly when
    # the model has the prior (E3Relax(volume_prior=True)), which learns from this term alone.
    prior_weight: float = 0.0
    loss: str = "l2"  # one of LOSSES: "l2", the paper's loss; "pbc_l1", E3Relax-H2's periodicity-aware L1
    seed: int = 0
    dtype: str = "float32"
    # "canonical": pairs in the canonical frame, positions aligned by the fractional-centroid gauge
    # before the loss (how relax_batch predicts); "input": as given (the original, for paper_compat).
    frame: str = "canonical"
    # Start from this checkpoint's weights (an earlier run's best.pt, or any checkpoint load_pretrained
    # reads) instead of the seeded initialisation; optimiser, schedule and the best
    # signal start afresh. Ignored when the run directory holds a last.pt to resume from.
    init: str | None = None
    # Sampling weight of a training pair: (pairs of its seed family)^-family_balance. 0: every pair
    # once per pass in a random order (the original); 1: each family gets the same share of the steps
    # (pairs drawn with replacement), so small families are not drowned by large ones.
    family_balance: float = 0.0
    # Skip a step whose gradient norm exceeds spike_guard times the median of the last GUARD_WINDOW
    # taken steps' (0: off). Such a spike means the last update carried the weights to where some
    # crystal's prediction explodes (a replay: a step of norm 7 followed by 1e6 and 5e11); its
    # gradient, though clipped, would swell AdamW's second moments for good (AMSGrad keeps their
    # maximum) and slow every later step.
    spike_guard: float = 0.0
    # Compile the bond terms (cell_virial, bond_radii: chains of small elementwise ops over the bonds,
    # which eager PyTorch runs one kernel at a time) with torch.compile: a CPU step of the shipped
    # options up to 1.3x faster after minutes of compiling (on batches of small crystals; a pseudo-epoch
    # of the card's steps, validation included, 8 %); the floats differ from an eager run's in the
    # last bits (fused kernels round differently), so a run is remade with the same setting: bit for
    # bit on one thread (OMP_NUM_THREADS=1, as the card trains); on several, the compiled sums over the
    # bonds are split between threads in a varying order.
    compile_bond_terms: bool = False


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: float) -> float:
    if _world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device) -> torch.optim.AdamW:
    """The recipe's AdamW with AMSGrad. Fused (one kernel over all parameters, CPU and CUDA): the same
    algorithm as the per-parameter loop, which took ~10 % of a CPU training step at H = 64 (69 ms
    against 15 ms on one core). A run resumed from a ``last.pt`` written with the loop keeps the loop
    (the saved param_groups win), so it goes on along its own trajectory."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, amsgrad=True,
                             fused=torch.device(device).type in ("cpu", "cuda"))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # One multi-tensor call instead of a lerp per parameter (356 of them at H = 64, L = 4): a
    # training step runs a few hundred small ops fewer. Each weight gets the same e + (1 - decay) (p - e).
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def validation_report(model: torch.nn.Module, dataset: PairDataset, device, batch_size: int = 64) -> dict:
    """``val_mae``: the validation signal, the mean ``|Δp|`` of the last layer pooled over all validation
    atoms × xyz (Å), as the original (in a canonical-frame dataset, after the fractional-centroid gauge,
    as the loss); ``minima_within_3pct``: of the validation set's already-relaxed pairs (protocol
    ``"minimum"``, e.g. ``train --val-minima``), the share whose predicted volume is within 3 % of the
    target's (``None`` without such pairs) — the "already relaxed stays relaxed" measure, recorded
    beside the signal."""
    err, count, kept, minima = 0.0, 0, 0, 0
    predictions = predict_batches(model, dataset.batches(batch_size), device)
    start = 0
    for pred, (pos_t, cell_t) in zip(predictions, dataset.targets(batch_size), strict=True):
        positions = pred.positions
        if dataset.frame == "canonical":
            b = pred.batch
            positions = align_fractional_centroid(positions, pred.cells, b.positions, b.cells, b.graph_index(),
                                                  b.ptr[1:] - b.ptr[:-1])
        err += (positions - pos_t.to(positions.device, positions.dtype)).abs().sum().item()
        count += pos_t.numel()
        pairs = dataset.pairs[start:start + len(cell_t)]
        start += len(cell_t)
        is_min = torch.tensor([pair.protocol == "minimum" for pair in pairs])
        if is_min.any():
            ratio = torch.linalg.det(pred.cells.double().cpu()) / torch.linalg.det(cell_t.double())
            kept += int(((ratio - 1).abs() <= 0.03)[is_min].sum())
            minima += int(is_min.sum())
    return {"val_mae": err / max(count, 1), "minima_within_3pct": kept / minima if minima else None}


LR_SCHEDULES = ("plateau", "cosine")


def cosine_lr(config: TrainConfig, step: int) -> float:
    """The cosine schedule's learning rate for optimiser step ``step`` (0-based): ``config.lr`` at 0,
    ``config.min_lr`` at ``max_epochs * steps_per_epoch`` and after."""
    total = config.max_epochs * config.steps_per_epoch
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


def _named(pair_ids: list[str], shown: int = 8) -> str:
    """The skipped steps' pairs for the progress line: a few of them, the rest counted (all of them
    are in last.pt's history)."""
    more = len(pair_ids) - shown
    return f"their pairs: {', '.join(pair_ids[:shown])}" + (f" and {more} more (all in last.pt's history)"
                                                             if more > 0 else "")


def _skip_reason(config: TrainConfig) -> str:
    return "non-finite or spiking" if config.spike_guard else "non-finite"


def _minima_note(report: dict) -> str:
    share = report["minima_within_3pct"]
    return "" if share is None else f" already relaxed within 3 % {100 * share:.1f} %"


def _pass_order(train_set: PairDataset, config: TrainConfig, data_pass: int) -> list[int]:
    """The training pairs of one pass over the data, in order: a random permutation, or with
    ``config.family_balance`` as many draws (with replacement) weighted by family size."""
    n = len(train_set)
    g = torch.Generator().manual_seed(config.seed * 100_003 + data_pass)
    if not config.family_balance:
        return torch.randperm(n, generator=g).tolist()
    return torch.multinomial(_family_weights(train_set, config.family_balance), n, replacement=True,
                             generator=g).tolist()


def _family_weights(train_set: PairDataset, power: float) -> torch.Tensor:
    """``(n,)`` float64 sampling weight of each training pair: its family's size to the ``-power``."""
    families = [pair.family for pair in train_set.pairs]
    size = Counter(families)
    return torch.tensor([size[f] ** -power for f in families], dtype=torch.float64)


def _batch_items(train_set: PairDataset, config: TrainConfig, step: int, rank: int, world: int,
                 order_of) -> tuple[list[dict], list[int]]:
    """This process's share of the global batch of optimiser step ``step``, and the global batch's
    pair indices; ``order_of(pass)`` is :func:`_pass_order` for this set and config (memoised by the
    caller: one order per pass, not per step). The data order is a pure function of (seed, pass,
    position), so resuming replays it exactly."""
    steps_per_pass = max(1, len(train_set) // config.batch_size)
    data_pass, slot = divmod(step, steps_per_pass)
    order = order_of(data_pass)
    global_ids = order[slot * config.batch_size:(slot + 1) * config.batch_size]
    per_rank = config.batch_size // world
    return [train_set[k] for k in global_ids[rank * per_rank:(rank + 1) * per_rank]], global_ids


#: Taken steps whose gradient norms set the spike guard's median (``TrainConfig.spike_guard``).
GUARD_WINDOW = 100


def _spike_limit(config: TrainConfig, state: dict) -> float:
    """The gradient norm above which the next step is skipped: ``spike_guard`` times the median of the
    last GUARD_WINDOW taken steps' norms; infinite with the guard off or before that many steps."""
    norms = state.get("grad_norms", [])
    if not config.spike_guard or len(norms) < GUARD_WINDOW:
        return math.inf
    return config.spike_guard * statistics.median(norms)


def _optimizer_step(net, model, ema, optimizer, items: list[dict], config: TrainConfig, device,
                    world: int, limit: float = math.inf) -> tuple[float | None, float]:
    """One step on ``items`` (this process's share): loss, backward, clipping, update, EMA. Returns
    the global batch's loss, or ``None`` when the gradient was not finite or its norm above ``limit``
    and the step was skipped, and the gradient's norm before clipping."""
    dtype = getattr(torch, config.dtype)
    batch, pos_t, cell_t = PairDataset.collate(items)
    batch = batch.to(device, dtype)
    atom_norm = _all_sum(float(batch.num_atoms))
    cell_norm = _all_sum(9.0 * batch.num_graphs)
    out = net(batch)
    reference = (batch.positions, batch.cells) if config.frame == "canonical" else None
    # DDP averages gradients over processes; multiply by world so the result is the global sum.
    loss = layerwise_loss(out, pos_t.to(device, dtype), cell_t.to(device, dtype), batch.ptr, config.loss,
                          atom_norm, cell_norm, reference, config.cell_weight, config.prior_weight,
                          batch.cells).total * world
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    # A non-finite loss or gradient (one batch's degenerate cell, say) would make every weight NaN
    # for good: the step is skipped instead. The norm of the all-reduced gradients is the same on
    # every process, so under DDP all of them skip together.
    if not torch.isfinite(norm) or norm > limit:
        optimizer.zero_grad(set_to_none=True)
        return None, float(norm)
    optimizer.step()
    _ema_update(ema, model, config.ema_decay)
    return _all_sum(loss.item() / world), float(norm)


def _guarded_step(net, model, ema, optimizer, items: list[dict], config: TrainConfig, device, world: int,
                  state: dict) -> float | None:
    """Optimiser step ``state["step"]`` (its learning rate set by the schedule, skipped past the spike
    guard's limit, whose window it extends when taken); advances ``state["step"]``. Returns its loss,
    ``None`` when skipped."""
    if config.lr_schedule == "cosine":
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config, state["step"])
    loss, norm = _optimizer_step(net, model, ema, optimizer, items, config, device, world,
                                 _spike_limit(config, state))
    if loss is not None and config.spike_guard:
        state["grad_norms"] = [*state.get("grad_norms", []), norm][-GUARD_WINDOW:]
    state["step"] += 1
    return loss


def _save(out_dir: Path, config: TrainConfig, model, ema, optimizer, scheduler, state: dict,
          best_signal: float | None) -> None:
    """``last.pt`` (everything needed to resume) and, when the validation signal improved
    (``best_signal``), ``best.pt`` (the EMA weights)."""
    record = {"config": {**model.config}, "train_config": asdict(config)}
    if best_signal is not None:
        save_atomically({**record, "state_dict": ema.state_dict(), "val_mae": best_signal}, out_dir / "best.pt")
    save_atomically({**record, "model": model.state_dict(), "ema": ema.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
                     out_dir / "last.pt")


class TrainingSetupError(ValueError):
    """A run that cannot start, for the reason the message names (an empty or incompatible set, a batch
    size, an --init checkpoint): a user error. Errors raised once training runs are not of this kind."""


class TrainingDivergedError(RuntimeError):
    """Every optimiser step of a pseudo-epoch had a non-finite loss or gradient: the run stopped
    (``last.pt`` and ``best.pt`` hold the weights before it; the message names the step)."""


#: Architecture options whose parts start at zero (config key -> their parameters' prefix): ``--init``
#: may grow a checkpoint without them into a model with them.
GROWABLE = {"element_features": "element_features.", "cell_strain": "cell_strain_layers.",
            "cell_mix": "cell_mix_layers.", "volume_prior": "volume_prior.",
            "cell_virial": "cell_virial_layers.", "bond_radii": "bond_radii_layers.",
            "bond_forces": "bond_radii_layers."}


def _load_init(model: E3Relax, ema: torch.nn.Module, path: str) -> None:
    """Copy the weights of checkpoint ``path`` (read by ``load_pretrained``: e.g. an earlier run's
    best.pt, its EMA weights) into ``model`` and ``ema``; :class:`TrainingSetupError` naming the first difference
    when its architecture is not the configured one."""
    from ..model import load_pretrained

    try:
        source = load_pretrained(path, paper_compat=model.paper_compat)
    except (ValueError, FileNotFoundError) as err:  # a missing or unreadable checkpoint: it names the file
        raise TrainingSetupError(f"--init: {err}") from err
    differences = {k: (source.config.get(k), v) for k, v in model.config.items() if source.config.get(k) != v}
    # A model grown by the element features, the cell strain or the volume prior (parts that start at
    # zero) starts from a checkpoint without them: it predicts what that checkpoint predicts.
    grown = [key for key in GROWABLE if differences.get(key) in ((False, True), (None, True))]
    for key in grown:
        del differences[key]
    if differences:
        key, (theirs, ours) = next(iter(differences.items()))
        raise TrainingSetupError(f"--init {path}: its {key} is {theirs!r}, this run's is {ours!r} "
                         f"(train with the same architecture to start from it)")
    for target in (model, ema):
        missing, unexpected = target.load_state_dict(source.state_dict(), strict=not grown)
        if grown and (unexpected or any(not k.startswith(tuple(GROWABLE[key] for key in grown)) for k in missing)):
            raise TrainingSetupError(f"--init {path}: parameters do not match beyond the parts it grows "
                                     f"({', '.join(grown)}; missing {missing}, unexpected {unexpected})")


def _check_elements(model: E3Relax, datasets: dict[str, PairDataset]) -> None:
    """:class:`TrainingSetupError` naming the first pair with an element outside the model's table (an IndexError
    deep inside the embedding otherwise, mid-training)."""
    for split, data in datasets.items():
        for k, item in enumerate(data.items):
            z = int(item["atomic_numbers"].max())
            if z >= model.num_elements:
                raise TrainingSetupError(f"the {split} set's pair {data.pairs[k].id} has element Z={z}, outside the "
                                         f"model's table (num_elements={model.num_elements})")


def _check_sets(config: TrainConfig, train_set: PairDataset, val_set: PairDataset) -> None:
    """:class:`TrainingSetupError` for an option or a set the run cannot start with."""
    if not config.family_balance >= 0:
        raise TrainingSetupError(f"family_balance must be >= 0, got {config.family_balance}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise TrainingSetupError(f"unknown lr_schedule {config.lr_schedule!r}; expected one of {LR_SCHEDULES}")
    for split, data in (("training", train_set), ("validation", val_set)):
        if data.frame != config.frame:
            raise TrainingSetupError(f"the {split} set is in the {data.frame!r} frame but config.frame is "
                                     f"{config.frame!r}")
        if len(data) == 0:
            raise TrainingSetupError(f"the {split} set is empty")


def _start(config: TrainConfig, out_dir: Path, device, model, ema, optimizer, scheduler) -> dict:
    """The run's state: resumed from ``out_dir/last.pt`` (weights, optimiser, schedule) when present;
    else fresh, from ``config.init``'s weights when given."""
    last = out_dir / "last.pt"
    if not last.exists():
        if config.init:
            _load_init(model, ema, config.init)
        return {"step": 0, "epoch": 0, "best": math.inf, "bad_epochs": 0, "history": []}
    ckpt = torch.load(last, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["state"]


def train(config: TrainConfig, train_set: PairDataset, val_set: PairDataset, out_dir: str | Path,
          device: str = "cpu", max_steps: int | None = None, progress: bool = True,
          time_limit: float | None = None) -> dict:
    """Train, resuming from ``out_dir/last.pt`` when present; returns a summary dict.

    Writes ``last.pt`` (everything needed to resume, every pseudo-epoch) and ``best.pt`` (EMA
    weights of the best validation signal, loadable by :func:`e3relax_fast.load_pretrained`).
    ``max_steps`` stops early (tests, smoke runs); ``time_limit`` (seconds since this call's first step)
    stops at the first pseudo-epoch boundary past it (a lent machine's budget; rerun to resume). Under torchrun,
    each process takes a disjoint slice of every global batch and the wrapped model averages
    gradients (DDP).
    """
    rank, world = _world()
    _check_sets(config, train_set, val_set)
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    model = E3Relax(**config.model).to(device=device, dtype=dtype)
    _check_backend(model.backend, torch.device(device).type)
    _check_elements(model, {"training": train_set, "validation": val_set})
    if bool(config.prior_weight > 0) != model.use_volume_prior:
        raise TrainingSetupError("--volume-prior and --prior-weight W > 0 go together: the prior learns from that "
                                 "term alone")
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.lr_factor,
                                                           patience=config.lr_patience, min_lr=config.min_lr)
    state = _start(config, out_dir, device, model, ema, optimizer, scheduler)
    if config.compile_bond_terms:
        compile_bond_terms(model)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if config.batch_size % world:
        raise TrainingSetupError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    order_of = functools.lru_cache(maxsize=1)(functools.partial(_pass_order, train_set, config))
    start_time = time.time()
    while state["epoch"] < config.max_epochs:
        epoch_steps = config.steps_per_epoch
        if max_steps is not None:
            epoch_steps = min(epoch_steps, max_steps - state["step"])
        if epoch_steps <= 0:
            break
        losses, skipped_pairs = [], []
        for _ in range(epoch_steps):
            items, batch_ids = _batch_items(train_set, config, state["step"], rank, world, order_of)
            losses.append(_guarded_step(net, model, ema, optimizer, items, config, device, world, state))
            if losses[-1] is None:  # named, so the crystal that blows up a step can be found
                skipped_pairs += [train_set.pairs[k].id for k in batch_ids]
        finite = [loss for loss in losses if loss is not None]
        skipped = len(losses) - len(finite)
        if not finite:
            raise TrainingDivergedError(
                f"training diverged: all {skipped} optimiser steps up to step {state['step']} had a "
                f"{_skip_reason(config)} loss or gradient; {out_dir} keeps the weights of pseudo-epoch "
                f"{state['epoch']} (last.pt) and of the best validation signal (best.pt)")
        state["epoch"] += 1
        report = validation_report(ema, val_set, device)
        signal = report["val_mae"]
        if config.lr_schedule == "plateau":
            scheduler.step(signal)
        improved = signal < state["best"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["best"] = min(state["best"], signal)
        state["history"].append({"epoch": state["epoch"], "step": state["step"],
                                 "train_loss": sum(finite) / len(finite), "val_mae": signal,
                                 "skipped_steps": skipped, "skipped_pairs": skipped_pairs,
                                 "lr": optimizer.param_groups[0]["lr"],
                                 "val_minima_within_3pct": report["minima_within_3pct"]})
        if rank == 0:
            _save(out_dir, config, model, ema, optimizer, scheduler, state, signal if improved else None)
            if progress:
                print(f"epoch {state['epoch']:4d} step {state['step']:7d} loss {sum(finite) / len(finite):.4f} "
                      f"val |dp| {signal:.4f} A (best {state['best']:.4f}) lr {optimizer.param_groups[0]['lr']:.2e} "
                      f"{time.time() - start_time:.0f}s{_minima_note(report)}"
                      + (f" ({skipped} steps skipped: {_skip_reason(config)} gradient; {_named(skipped_pairs)})"
                         if skipped else ""), file=sys.stderr,
                      flush=True)
        if state["bad_epochs"] > config.early_stop:
            break
        # Every process stops at the same pseudo-epoch: rank 0's clock decides.
        if time_limit is not None and _all_sum(float(rank == 0 and time.time() - start_time > time_limit)):
            break
    return {"step": state["step"], "epoch": state["epoch"], "best_val_mae": state["best"],
            "history": state["history"]}


def compile_bond_terms(model: E3Relax) -> None:
    """Compile ``model``'s bond-term modules in place (``nn.Module.compile``, dynamic shapes: a batch's
    bond count changes every step): the state dict and checkpoints are the same as uncompiled.

    Raises:
        TrainingSetupError: the model has no bond terms (``cell_virial``, ``bond_radii``) to compile.
    """
    terms = [m for m in model.modules() if isinstance(m, (CellVirial, BondRadiiStrain))]
    if not terms:
        raise TrainingSetupError("--compile-bond-terms: the model has no bond terms (--cell-virial, --bond-radii)")
    for module in terms:
        module.compile(dynamic=True)


def _check_backend(backend: str, device_type: str) -> None:
    """Refuse, before any step, a model backend that cannot train here: one that does not run on the
    device, or a forward-only one (named explicitly; ``auto`` skips those when gradients are needed)."""
    for op in (ops.MESSAGE_PASSING, ops.LATTICE_MESSAGE, ops.LATTICE_POOL):
        try:
            name, _ = ops.resolve(op, backend, device_type, needs_grad=True)
        except ops.BackendUnavailableError as err:
            raise TrainingSetupError(f"backend {backend!r} cannot train here: {err}") from err
        if not ops.OPS[op].impls[name].differentiable:
            raise TrainingSetupError(f"backend {backend!r} of {op} is forward only (no gradients); train with "
                                     "'auto' or a backend that supports autograd")


def init_distributed() -> None:
    """Join the process group that torchrun describes (gloo on CPU, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
