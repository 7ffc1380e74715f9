"""Command line interface: ``e3relax-fast <command> ...``.

Commands are argparse subparsers; each has an ``add_<command>_parser`` function that registers it
and sets ``func``, the function run with the parsed arguments (returns the exit status).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The message ops' backends (e3relax_fast.ops.BACKENDS, spelled out so that the parser imports no torch).
MODEL_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton", "cueq")
#: read_pairs' target_rotation choices (e3relax_fast.io.pairs.TARGET_ROTATION, spelled out for the same reason).
TARGET_ROTATION = ("remove", "keep")
#: The spike guard's window of taken steps (e3relax_fast.training.train.GUARD_WINDOW, spelled out likewise).
GUARD_WINDOW = 100


def _die(message: str, status: int = 2) -> int:
    """Print one ``error:`` line (no traceback) and return the exit status."""
    print(f"error: {message}", file=sys.stderr)
    return status


def run_relax(args: argparse.Namespace) -> int:
    """``e3relax-fast relax``: relax every structure of every input, with a manifest to resume from."""
    import os

    from . import ops
    from .io import InvalidStructureError, UnreadableFileError
    from .model import load_pretrained
    from .model.predict import check_device
    from .screen import ScreenError, collect_inputs, plan_sources, screen

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device_type = check_device(device).type
        sources = plan_sources(collect_inputs(args.inputs), args.outdir, args.format)
        model = load_pretrained(args.checkpoint or "default", map_location=device, paper_compat=args.paper_compat)
        if args.backend is not None:
            model.backend = args.backend
        # A backend that cannot run here is named now, not at the first batch.
        for op in (ops.MESSAGE_PASSING, ops.LATTICE_MESSAGE, ops.LATTICE_POOL):
            ops.resolve(op, model.backend, device_type)
        ops.resolve(ops.RADIUS_GRAPH, args.graph_backend, device_type)
    except (ScreenError, ValueError, FileNotFoundError, ops.BackendUnavailableError) as err:
        return _die(str(err))  # load_pretrained's errors name the file
    manifest = args.manifest or (args.outdir or Path(".")) / "manifest.jsonl"
    try:
        summary = screen(sources, model, manifest, on_error=args.on_error, chunk=args.chunk,
                         overwrite=args.overwrite, progress=not args.quiet, device=device,
                         batch_size=args.batch_size, max_atoms=args.max_atoms, precision=args.precision,
                         graph_backend=args.graph_backend, return_uncertainty=args.uncertainty,
                         **_frame_options(args))
    except (UnreadableFileError, InvalidStructureError, ScreenError) as err:
        return _die(str(err), 1 if isinstance(err, InvalidStructureError) else 2)
    except ValueError as err:  # an option this model or device cannot honour (e.g. tf32 on CPU)
        return _die(str(err))
    for message in summary.messages:
        print(f"error: {message}", file=sys.stderr)
    if int(os.environ.get("RANK", "0")) == 0:
        rate = summary.relaxed / summary.seconds if summary.seconds > 0 else 0.0
        print(f"relaxed {summary.relaxed} structure(s) from {summary.files} file(s) in {summary.seconds:.1f} s "
              f"({rate:.1f} structures/s); {summary.failed} failed"
              + (f", {summary.warned} with implausibly close atoms" if summary.warned else "")
              + (f"; {summary.skipped} already relaxed (manifest)" if summary.skipped else "")
              + f"; wrote {summary.written} file(s); manifest {manifest}"
              + ("; stopped at the first failure (--on-error raise)" if summary.stopped else ""))
    failed = summary.failed and args.on_error != "skip"
    return 1 if failed or summary.messages else 0


def _add_frame_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frame", choices=("auto", "canonical", "input"), default="auto",
                   help="canonical: predict each crystal in its canonical description and map back (the same "
                   "answer however a crystal is written); input: as given; auto (default): canonical, except for "
                   "the authors' checkpoints (paper_compat)")
    p.add_argument("--symmetry", choices=("auto", "keep", "free"), default="auto",
                   help="keep: project each prediction onto the input's space group (auto, the default, with the "
                   "canonical frame); free: no projection")
    p.add_argument("--symprec", type=float, default=1e-3, help="symmetry tolerance in Å (default 1e-3)")
    p.add_argument("--frame-workers", type=_frame_workers, default="auto", metavar="N|auto",
                   help="worker processes that build canonical frames beside this one (auto, the default: with at "
                   "least 4 cores per local rank, one per core beyond the rank's own, at most 8; 0: none; same "
                   "frames either way)")


def _frame_workers(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}")
    return int(text)


def _positive_length(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive length in Å, got {text!r}")
    return value


def _frame_options(args: argparse.Namespace) -> dict:
    return {"frame": args.frame, "symmetry": args.symmetry, "symprec": args.symprec,
            "frame_workers": args.frame_workers}


def add_relax_parser(subparsers) -> None:
    from .io import FORMATS
    from .screen import CHUNK

    p = subparsers.add_parser(
        "relax",
        help="predict relaxed structures of files, folders, globs, multi-frame files and ASE databases",
        description="Predict the relaxed positions and cell of every structure in the inputs (files; folders, "
        "searched recursively for CIF, POSCAR/CONTCAR/*.vasp, extxyz/xyz, ASE .traj and .db files, also compressed, "
        "leaving out earlier outputs *_relaxed*; glob patterns; anything else ASE or pymatgen reads when named) "
        "and write <stem>_relaxed.<ext> per input in the input's format: frame k of a multi-frame output is frame "
        "k of the input, a failed frame the input with info relax_status=failed. A manifest (JSON lines: input, "
        "frame, output, status, reason, seconds) records every structure; a re-run skips what it records as "
        "relaxed, so an interrupted run resumes. Several processes: torchrun --nproc-per-node N -m e3relax_fast "
        "relax ... Exit status: 0, or 1 when a structure failed (unless --on-error skip), 2 for usage errors.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files, folders or glob patterns")
    p.add_argument("-o", "--outdir", type=Path,
                   help="output folder (default: next to each input); a folder's files keep their relative paths")
    p.add_argument("--format", choices=tuple(FORMATS),
                   help="output format (default: the input's; extxyz for formats it cannot write)")
    p.add_argument("--manifest", type=Path, help="the manifest (default: OUTDIR/manifest.jsonl, or ./manifest.jsonl)")
    p.add_argument("--overwrite", action="store_true",
                   help="ignore the manifest of earlier runs and redo everything, replacing their outputs")
    p.add_argument("--checkpoint", help="checkpoint file (default: the bundled pretrained model)")
    p.add_argument("--paper-compat", action=argparse.BooleanOptionalAction, default=None,
                   help="the mode of a checkpoint that does not record it (a bare state dict)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu; cuda under torchrun: one GPU per "
                   "process)")
    p.add_argument("--batch-size", type=int, help="at most N structures per batch")
    p.add_argument("--max-atoms", type=int,
                   help="at most N atoms per batch (default: 4096 on CPU; on CUDA, from the free memory)")
    p.add_argument("--backend", choices=MODEL_BACKENDS,
                   help="kernel backend of the model's ops (default: the checkpoint's, auto)")
    p.add_argument("--graph-backend", choices=("auto", "reference", "cpu", "cuda", "triton"), default="auto",
                   help="backend of the graph builder (default: auto)")
    p.add_argument("--precision", choices=("default", "tf32", "bf16"), default="default",
                   help="matmul arithmetic: the model's own (default), TF32 (CUDA) or bf16 autocast; accuracy "
                   "against float64 in bench/RESULTS.md")
    _add_frame_arguments(p)
    p.add_argument("--uncertainty", action="store_true",
                   help="also estimate each prediction's uncertainty (its spread over other descriptions of the "
                   "crystal, Å; two more forward passes per structure): in the manifest and info['uncertainty']")
    p.add_argument(
        "--on-error",
        choices=("raise", "skip", "return_input"),
        default="raise",
        help="a structure or file that fails: stop after its chunk, exit 1 (raise, default); record it and go on, "
        "exit 0 (skip); record it, write a failed single-structure file's input unchanged and go on, exit 1 "
        "(return_input)",
    )
    p.add_argument("--chunk", type=int, default=CHUNK,
                   help="structures relaxed, written and recorded together: the most work a kill can lose "
                   f"(default {CHUNK})")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-structure messages")
    p.set_defaults(func=run_relax)


def _add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="CIF folder with split CSVs, extxyz folder, or ASE .db; repeat to combine sources")
    p.add_argument("--target-rotation", choices=TARGET_ROTATION, default="remove",
                   help="remove (default): each relaxed structure turned rigidly into its unrelaxed one's orientation "
                   "(a CIF keeps none, a relaxation applies no torque); keep: as stored (the original's recipe, and "
                   "models trained before this option)")


def run_train(args: argparse.Namespace) -> int:
    import os

    from .training import (
        PairDataset,
        TrainConfig,
        TrainingDivergedError,
        TrainingSetupError,
        init_distributed,
        perturbed_twins,
        train,
        with_minima,
    )

    if args.anchor_strain and not args.anchors:
        return _die("--anchor-strain stretches the anchors: give --anchors too")
    if args.bond_forces and not args.bond_radii:
        return _die("--bond-forces moves the atoms along the relative-length bonds: give --bond-radii too")
    if not 0 <= args.anchor_strain < 1:
        return _die(f"--anchor-strain is a stretch amplitude in [0, 1), got {args.anchor_strain}")
    init_distributed()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    config = TrainConfig(
        model={"hidden_channels": args.hidden, "num_layers": args.layers, "cell_transport": args.cell_transport,
               "element_features": args.element_features, "cell_strain": args.cell_strain, "cell_mix": args.cell_mix,
               "backend": args.backend, "edge_cutoff": args.edge_cutoff, "volume_prior": args.volume_prior,
               "cell_virial": args.cell_virial, "bond_radii": args.bond_radii,
               "bond_forces": args.bond_forces},
        lr=args.lr, lr_schedule=args.lr_schedule, batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
        max_epochs=args.max_epochs, loss=args.loss, cell_weight=args.cell_weight, prior_weight=args.prior_weight,
        seed=args.seed, dtype=args.dtype,
        frame=args.frame, init=args.init, family_balance=args.family_balance, spike_guard=args.spike_guard,
        compile_bond_terms=args.compile_bond_terms,
    )
    cache = Path(args.out) / "graphs"
    datasets = {}
    try:
        for split in (args.train_split, args.val_split):
            # Every --data source contributes its split. Graphs are built once and cached beside the
            # run (keyed by content), so reruns and resumes reuse them.
            pairs = _split_pairs(args, args.val_data if split == args.val_split and args.val_data else args.data,
                                 split)
            measured = pairs
            if split == args.train_split and args.minima:
                pairs = with_minima(measured, args.minima, seed=args.seed)
            if split == args.train_split and args.perturbed:
                pairs = pairs + perturbed_twins(measured, args.perturbed, seed=args.seed)
            if split == args.train_split and args.anchors:
                pairs = pairs + _anchor_pairs(args)
            if split == args.val_split and args.val_minima:
                pairs = with_minima(pairs, args.val_minima, seed=args.seed)
            datasets[split] = PairDataset(pairs, cache=cache / f"{split}.pt", frame=args.frame)
    except (ValueError, FileNotFoundError) as err:  # a missing split file, a bad pair (named), a bad option value
        return _die(str(err))
    try:
        summary = train(config, datasets[args.train_split], datasets[args.val_split], args.out, device=device,
                        max_steps=args.max_steps, progress=not args.quiet, time_limit=args.time_limit)
    except (TrainingSetupError, TrainingDivergedError) as err:  # the run cannot start (empty or incompatible
        return _die(str(err))  # set, --init) or diverged; other mid-run errors are bugs and keep their traceback
    print(f"trained {summary['step']} steps, {summary['epoch']} pseudo-epochs; "
          f"best validation |dp| {summary['best_val_mae']:.4f} A; checkpoints in {args.out}")
    return 0


def _split_pairs(args: argparse.Namespace, sources: list[str], split: str) -> list:
    """``train``'s pairs of ``split`` in ``sources``, read with ``--target-rotation``, without the
    families of ``--exclude-family``."""
    from .io import read_pairs

    return [p for p in read_pairs(sources, split, args.target_rotation) if p.family not in (args.exclude_family or ())]


def _anchor_pairs(args: argparse.Namespace) -> list:
    """``train --anchors``: the relaxed structures of those sources' training pairs, each as input and
    target (:func:`~e3relax_fast.training.dataset.minimum_pair`), families left out by
    ``--exclude-family`` left out here too; with ``--anchor-strain A``, each also stretched (entries
    within ±A, no displacement) as the input of a twin whose target is the relaxed structure."""
    from .training.dataset import minimum_pair, perturbed_twins

    sources = _split_pairs(args, args.anchors, args.train_split)
    strained = perturbed_twins(sources, 1.0, seed=args.seed, strain=args.anchor_strain, sigma=0.0) \
        if args.anchor_strain else []
    return [minimum_pair(p) for p in sources] + strained


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on unrelaxed -> relaxed pairs",
        description="Layer-wise supervised training (the original recipe: AdamW+amsgrad, EMA, "
        "ReduceLROnPlateau per pseudo-epoch, clipping, early stopping). Resumes from OUT/last.pt. "
        "Run under torchrun for several processes/GPUs.",
    )
    _add_data_argument(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, graph cache)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same architecture; fresh optimiser and "
                   "schedule); ignored when OUT/last.pt exists (then the run resumes)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--val-data", action="append", metavar="SOURCE",
                   help="read the validation split from these sources instead of --data (repeatable): e.g. seed "
                   "families never trained on, so that the signal that picks best.pt, lowers the rate and stops the "
                   "run measures what carries beyond the training families (those pairs then took part in model "
                   "selection: score such a family held out on other pairs)")
    p.add_argument("--hidden", type=int, default=64, help="hidden channels H (paper: 512)")
    p.add_argument("--layers", type=int, default=4, help="layers L (paper: 4)")
    p.add_argument("--exclude-family", action="append", metavar="FAMILY",
                   help="leave this seed family out of training and validation (repeatable; leave-one-family-out)")
    _add_added_pairs_options(p)
    _add_architecture_options(p)
    p.add_argument("--backend", choices=MODEL_BACKENDS, default="auto",
                   help="the model's message ops while training (auto: the fastest that supports autograd on the "
                   "device, e.g. Triton on CUDA; reference: pure PyTorch); not saved in the checkpoint")
    p.add_argument("--family-balance", type=float, default=0.0, metavar="POWER",
                   help="draw each training pair with weight (pairs of its seed family)^-POWER: 0 (default) "
                   "every pair once per pass; 1 every family the same share of the steps")
    p.add_argument("--spike-guard", type=float, default=0.0, metavar="K",
                   help="skip an optimiser step whose gradient norm is over K times the median of the last "
                   f"{GUARD_WINDOW} steps' (as a non-finite one is; its pairs are named): the update before it "
                   "carried the weights to where some crystal's prediction explodes. 0 (default): off")
    p.add_argument("--compile-bond-terms", action="store_true",
                   help="compile the bond terms (--cell-virial, --bond-radii) with torch.compile: a CPU step of "
                   "the shipped options up to 1.3x faster after minutes of compiling (a pseudo-epoch of the "
                   "card's steps, validation included, ~8 %%); the floats differ from an "
                   "uncompiled run's in the last bits, so a run is remade with the same flag (bit for bit on one "
                   "thread; on several the compiled sums over bonds run in a varying order)")
    p.add_argument("--batch-size", type=int, default=32, help="crystals per step, all processes together")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="steps per pseudo-epoch")
    p.add_argument("--max-epochs", type=int, default=800)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop at the first pseudo-epoch boundary after SECONDS of training (rerun to resume)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=("plateau", "cosine"), default="plateau",
                   help="plateau (default, the original's): lower the rate when the validation signal stalls; "
                   "cosine: decay it to zero over --max-epochs pseudo-epochs")
    p.add_argument("--loss", choices=("l2", "pbc_l1"), default="l2", help="l2: the paper's loss; pbc_l1: E3Relax-H2's")
    p.add_argument("--cell-weight", type=float, default=1.0, metavar="W",
                   help="weight of the loss's cell term against its position term (default 1: the paper's)")
    p.add_argument("--prior-weight", type=float, default=0.0, metavar="W",
                   help="with --volume-prior (and needed by it): weight of the loss term that supervises the "
                   "prior's rescale with the target's volume, |ln s - ln(V*/V)/3| per crystal (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--frame", choices=("canonical", "input"), default="canonical",
                   help="canonical (default): train where relax_batch predicts, each pair in the canonical frame "
                   "of its unrelaxed structure; input: as given (the original recipe)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=run_train)


def _add_added_pairs_options(p) -> None:
    """train's options that add pairs made from the given ones: already-relaxed, perturbed and anchor twins."""
    p.add_argument("--minima", type=float, default=0.0, metavar="FRACTION",
                   help="add already-relaxed pairs to the training split: for this fraction of its pairs (chosen "
                   "with --seed), the relaxed structure as input and target (default 0: none); above 1 (at most 4) "
                   "repeated, so that they weigh more: 2 gives every pair two")
    p.add_argument("--perturbed", type=float, default=0.0, metavar="FRACTION",
                   help="add perturbed twins to the training split: for this fraction of its pairs (chosen with "
                   "--seed), the relaxed structure strained and rattled as the rattle protocol does as input, the "
                   "relaxed structure as target (default 0: none)")
    p.add_argument("--anchors", action="append", metavar="SOURCE",
                   help="add these sources' relaxed structures to the training split, each as input and target, "
                   "without their pairs (repeatable): crystals of other chemistry that teach staying put and no "
                   "source's changes; --exclude-family applies to them too")
    p.add_argument("--anchor-strain", type=float, default=0.0, metavar="AMPLITUDE",
                   help="with --anchors: each anchor also stretched (a symmetric stretch with entries uniform in "
                   "[-AMPLITUDE, AMPLITUDE], no displacement; drawn with --seed) as the input of a twin whose target "
                   "is the relaxed structure, so that staying put is learned with the size that goes with it "
                   "(default 0: none)")
    p.add_argument("--val-minima", type=float, default=0.0, metavar="FRACTION",
                   help="the same for the validation split: its already-relaxed pairs join the validation signal "
                   "that picks best.pt and drives the schedule, and their share kept within 3 %% of the minimum's "
                   "volume is logged each pseudo-epoch (default 0: none, the original signal)")


def _add_architecture_options(p) -> None:
    """The model's optional parts (``E3Relax`` keyword arguments) as ``train`` options."""
    p.add_argument("--cell-transport", action="store_true",
                   help="carry the atoms along with each layer's cell update (E3Relax(cell_transport=True))")
    p.add_argument("--element-features", action="store_true",
                   help="add a learned map of each element's radius, electronegativity, period and group to its "
                   "embedding (E3Relax(element_features=True)); --init may then name a checkpoint without them")
    p.add_argument("--cell-strain", action="store_true",
                   help="add to each lattice vector's update the vector times a learned scalar (E3Relax("
                   "cell_strain=True)): a direct path for the cell's multiplicative change; --init may name a "
                   "checkpoint without it")
    p.add_argument("--cell-mix", action="store_true",
                   help="add to each lattice vector's update a learned combination of all three vectors, from "
                   "its node's features and the cell's shape (E3Relax(cell_mix=True)): a direct path for shear "
                   "and the lengths' ratios; --init may name a checkpoint without it")
    p.add_argument("--cell-virial", action="store_true",
                   help="add to the cell's update a strain from the bonds, shaped like the virial stress "
                   "(E3Relax(cell_virial=True)): which direction of the cell is too long, read from the bonds "
                   "along it; --init may name a checkpoint without it")
    p.add_argument("--bond-radii", action="store_true",
                   help="add to the cell's update a strain from the bonds' lengths relative to their atoms' radii "
                   "(covalent radii times a learned factor; E3Relax(bond_radii=True)): a bond too short for its "
                   "elements reads alike for every element; --init may name a checkpoint without it")
    p.add_argument("--bond-forces", action="store_true",
                   help="with --bond-radii: each layer also moves each atom along its bonds by a learned function of "
                   "their lengths relative to the radii (E3Relax(bond_forces=True)); --init may name a checkpoint "
                   "without it")
    p.add_argument("--edge-cutoff", type=_positive_length, default=None, metavar="ANGSTROM",
                   help="radial basis cutoff of the atom-atom edges only (E3Relax(edge_cutoff=...); default: the "
                   "30 A basis of every distance): e.g. 6, the graph radius, for Gaussians 0.047 A apart")
    p.add_argument("--volume-prior", action="store_true",
                   help="rescale each crystal before the first layer by a factor learned from its bonds' lengths "
                   "relative to their elements' covalent radii (E3Relax(volume_prior=True)), supervised by "
                   "--prior-weight; --init may name a checkpoint without it")


def run_eval(args: argparse.Namespace) -> int:
    from .io import read_pairs
    from .model import load_pretrained
    from .training import evaluate as evaluate_model
    from .training import write_report
    from .training.dataset import minimum_pair

    try:
        model = load_pretrained(args.checkpoint, map_location=args.device, paper_compat=args.paper_compat)
    except (ValueError, FileNotFoundError) as err:  # they name the file (or the device)
        return _die(str(err))
    try:
        pairs = [p for p in read_pairs(args.data, args.split, args.target_rotation)
                 if (not args.family or p.family in args.family) and (not args.protocol or p.protocol in args.protocol)]
    except (ValueError, FileNotFoundError) as err:  # a missing split file, a bad pair: they name it
        return _die(str(err))
    if args.minima:
        pairs = [minimum_pair(p) for p in pairs]
    if not pairs:
        print(f"error: no pairs in split {args.split!r} of {', '.join(args.data)}"
              + (f" for families {args.family}" if args.family else "")
              + (f" for protocols {args.protocol}" if args.protocol else ""), file=sys.stderr)
        return 2
    result = evaluate_model(model, pairs, device=args.device, match=not args.no_match, **_frame_options(args))
    if args.steps_saved:
        from .datagen import make_calculator, steps_saved

        calculator = make_calculator(args.steps_saved, batched=True, device=args.device)
        result["steps_saved"] = steps_saved(pairs, result["predictions"], calculator,
                                            fmax=args.fmax, max_steps=args.max_steps)
    if args.energy:
        from .datagen import energies_above_minimum, make_calculator

        result["energy"] = energies_above_minimum(pairs, result["predictions"],
                                                  make_calculator(args.energy, batched=True, device=args.device))
    sources = " + ".join(str(source) for source in args.data)
    report = write_report(result, pairs, args.out, title=f"{args.checkpoint} on {sources} ({args.split})")
    print(report.read_text())
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model against Dummy on a split",
        description="Per-structure coordinate MAE, periodicity-aware MAE, metric-tensor and volume "
        "errors and StructureMatcher match rate, averaged over structures, beside the Dummy "
        "baseline (unrelaxed as prediction). Writes report.md and PNG plots.",
    )
    _add_data_argument(p)
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", default="default", help="checkpoint path or 'default' (bundled model)")
    p.add_argument("--paper-compat", action=argparse.BooleanOptionalAction, default=None,
                   help="the mode of a checkpoint that does not record it (a bare state dict)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-match", action="store_true", help="skip the (slow) StructureMatcher match rate")
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help="evaluate only pairs of this seed family (repeatable; e.g. the family left out of training)")
    p.add_argument("--protocol", action="append", metavar="PROTOCOL",
                   help="evaluate only pairs made by this protocol (repeatable; e.g. minimum: already relaxed inputs)")
    p.add_argument("--minima", action="store_true",
                   help="score the pairs' relaxed structures as inputs, each its own target: does an already relaxed "
                   "crystal stay relaxed? (the volume-within-3 %% share is the number to read)")
    _add_frame_arguments(p)
    p.add_argument("--steps-saved", metavar="CALC",
                   help="also relax each structure with this potential (chgnet, emt, module:factory) from the "
                   "unrelaxed structure and from the prediction, and report the optimiser steps saved")
    p.add_argument("--energy", metavar="CALC",
                   help="also compute this potential's single-point energies of input, prediction and target, and "
                   "report how often the prediction is closer to the minimum than the input")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold for --steps-saved (eV/Å)")
    p.add_argument("--max-steps", type=int, default=300, help="step limit for --steps-saved")
    p.set_defaults(func=run_eval)


def run_package(args: argparse.Namespace) -> int:
    """``e3relax-fast package``: a train checkpoint and its model card as one shippable model file."""
    import json

    from .model.pretrained import package_checkpoint

    try:
        card = json.loads(Path(args.card).read_text())
    except (OSError, ValueError) as err:  # missing, unreadable, or not JSON (JSONDecodeError is a ValueError)
        return _die(f"{args.card}: not a readable JSON model card ({err})")
    if not isinstance(card, dict):
        return _die(f"{args.card}: a model card is a JSON object of its entries, not a {type(card).__name__}")
    try:
        out = package_checkpoint(args.checkpoint, card, args.out)
    except (ValueError, FileNotFoundError) as err:  # each names the checkpoint
        return _die(str(err))
    print(f"wrote {out}: {card.get('version', 'a model')} from {args.checkpoint}")
    return 0


def add_package_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "package", help="a trained model and its model card as one file that load_pretrained reads",
        description="Write a train run's best.pt (its EMA weights and model config) with a model card "
        "(a JSON object: name, version, data, training command, metrics) as one file, as the shipped "
        "e3relax_fast/weights/default.pt is made from default.card.json beside it.",
    )
    p.add_argument("--checkpoint", required=True, help="a train run's best.pt")
    p.add_argument("--card", required=True, help="the model card, a JSON file")
    p.add_argument("--out", required=True, help="the model file to write")
    p.set_defaults(func=run_package)


def run_lofo(args: argparse.Namespace) -> int:
    """``e3relax-fast lofo``: train without each family in turn and score on it (see training/lofo.py)."""
    import json
    import shlex

    from .io import read_pairs
    from .model import load_pretrained
    from .training import evaluate as evaluate_model
    from .training.lofo import heldout_summary, lofo_table

    try:
        pairs = {split: read_pairs(args.data, split, args.target_rotation) for split in ("train", "val", "test")}
    except (ValueError, FileNotFoundError) as err:
        return _die(str(err))
    present = sorted({p.family for split in pairs.values() for p in split if p.family})
    families = args.family or present
    missing = [f for f in families if f not in present]
    if missing:
        return _die(f"no pairs of famil{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} in "
                    f"{', '.join(args.data)} (families there: {', '.join(present) or 'none recorded'})")
    train_options, first_options = shlex.split(args.train_options), shlex.split(args.first_step)
    further = [shlex.split(options) for options in args.then]
    if args.trained_without and (train_options or first_options or further):
        return _die("--trained-without scores a model trained already: no --train-options, --first-step or "
                    "--then with it")
    data_options = [option for source in args.data for option in ("--data", source)]
    out = Path(args.out)
    summaries = {}
    for family in families:
        run, scored = out / family, out / family / "heldout.json"
        if scored.exists():  # a finished fold (rerun to resume the others)
            summaries[family] = json.loads(scored.read_text())
            continue
        if args.trained_without:  # a model whose training data never held the family is its own fold
            model_path = args.trained_without
        else:
            status, model_path = _train_fold(family, run, data_options, [first_options, train_options, *further],
                                             args.target_rotation)
            if status:
                return status
        try:
            model = load_pretrained(model_path, map_location=args.device)
        except (ValueError, FileNotFoundError) as err:
            return _die(str(err))
        heldout = [p for split in pairs.values() for p in split if p.family == family]
        result = evaluate_model(model, heldout, device=args.device, match=False)
        summaries[family] = {**heldout_summary(result), "model": str(model_path)}
        run.mkdir(parents=True, exist_ok=True)
        scored.write_text(json.dumps(summaries[family], indent=1))
    table = lofo_table(summaries)
    command = " ".join(shlex.quote(a) for a in ["e3relax-fast", *args.argv])
    (out / "lofo.md").write_text(f"# Leave one family out\n\n`{command}`\n\n{table}")
    print(table, end="")
    return 0


def _train_fold(family: str, run: Path, data_options: list[str], steps: list[list[str]],
                target_rotation: str) -> tuple[int, Path]:
    """Train one fold of ``e3relax-fast lofo`` into ``run``: the recipe's ``steps`` (the options of
    --first-step, empty when there is none, of --train-options, then of each --then), each without
    ``family``, with lofo's ``--target-rotation``, from the step before's best weights. Returns train's
    exit status and the last step's ``best.pt``."""
    first, second, *further = steps
    rotation = ["--target-rotation", target_rotation]
    # The first step brings its own --data; the last --init given wins, so a step's own --init (a
    # shared first step's weights, say) is overridden by the step before's in the fold.
    plan = ([(run / "first", first)] if first else []) + [(run, data_options + second)]
    plan += [(run / f"step{k}", data_options + options) for k, options in enumerate(further, start=3)]
    before = None
    for out, step in plan:
        init = ["--init", str(before / "best.pt")] if before else []
        status = run_train(build_parser().parse_args(
            ["train", "--out", str(out), "--exclude-family", family, *step, *init, *rotation]))
        if status:
            return status, out / "best.pt"
        before = out
    return 0, before / "best.pt"


def add_lofo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lofo", help="leave one seed family out: train without it, score on all of its pairs",
        description="For each seed family, `train --exclude-family F` into OUT/F, then score its best "
        "checkpoint on every pair of F (all splits) beside Dummy and the isotropic rescale to the "
        "predicted volume; writes OUT/F/heldout.json and the table OUT/lofo.md. A finished fold is "
        "kept; rerun to resume. A recipe of several steps (--first-step, --then) runs each of them without F.",
    )
    _add_data_argument(p)
    p.add_argument("--out", required=True, help="folder of the folds")
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help="hold out this family (repeatable; default: every family in the data)")
    p.add_argument("--train-options", default="", metavar="'OPTIONS'",
                   help="options for each fold's `train` (one quoted string, e.g. '--hidden 64 --cell-transport')")
    p.add_argument("--first-step", default="", metavar="'OPTIONS'",
                   help="a recipe in two steps: each fold first runs `train` with these options (its own --data "
                   "included) and --exclude-family F into OUT/F/first, then the step above with --init "
                   "OUT/F/first/best.pt")
    p.add_argument("--then", action="append", default=[], metavar="'OPTIONS'",
                   help="a further step of the recipe (repeatable, in order): `train` with these options on the "
                   "fold's --data, --exclude-family F and --init the step before's best.pt, into OUT/F/step3, "
                   "OUT/F/step4, ...; the last step's best.pt is scored")
    p.add_argument("--trained-without", metavar="CHECKPOINT",
                   help="score this model on each held-out family instead of training a fold: for families its "
                   "training data never held (e.g. seed families added after it was trained)")
    p.add_argument("--device", default="cpu", help="device of the scoring (training takes --device in --train-options)")
    p.set_defaults(func=run_lofo)


def run_datagen(args: argparse.Namespace) -> int:
    from .datagen import generate, restore_run, write_snapshot

    try:
        if args.snapshot and args.restore:
            raise ValueError("--snapshot and --restore go opposite ways; give one")
        if args.restore:
            counts = restore_run(args.restore, args.out)
            print(f"datagen: {args.out} restored from {args.restore}: {counts['pairs']} pairs, {counts['dropped']} "
                  "jobs marked dropped; run the generator's command again to resume it")
            return 0
        if args.snapshot:
            counts = write_snapshot(args.out, args.snapshot)
            print(f"datagen: snapshot of {args.out} in {args.snapshot}: {counts['pairs']} pairs {counts['splits']}; "
                  f"families {counts['families']}")
            return 0
        if args.make_seeds:
            from .datagen.prepare import make_seeds

            if args.n is None:
                raise ValueError("--make-seeds needs --n")
            made = make_seeds(args.make_seeds, args.out, args.n, seed=args.seed, calculator=args.calculator,
                              max_atoms=args.max_atoms or 10**9, fmax=args.fmax, max_steps=args.max_steps,
                              symprec=args.symprec, batch_size=args.batch_size, progress=not args.quiet)
            print(f"datagen: {made['written']} {args.make_seeds} seeds of {made['candidates']} candidates in "
                  f"{args.out} (dropped: {made['dropped']})")
            return 0
        if not args.seeds or args.n is None:
            raise ValueError("--seeds and --n are required to make pairs")
        summary = generate(
            args.seeds, args.out, args.n, protocols=args.protocol, calculator=args.calculator,
            workers=args.workers, batched=args.batched, fmax=args.fmax, max_steps=args.max_steps, seed=args.seed,
            batch_size=args.batch_size, inherit=args.inherit_splits, id_prefix=args.id_prefix, extxyz=args.extxyz,
            progress=not args.quiet, threads=args.threads, time_limit=args.time_limit,
            max_atoms=args.max_atoms or None, symprec=args.symprec,
        )
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"datagen: wrote {summary['written']} pairs ({summary['dropped']} dropped) in {summary['seconds']:.0f} s "
          f"({summary['pairs_per_hour']:.0f} pairs/hour); {args.out} holds {summary['total']} pairs ({splits})")
    return 0


def add_datagen_parser(subparsers) -> None:
    from .datagen.protocols import DEFAULT_PROTOCOLS, SYMPREC

    p = subparsers.add_parser(
        "datagen", help="make unrelaxed -> relaxed pairs from seed crystals with a potential",
        description="Perturb seed crystals (subst/subst_sym: similar-element substitution with a volume guess; "
        "rattle/jiggle: strain + displacements; seed/minimum: the seed itself), relax them with CHGNet or an ASE "
        "calculator (FIRE + unit-cell filter; symmetric protocols keep the input's space group) and write the "
        "CIF-folder pair format (CIF/, split CSVs by seed, index.csv). Resumes in OUT. With --snapshot, write "
        "OUT's compressed extxyz snapshot instead.",
    )
    p.add_argument("--seeds", action="append",
                   help="CSV with a 'cif' column, extxyz file or folder of CIFs (repeatable; required to make pairs)")
    p.add_argument("--out", required=True,
                   help="dataset folder (created; an existing one is resumed); with --make-seeds the seed file")
    p.add_argument("--n", type=int, help="pairs the folder should hold (required to make pairs)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOLS,
                   help=f"protocols with optional weights, from subst, subst_sym, rattle, jiggle, seed, minimum "
                   f"(default: {DEFAULT_PROTOCOLS})")
    p.add_argument("--calculator", default="chgnet", help="chgnet (default), emt, or module:factory")
    p.add_argument("--workers", type=int, default=1, help="relaxation processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--batched", action=argparse.BooleanOptionalAction, default=True,
                   help="batched FIRE, one potential call per step for many structures (default), or ASE's "
                   "FIRE + UnitCellFilter one structure at a time")
    p.add_argument("--batch-size", type=int, default=64, help="structures relaxed together (default 64)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold in eV/A (default 0.05)")
    p.add_argument("--max-steps", type=int, default=300, help="FIRE steps at most (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the perturbations (default 0)")
    p.add_argument("--inherit-splits", metavar="DIR",
                   help="reuse the seed -> split assignment of this dataset (e.g. chgnet_v1) to merge without leakage")
    p.add_argument("--id-prefix", default="g", help="pair ids are PREFIX + 6 digits (default g)")
    p.add_argument("--extxyz", action="store_true", help="also write OUT/extxyz/<split>_*.extxyz.gz")
    p.add_argument("--time-limit", type=float, help="start no new work after this many seconds")
    p.add_argument("--max-atoms", type=int, default=40, help="skip seeds with more atoms (default 40; 0: none)")
    p.add_argument("--symprec", type=float, default=SYMPREC,
                   help=f"spglib tolerance in A for the space group symmetric protocols keep (default {SYMPREC})")
    p.add_argument("--make-seeds", choices=("aflow", "pyxtal", "simple"),
                   help="make seed crystals instead of pairs and write them to the extxyz file OUT: aflow (pymatgen's "
                   "AFLOW prototypes, N charge-balanced decorations each), simple (its 24 simple structure types "
                   "alone: fcc, bcc, rock salt, perovskite, ...; N decorations each) or pyxtal (N random symmetric "
                   "crystals), each relaxed once with the space group kept (use --max-steps 500)")
    p.add_argument("--snapshot", metavar="DEST",
                   help="write OUT's pairs as DEST/<split>_{unrelaxed,relaxed}.extxyz.gz + index.csv + "
                   "provenance.json (family, protocol per pair) and exit")
    p.add_argument("--restore", metavar="SNAPSHOT",
                   help="rebuild the run folder OUT from a snapshot written by --snapshot (e.g. a committed data/ "
                   "folder), so the generator's command resumes where the snapshot left it, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_datagen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e3relax-fast", description="One-shot prediction of relaxed crystal structures (E3Relax)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_relax_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_datagen_parser(subparsers)
    add_lofo_parser(subparsers)
    add_package_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``e3relax-fast`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the records a command writes
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT) is how a user stops a long run: one line, no traceback
        resumes = args.command in RESUMABLE
        print(f"e3relax-fast {args.command}: interrupted; "
              + ("what it finished is kept and the same command resumes it" if resumes else "run it again"),
              file=sys.stderr)
        return 130  # the shell's status for a process ended by SIGINT


# Commands that keep what they finished on disk and pick it up when run again (relax: its manifest;
# train: OUT/last.pt; lofo: its finished folds and their trainings; datagen: the dataset folder).
RESUMABLE = frozenset({"relax", "train", "lofo", "datagen"})


if __name__ == "__main__":
    sys.exit(main())
