"""Benchmark: which cheap per-structure signal ranks the prediction's error (``e3relax_fast.uncertainty``).

Each candidate is computed for every test pair of ``data/chgnet_v1..v3`` and compared, by Spearman
rank correlation ρ, with the errors of the prediction ``relax_batch`` makes (canonical frame, symmetry
kept; ``e3relax_fast.training.evaluate``): the coordinate MAE (Å) and the volume error (Å³) per
structure, and, for context, the error of Dummy (the unrelaxed structure: how far the structure had
to relax). The candidates:

* **spread over equivalent descriptions** (``frame_spread``): RMS deviation (Å) of the positions
  predicted in K other descriptions of the canonical cell (lattice vectors permuted, atoms re-imaged)
  and mapped back; K = 1, 2 (the default), 4; with the lattice permutations alone and the re-imaging
  alone; and the standard deviation of the predicted volume over the same descriptions (Å³);
* **free** (from the one forward pass): the size of the last layer's update, of the last two layers'
  updates, the predicted displacement (all, and beyond the homogeneous deformation of the cell) and
  the cell's strain ``|F - I|``;
* **reference**: the primitive cell's atom count (a size effect the signals should beat).

Also reported: the cost of the default spread next to one ``relax_batch`` call on the same inputs, the
spread's scale next to the error, and the error when the mean over the descriptions is taken as the
answer (a by-product: test-time averaging over descriptions).

    python -m bench.bench_uncertainty                              # shipped model, 424 test pairs (~5 min)
    python -m bench.bench_uncertainty --models default runs/canon1/best.pt
    python -m bench.bench_uncertainty --n 100                      # a quick look
    python -m bench.bench_uncertainty --never-seen data/chgnet_v5b # does it flag unseen families?

``--never-seen FOLDER``: the default spread on FOLDER's test pairs (seed families the model was not
trained on) beside the in-family test pairs: medians, and the probability that a never-seen pair's
spread exceeds an in-family pair's (AUROC; 0.5: no signal, above: it flags them).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from . import harness, report
from .inputs import chunks_by_atoms

BENCH = "uncertainty"
DATA = Path(__file__).resolve().parent.parent / "data"
FOLDERS = ("chgnet_v1", "chgnet_v2", "chgnet_v3")
BOOTSTRAP = 1000


def load_pairs(n: int | None):
    """The test pairs of ``data/chgnet_v1..v3`` (the first ``n``, if given)."""
    from e3relax_fast.io import read_pairs

    return read_pairs([DATA / f for f in FOLDERS], "test")[:n]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks (ties share their mean rank)."""
    def ranks(v):
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def interval(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of :func:`spearman` (structures resampled with replacement, fixed seed)."""
    rng = np.random.default_rng(seed)
    draws = [spearman(x[i], y[i]) for i in rng.integers(0, len(x), (BOOTSTRAP, len(x)))]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def rms(vectors: np.ndarray) -> float:
    """RMS length (Å) of ``(m, 3)`` vectors after removing their mean (a translation no model can know)."""
    return float(np.sqrt(np.mean(np.sum((vectors - vectors.mean(axis=0)) ** 2, axis=-1))))


def free_signals(model, frames) -> dict[str, np.ndarray]:
    """The signals of the one forward pass on the canonical cells, per structure."""
    import torch

    from e3relax_fast.batch import Batch

    rows = []
    triples = [(f.numbers, f.positions, f.cell) for f in frames]
    dtype = next(model.parameters()).dtype
    for chunk in chunks_by_atoms(triples, 4096):
        batch = Batch.from_arrays(chunk).with_graph(model.radius, model.max_neighbors).to(dtype=dtype)
        with torch.inference_mode():
            out = model(batch)
        ptr = batch.ptr.tolist()
        layers = [p.double().numpy() for p in out.positions]
        for g, (_, start, cell) in enumerate(chunk):
            p = [layer[ptr[g]:ptr[g + 1]] for layer in layers]
            predicted_cell = out.cells[-1][g].double().numpy()
            deformation = np.linalg.solve(cell, predicted_cell)
            rows.append({
                "free: last layer's update (Å)": rms(p[-1] - p[-2]),
                "free: last two layers' updates (Å)": rms(p[-1] - p[-2]) + rms(p[-2] - p[-3]),
                "free: predicted displacement (Å)": rms(p[-1] - start),
                "free: displacement beyond the cell's deformation (Å)": rms(p[-1] - start @ deformation),
                "free: strain ‖F − I‖": float(np.linalg.norm(deformation - np.eye(3))),
            })
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def spread_signals(model, frames, max_k: int) -> tuple[dict[str, tuple[np.ndarray, int]], list]:
    """``{name: (signal, extra forwards)}`` of the description spreads, and the predictions of
    descriptions 0..max_k (for the averaging by-product)."""
    from e3relax_fast.uncertainty import description, equivalent_predictions, position_spread

    predictions = equivalent_predictions(model, frames, descriptions=max_k)
    signals = {}
    for k in sorted({1, 2, max_k}):
        signals[f"spread, K = {k} (Å)"] = (np.array([position_spread(p[:k + 1]) for p, _ in predictions]), k)
    signals[f"volume spread, K = {max_k} (Å³)"] = (
        np.array([np.linalg.det(c).std() for _, c in predictions]), max_k)
    identity = np.eye(3, dtype=np.int64)
    for name, views in (("lattice permutations alone", [(description(k)[0], None) for k in (1, 2)]),
                        ("re-imaging alone", [(identity, description(k)[1]) for k in (1, 2)])):
        ablation = equivalent_predictions(model, frames, descriptions=views)
        signals[f"spread, K = 2, {name} (Å)"] = (np.array([position_spread(p) for p, _ in ablation]), 2)
    return signals, predictions


def averaged_error(frames, predictions, k: int, targets) -> float:
    """Coordinate MAE (Å, mean over structures) when the mean of descriptions 0..k is the answer."""
    errors = []
    for frame, (positions, cells), target in zip(frames, predictions, targets, strict=True):
        cell = cells[:k + 1].mean(axis=0)
        user_positions, _ = frame.to_user(frame.align(positions[:k + 1].mean(axis=0), cell), cell)
        errors.append(np.abs(user_positions - target).mean())
    return float(np.mean(errors))


def cost(model, name: str, pairs, frames, repeats: int, info: dict) -> tuple[float, float]:
    """Median seconds of ``relax_batch`` on the pairs and of the default ``frame_spread`` with the
    canonical predictions reused (as ``relax_batch`` would); both appended to the CSV log."""
    from e3relax_fast import relax_batch
    from e3relax_fast.batch import Batch
    from e3relax_fast.model import predict_batches
    from e3relax_fast.uncertainty import frame_spread

    triples = [(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs]
    batches = [Batch.from_arrays(chunk) for chunk in chunks_by_atoms([(f.numbers, f.positions, f.cell)
                                                                      for f in frames], 4096)]
    own = [s for prediction in predict_batches(model, batches) for s in prediction.per_structure()]
    times = harness.measure_interleaved({"relax_batch": lambda: relax_batch(triples, model),
                                         "frame_spread": lambda: frame_spread(model, frames, predictions=own)},
                                        repeats=repeats)
    results = [harness.Result(BENCH, provider, "reference", "cpu", f"{name}, {len(pairs)} test pairs",
                              statistics.median(t), len(pairs) / statistics.median(t), "structures/s")
               for provider, t in times.items()]
    harness.add_ratios(results, ["relax_batch"])
    report.append_csv(results, BENCH, baseline="relax_batch", info=info)
    return results[0].median_s, results[1].median_s


def run_model(name: str, pairs, max_k: int, repeats: int, info: dict) -> str:
    """The markdown section of one model (a bundled name or a checkpoint path)."""
    import torch

    from e3relax_fast import load_pretrained
    from e3relax_fast.frame import canonical_frame
    from e3relax_fast.training import unwrap_targets
    from e3relax_fast.training.evaluate import evaluate
    from e3relax_fast.uncertainty import DESCRIPTIONS

    model = load_pretrained(name)
    per_structure = evaluate(model, pairs, match=False)["per_structure"]
    coord, dummy = per_structure["model"]["coord_mae"], per_structure["dummy"]["coord_mae"]
    volume = per_structure["model"]["volume_error"]
    frames = [canonical_frame(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs]
    spreads, predictions = spread_signals(model, frames, max_k)
    candidates = {**spreads, **{k: (v, 0) for k, v in free_signals(model, frames).items()},
                  "reference: atoms in the primitive cell": (np.array([len(f.numbers) for f in frames], float), 0)}
    rows = []
    for label, (signal, forwards) in candidates.items():
        lo, hi = interval(signal, coord)
        rows.append([label, str(forwards), f"{spearman(signal, coord):.3f} ({lo:.2f}–{hi:.2f})",
                     f"{spearman(signal, volume):.3f}", f"{spearman(signal, dummy):.3f}"])
    t_relax, t_spread = cost(model, name, pairs, frames, repeats, info)
    targets = [unwrap_targets(torch.from_numpy(p.pos_unrelaxed), torch.from_numpy(p.pos_relaxed),
                              torch.from_numpy(p.cell_relaxed)[None], torch.tensor([0, len(p.atomic_numbers)]))[0]
               .numpy() for p in pairs]
    averaged = ", ".join(f"K = {k}: {averaged_error(frames, predictions, k, targets):.4f} Å"
                         for k in sorted({0, DESCRIPTIONS, max_k}))
    ratio = candidates[f"spread, K = {DESCRIPTIONS} (Å)"][0] / coord
    table = report.markdown_table(["signal", "extra forwards", "ρ coordinate MAE (95 % interval)", "ρ volume error",
                                   "ρ Dummy's coordinate MAE"], rows)
    return (f"### `{name}`\n\n- {len(pairs)} test pairs; coordinate MAE {coord.mean():.4f} Å (Dummy "
            f"{dummy.mean():.4f} Å); ρ(model's error, Dummy's error) = {spearman(coord, dummy):.3f}: how far a "
            "structure had to relax, which no signal sees directly\n\n" + table + "\n\n"
            f"- cost of the default (`frame_spread`, K = {DESCRIPTIONS}: {DESCRIPTIONS} extra forward passes, the "
            f"canonical predictions reused): {report.fmt_time(t_spread)} next to {report.fmt_time(t_relax)} for "
            f"`relax_batch` on the same pairs (+{100 * t_spread / t_relax:.0f} %)\n"
            f"- scale: spread (K = {DESCRIPTIONS}) / coordinate MAE per structure, median {np.median(ratio):.2f} "
            f"(10–90 %: {np.percentile(ratio, 10):.2f}–{np.percentile(ratio, 90):.2f}): a ranking, not an error bar\n"
            f"- by-product, the mean over descriptions 0..K as the answer: coordinate MAE {averaged} "
            "(K = 0: the canonical answer alone)\n")


def never_seen(name: str, pairs, folder: str) -> str:
    """The default spread (``relax_batch(..., return_uncertainty=True)``) on the in-family ``pairs`` and
    on ``folder``'s test pairs: medians and the AUROC of "never seen" by a larger spread."""
    from e3relax_fast import relax_batch
    from e3relax_fast.io import read_pairs
    from e3relax_fast.model import load_pretrained

    model = load_pretrained(name)
    spreads = []
    for group in (pairs, read_pairs(folder, "test")):
        inputs = [(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in group]
        spreads.append(np.array(relax_batch(inputs, model, return_uncertainty=True).uncertainty, dtype=float))
    inside, outside = spreads
    # AUROC by ranks (Mann-Whitney): P(spread of a never-seen pair > spread of an in-family pair), ties half.
    ranks = np.argsort(np.argsort(np.concatenate([inside, outside]), kind="stable"), kind="stable") + 1.0
    auroc = (ranks[len(inside):].sum() - len(outside) * (len(outside) + 1) / 2) / (len(inside) * len(outside))
    return (f"- `{name}`, never-seen families (`{folder}`, test split, {len(outside)} pairs): median spread "
            f"{np.median(outside):.4f} Å against {np.median(inside):.4f} Å on the {len(inside)} in-family test "
            f"pairs; AUROC of a larger spread for a never-seen pair: {auroc:.2f} (0.5: no signal)\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_uncertainty", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default"], help="bundled names or checkpoint paths")
    ap.add_argument("--n", type=int, default=None, help="only the first N test pairs")
    ap.add_argument("--max-k", type=int, default=4, help="the most descriptions compared (1..23)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--never-seen", metavar="FOLDER",
                    help="instead of the ρ study: the spread on FOLDER's test pairs (families the model never saw) "
                    "against the in-family test pairs")
    args = ap.parse_args(argv)
    harness.set_threads(args.threads)
    info = harness.machine()
    pairs = load_pairs(args.n)
    command = "python -m bench.bench_uncertainty " + " ".join(
        [f"--models {' '.join(args.models)}"] + ([f"--n {args.n}"] if args.n else []) + [f"--max-k {args.max_k}"]
        + ([f"--never-seen {args.never_seen}"] if args.never_seen else []))
    if args.never_seen:  # the never-seen comparison alone: the ρ study is the default run
        md = report.header_md("Uncertainty on never-seen families: the spread in and out of the training "
                              "families", command, info)
        md += (f"- inputs: the in-family test pairs of data/chgnet_v1..v3 and the test pairs of {args.never_seen}; "
               "spread = `relax_batch(..., return_uncertainty=True)` per structure (canonical frame, symmetry "
               "kept)\n\n")
        print(md + "".join(never_seen(name, pairs, args.never_seen) for name in args.models))
        return
    md = report.header_md("Uncertainty per structure: Spearman ρ of cheap signals with the error", command, info)
    md += ("- inputs: the test pairs of data/chgnet_v1..v3; errors of `relax_batch` (canonical frame, symmetry "
           "kept) per structure; ρ: Spearman rank correlation, 95 % bootstrap interval over structures "
           f"({BOOTSTRAP} resamples)\n\n")
    print(md + "\n".join(run_model(name, pairs, args.max_k, args.repeats, info) for name in args.models))


if __name__ == "__main__":
    main()
