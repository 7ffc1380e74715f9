"""Command line interface: ``e3relax-fast <command> ...``.

Commands are argparse subparsers; each has an ``add_<command>_parser`` function that registers it
and sets ``func``, the function run with the parsed arguments (returns the exit status).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("cif", "extxyz")


def run_relax(args: argparse.Namespace) -> int:
    """``e3relax-fast relax``: relax every structure of every input file in shared batches."""
    from .io import InvalidStructureError, UnreadableFileError
    from .model import load_pretrained
    from .relax import output_path, relax_files

    inputs = [Path(p) for p in args.inputs]
    formats = [args.format or ("cif" if p.suffix.lower() == ".cif" else "extxyz") for p in inputs]
    outputs = [output_path(p, args.outdir, f) for p, f in zip(inputs, formats, strict=True)]
    duplicates = sorted({str(o) for o in outputs if outputs.count(o) > 1})
    if duplicates:
        print(f"error: several inputs would write {', '.join(duplicates)}; use -o", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.checkpoint or "default", map_location=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        outcome = relax_files(inputs, outputs, formats, model, on_error=args.on_error, device=args.device,
                              batch_size=args.batch_size, max_atoms=args.max_atoms, precision=args.precision,
                              return_uncertainty=args.uncertainty, **_frame_options(args))
    except (UnreadableFileError, InvalidStructureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # an option this model or device cannot honour (e.g. tf32 on CPU)
        print(f"error: {err}", file=sys.stderr)
        return 2
    for message in outcome.errors:
        print(f"error: {message}", file=sys.stderr)
    if args.uncertainty:
        table = (args.outdir or Path(".")) / "uncertainty.csv"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text("input,structure,uncertainty_A\n"
                         + "".join(f"{path},{k},{value:.6f}\n" for path, k, value in outcome.uncertainty))
        print(f"uncertainty (Å, ranks error; not an error bar) of {len(outcome.uncertainty)} structure(s): {table}")
    failed = outcome.structures - outcome.relaxed
    print(
        f"relaxed {outcome.relaxed} of {outcome.structures} structure(s) from {outcome.files_read} of "
        f"{len(inputs)} file(s) in {outcome.seconds:.2f} s; wrote {len(outcome.written)} file(s)"
        + (f" ({failed} structure(s) failed)" if failed else "")
    )
    return 0


def _add_frame_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frame", choices=("auto", "canonical", "input"), default="auto",
                   help="canonical: predict each crystal in its canonical description and map back (the same "
                   "answer however a crystal is written); input: as given; auto (default): canonical, except for "
                   "the authors' checkpoints (paper_compat)")
    p.add_argument("--symmetry", choices=("auto", "keep", "free"), default="auto",
                   help="keep: project each prediction onto the input's space group (auto, the default, with the "
                   "canonical frame); free: no projection")
    p.add_argument("--symprec", type=float, default=1e-3, help="symmetry tolerance in Å (default 1e-3)")


def _frame_options(args: argparse.Namespace) -> dict:
    return {"frame": args.frame, "symmetry": args.symmetry, "symprec": args.symprec}


def add_relax_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "relax",
        help="predict relaxed structures",
        description="Predict the relaxed positions and cell of every structure in the input files "
        "(CIF, POSCAR, extxyz or anything else ASE or pymatgen reads; multi-frame files give "
        "several structures) and write <stem>_relaxed.<ext> per input file.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files")
    p.add_argument("-o", "--outdir", type=Path, help="output directory (default: next to each input)")
    p.add_argument("--checkpoint", help="checkpoint file (default: the bundled pretrained model)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--batch-size", type=int, help="at most N structures per batch")
    p.add_argument("--max-atoms", type=int, help="at most N atoms per batch (default: 4096 on CPU)")
    p.add_argument("--precision", choices=("default", "tf32", "bf16"), default="default",
                   help="matmul arithmetic: the model's own (default), TF32 (CUDA) or bf16 autocast; accuracy "
                   "against float64 in bench/RESULTS.md")
    _add_frame_arguments(p)
    p.add_argument("--uncertainty", action="store_true",
                   help="also estimate each prediction's uncertainty (its spread over other descriptions of the "
                   "crystal, Å; two more forward passes per structure): uncertainty.csv and info['uncertainty']")
    p.add_argument(
        "--on-error",
        choices=("raise", "skip", "return_input"),
        default="raise",
        help="invalid structure or unreadable file: stop (raise, default), leave it out (skip), "
        "or write the input unchanged (return_input)",
    )
    p.add_argument("--format", choices=FORMATS, help="output format (default: cif for CIF inputs, else extxyz)")
    p.set_defaults(func=run_relax)


def _add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="CIF folder with split CSVs, extxyz folder, or ASE .db; repeat to combine sources")


def run_train(args: argparse.Namespace) -> int:
    import os

    from .io import read_pairs
    from .training import PairDataset, TrainConfig, init_distributed, train

    init_distributed()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    config = TrainConfig(
        model={"hidden_channels": args.hidden, "num_layers": args.layers, "cell_transport": args.cell_transport},
        lr=args.lr, batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
        max_epochs=args.max_epochs, loss=args.loss, seed=args.seed, dtype=args.dtype, frame=args.frame,
    )
    cache = Path(args.out) / "graphs"
    datasets = {}
    for split in (args.train_split, args.val_split):
        # Every --data source contributes its split. Graphs are built once and cached beside the
        # run (keyed by content), so reruns and resumes reuse them.
        pairs = [p for p in read_pairs(args.data, split) if p.family not in (args.exclude_family or ())]
        datasets[split] = PairDataset(pairs, cache=cache / f"{split}.pt", frame=args.frame)
    summary = train(config, datasets[args.train_split], datasets[args.val_split], args.out, device=device,
                    max_steps=args.max_steps, progress=not args.quiet)
    print(f"trained {summary['step']} steps, {summary['epoch']} pseudo-epochs; "
          f"best validation |dp| {summary['best_val_mae']:.4f} A; checkpoints in {args.out}")
    return 0


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on unrelaxed -> relaxed pairs",
        description="Layer-wise supervised training (the original recipe: AdamW+amsgrad, EMA, "
        "ReduceLROnPlateau per pseudo-epoch, clipping, early stopping). Resumes from OUT/last.pt. "
        "Run under torchrun for several processes/GPUs.",
    )
    _add_data_argument(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, graph cache)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--hidden", type=int, default=64, help="hidden channels H (paper: 512)")
    p.add_argument("--layers", type=int, default=4, help="layers L (paper: 4)")
    p.add_argument("--exclude-family", action="append", metavar="FAMILY",
                   help="leave this seed family out of training and validation (repeatable; leave-one-family-out)")
    p.add_argument("--cell-transport", action="store_true",
                   help="carry the atoms along with each layer's cell update (E3Relax(cell_transport=True))")
    p.add_argument("--batch-size", type=int, default=32, help="crystals per step, all processes together")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="steps per pseudo-epoch")
    p.add_argument("--max-epochs", type=int, default=800)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", choices=("l2", "pbc_l1"), default="l2", help="l2: the paper's loss; pbc_l1: E3Relax-H2's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--frame", choices=("canonical", "input"), default="canonical",
                   help="canonical (default): train where relax_batch predicts, each pair in the canonical frame "
                   "of its unrelaxed structure; input: as given (the original recipe)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=run_train)


def run_eval(args: argparse.Namespace) -> int:
    from .io import read_pairs
    from .model import load_pretrained
    from .training import evaluate as evaluate_model
    from .training import write_report

    model = load_pretrained(args.checkpoint, map_location=args.device)
    pairs = [p for p in read_pairs(args.data, args.split) if not args.family or p.family in args.family]
    if not pairs:
        print(f"error: no pairs in split {args.split!r} of {', '.join(args.data)}"
              + (f" for families {args.family}" if args.family else ""), file=sys.stderr)
        return 2
    result = evaluate_model(model, pairs, device=args.device, match=not args.no_match, **_frame_options(args))
    if args.steps_saved:
        from .datagen import make_calculator, steps_saved

        calculator = make_calculator(args.steps_saved, batched=True, device=args.device)
        result["steps_saved"] = steps_saved(pairs, result["predictions"], calculator,
                                            fmax=args.fmax, max_steps=args.max_steps)
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
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-match", action="store_true", help="skip the (slow) StructureMatcher match rate")
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help="evaluate only pairs of this seed family (repeatable; e.g. the family left out of training)")
    _add_frame_arguments(p)
    p.add_argument("--steps-saved", metavar="CALC",
                   help="also relax each structure with this potential (chgnet, emt, module:factory) from the "
                   "unrelaxed structure and from the prediction, and report the optimiser steps saved")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold for --steps-saved (eV/Å)")
    p.add_argument("--max-steps", type=int, default=300, help="step limit for --steps-saved")
    p.set_defaults(func=run_eval)


def run_datagen(args: argparse.Namespace) -> int:
    from .datagen import generate, write_snapshot

    try:
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
    p.add_argument("--make-seeds", choices=("aflow", "pyxtal"),
                   help="make seed crystals instead of pairs and write them to the extxyz file OUT: aflow (pymatgen's "
                   "AFLOW prototypes, N charge-balanced decorations each) or pyxtal (N random symmetric crystals), "
                   "each relaxed once with the space group kept (use --max-steps 500)")
    p.add_argument("--snapshot", metavar="DEST",
                   help="write OUT's pairs as DEST/<split>_{unrelaxed,relaxed}.extxyz.gz + index.csv + "
                   "provenance.json (family, protocol per pair) and exit")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``e3relax-fast`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
