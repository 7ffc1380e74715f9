"""Evaluation with the field's metrics beside the Dummy baseline (spec §10).

Predictions are made as a user gets them, by :func:`~e3relax_fast.relax_batch` (canonical frame,
symmetry kept, by default), and compared with the targets in each pair's own description. Every
metric is computed per structure and averaged over structures. Dummy uses the unrelaxed structure
as its prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..batch import Batch
from ..io.compare import structures_match
from ..io.pairs import Pair
from ..relax import relax_batch
from .loss import unwrap_targets
from .metrics import structure_metrics

#: "Already relaxed stays relaxed": a predicted volume within this fraction of the target's.
VOLUME_TOLERANCE = 0.03
METRICS = {  # name -> (label, unit)
    "coord_mae": ("coordinate MAE", "Å"),
    "pbc_coord_mae": ("periodicity-aware MAE", "Å"),
    "shape_error": ("metric-tensor error ‖CCᵀ−C*C*ᵀ‖", "Å²"),
    "volume_error": ("volume error", "Å³"),
}


def predict(model: torch.nn.Module, pairs: list[Pair], device="cpu", **options) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-pair predictions ``[(positions (n, 3) Å, cell (3, 3) Å)]`` in each pair's own description,
    by :func:`~e3relax_fast.relax_batch` (``options`` go to it, e.g. ``frame`` and ``symmetry``)."""
    inputs = [(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs]
    return [(pos, cell) for _, pos, cell in relax_batch(inputs, model, device=device, **options)]


def inputs_and_targets(pairs: list[Pair]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The unrelaxed structures as one float64 batch, and the targets in the pairs' own description:
    ``(batch, positions (N, 3) Å unwrapped to the image nearest each input atom, cells (G, 3, 3) Å)``."""
    batch = Batch.from_arrays([(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs])
    cells = torch.stack([torch.from_numpy(p.cell_relaxed) for p in pairs])
    positions, _ = unwrap_targets(batch.positions, torch.from_numpy(np.concatenate([p.pos_relaxed for p in pairs])),
                                  cells, batch.ptr)
    return batch, positions, cells


def _match_rate(pairs: list[Pair], predictions) -> float | None:
    """Fraction matched by pymatgen's StructureMatcher at its defaults; None without pymatgen."""
    guesses = [(p.atomic_numbers, pos, cell) for p, (pos, cell) in zip(pairs, predictions, strict=True)]
    matches = structures_match(guesses, [(p.atomic_numbers, p.pos_relaxed, p.cell_relaxed) for p in pairs])
    return None if matches is None else sum(matches) / max(len(pairs), 1)


def ratio_interval(model_err: np.ndarray, dummy_err: np.ndarray, resamples: int = 2000, seed: int = 0
                   ) -> tuple[float, float]:
    """95 % bootstrap interval of ``mean(model_err) / mean(dummy_err)``: structures resampled with
    replacement, the two errors of a structure kept together (paired), fixed seed. ``(nan, nan)``
    when Dummy's error is zero on every structure (e.g. already-relaxed inputs): no ratio exists."""
    if not np.any(dummy_err > 0):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(model_err), (resamples, len(model_err)))
    ratios = model_err[idx].mean(1) / np.maximum(dummy_err[idx].mean(1), 1e-300)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def evaluate(model: torch.nn.Module, pairs: list[Pair], device="cpu", match: bool = True, **options) -> dict:
    """Metrics of ``model`` and of Dummy on ``pairs`` (``options`` go to :func:`predict`).

    Returns ``{"model": {metric: mean}, "dummy": {...}, "rescale": {...}, "true_cell": {...},
    "true_volume": {...}, "ratio_ci": {metric: (lo, hi)},
    "better": {metric: fraction of structures where the model's error is below Dummy's},
    "families": {family: {"n": count, "model": {...}, "dummy": {...}, "rescale": {...}}} (and so
    "protocols" and "family_protocols", keyed ``"family · protocol"``),
    "per_structure": {"model": {metric: (G,) array}, "dummy": {...}, "rescale": {...}},
    "predictions": [...]}``; "rescale" is the input scaled isotropically to the model's predicted
    volume (does the model know more than the volume?); "true_cell" the input's fractions in the
    relaxed cell (the coordinate error left were the cell exactly right and no atom moved within it);
    "true_volume" the model's prediction scaled isotropically to the target's volume (the error left
    were the model's volume exact: how much of it is the cell's shape?);
    ``match_rate`` is included when pymatgen is. ``ratio_ci`` is the 95 % bootstrap interval of
    model / Dummy (:func:`ratio_interval`).
    """
    predictions = predict(model, pairs, device, **options)
    batch, pos_t, cell_t = inputs_and_targets(pairs)
    pred_pos = torch.from_numpy(np.concatenate([p for p, _ in predictions]))
    pred_cell = torch.from_numpy(np.stack([c for _, c in predictions]))
    # "Rescale": the input scaled isotropically to the model's predicted volume (fractions kept), the
    # baseline that tells whether the model knows more than the volume.
    scale = (torch.linalg.det(pred_cell) / torch.linalg.det(batch.cells)).abs() ** (1 / 3)
    # "True cell": the input's fractions in the relaxed cell, the coordinate error left when the cell
    # is exactly right and no atom moves within it (how much of the error is the cell's?).
    graph = batch.graph_index()
    fractions = torch.linalg.solve(batch.cells[graph].transpose(1, 2), batch.positions.unsqueeze(-1)).squeeze(-1)
    # "True volume": the prediction scaled isotropically (about the origin, fractions kept) to the
    # target's volume: what is left is the prediction's cell shape and its atoms' fractions.
    to_target = (torch.linalg.det(cell_t) / torch.linalg.det(pred_cell)).abs() ** (1 / 3)

    def scaled(positions, cells, factor):  # every structure scaled about the origin by its (G,) factor
        return structure_metrics(positions * factor[graph].unsqueeze(-1), cells * factor.reshape(-1, 1, 1),
                                 pos_t, cell_t, batch.ptr)

    per = {
        "model": structure_metrics(pred_pos, pred_cell, pos_t, cell_t, batch.ptr),
        "true_volume": scaled(pred_pos, pred_cell, to_target),
        "dummy": structure_metrics(batch.positions, batch.cells, pos_t, cell_t, batch.ptr),
        "rescale": scaled(batch.positions, batch.cells, scale),
        "true_cell": structure_metrics(torch.einsum("ni,nij->nj", fractions, cell_t[graph]), cell_t, pos_t, cell_t,
                                       batch.ptr),
    }
    per = {who: {k: v.numpy() for k, v in m.items()} for who, m in per.items()}
    summary = {who: {k: float(v.mean()) for k, v in m.items()} for who, m in per.items()}
    summary["ratio_ci"] = {k: ratio_interval(per["model"][k], per["dummy"][k]) for k in per["model"]}
    summary["better"] = {k: float((per["model"][k] < per["dummy"][k]).mean()) for k in per["model"]}
    # Per structure 1.0 when the volume is within VOLUME_TOLERANCE of the target's (higher is better,
    # so outside the error ratios above); the rescale has the model's volume by construction.
    target_volume = torch.linalg.det(cell_t).abs().numpy()
    for who, cells in (("model", pred_cell), ("dummy", batch.cells), ("rescale", pred_cell)):
        ratio = torch.linalg.det(cells).abs().numpy() / target_volume
        per[who]["volume_within"] = (np.abs(ratio - 1) <= VOLUME_TOLERANCE).astype(np.float64)
        summary[who]["volume_within"] = float(per[who]["volume_within"].mean())
    groups = {"families": [p.family or "?" for p in pairs], "protocols": [p.protocol or "?" for p in pairs],
              "family_protocols": [f"{p.family or '?'} · {p.protocol or '?'}" for p in pairs]}
    for key, labels in groups.items():
        labels = np.array(labels)
        summary[key] = {
            label: {"n": int(np.sum(labels == label)),
                    **{who: {k: float(v[labels == label].mean()) for k, v in m.items()} for who, m in per.items()}}
            for label in sorted(set(labels))
        }
    if match:
        dummy = [(p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs]
        for who, preds in (("model", predictions), ("dummy", dummy)):
            rate = _match_rate(pairs, preds)
            if rate is not None:
                summary[who]["match_rate"] = rate
    return {**summary, "per_structure": per, "predictions": predictions}


def _ratio(value: float, dummy: float) -> str:
    """``value / dummy`` to 3 decimals, "n/a" where Dummy's error is zero (e.g. unchanged cells)."""
    return f"{value / dummy:.3f}" if dummy > 0 else "n/a"


def _group_table(result: dict, key: str = "families", what: str = "seed family") -> list[str]:
    """Per seed family (or protocol): model and the isotropic rescale to the model's volume, each / Dummy."""
    families = result.get(key) or {}
    if len(families) < 2:
        return []
    lines = ["", f"Per {what} (model / Dummy and rescale / Dummy; rescale = the input scaled to the model's "
             "predicted volume; true volume = the prediction scaled to the target's volume; true cell = the input's "
             "fractions in the relaxed cell; then the share of structures with the volume within "
             f"{100 * VOLUME_TOLERANCE:.0f} % of the target's, model and Dummy):", "",
             f"| {what} | structures | coordinate MAE model | coordinate MAE rescale | coordinate MAE true volume | "
             "coordinate MAE true cell | volume error model | volume within: model | Dummy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, r in families.items():
        coord, vol = r["dummy"]["coord_mae"], r["dummy"]["volume_error"]
        lines.append(f"| {family} | {r['n']} | {_ratio(r['model']['coord_mae'], coord)} | "
                     f"{_ratio(r['rescale']['coord_mae'], coord)} | {_ratio(r['true_volume']['coord_mae'], coord)} | "
                     f"{_ratio(r['true_cell']['coord_mae'], coord)} | "
                     f"{_ratio(r['model']['volume_error'], vol)} | "
                     f"{100 * r['model']['volume_within']:.0f} % | {100 * r['dummy']['volume_within']:.0f} % |")
    return lines


def _share_table(result: dict) -> list[str]:
    """Per seed family and protocol, largest first: its share of Dummy's summed coordinate error, the
    model / Dummy ratio there and its share of the model's: which groups decide the split's ratio."""
    groups = result.get("family_protocols") or {}
    dummy = {g: r["n"] * r["dummy"]["coord_mae"] for g, r in groups.items()}
    model = {g: r["n"] * r["model"]["coord_mae"] for g, r in groups.items()}
    dummy_total, model_total = sum(dummy.values()), sum(model.values())
    if len(groups) < 2 or not dummy_total > 0:
        return []
    lines = ["", "Where the coordinate error is, per seed family and protocol (sums over structures; the split's "
             "model / Dummy is the Dummy-share-weighted mean of the groups' ratios):", "",
             "| seed family · protocol | structures | share of Dummy's error | model / Dummy | share of the model's |",
             "|---|---|---|---|---|"]
    for group in sorted(groups, key=lambda g: -dummy[g]):
        lines.append(f"| {group} | {groups[group]['n']} | {100 * dummy[group] / dummy_total:.1f} % | "
                     f"{_ratio(model[group], dummy[group])} | "
                     + (f"{100 * model[group] / model_total:.1f} % |" if model_total > 0 else "n/a |"))
    return lines


def _cell_baselines(result: dict) -> str:
    """The report's sentence on how much of the coordinate error the cell and its volume carry."""
    true_cell, dummy = result["true_cell"]["coord_mae"], result["dummy"]["coord_mae"]
    true_volume = result["true_volume"]["coord_mae"]
    return (f"The input's fractions in the relaxed cell (the cell exactly right, no atom moved within it): "
            f"coordinate MAE {true_cell:.4f} Å, {_ratio(true_cell, dummy)} × Dummy: what is left of Dummy's "
            "coordinate error once the cell is right. The prediction scaled isotropically to the target's volume "
            f"(its volume exact, its shape and fractions as predicted): {true_volume:.4f} Å, "
            f"{_ratio(true_volume, dummy)} × Dummy: what a perfect volume alone would give.")


def write_report(result: dict, pairs: list[Pair], out_dir: str | Path, title: str) -> Path:
    """Markdown report and PNG plots (predicted vs true volume and lattice lengths, error histograms)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "",
             f"{len(pairs)} structures; means over structures; the interval is a 95 % paired bootstrap "
             "interval of model / Dummy (2,000 resamples of the structures); \"model better on\": share of "
             "structures where the model's error is below Dummy's.", "",
             "| metric | model | Dummy | model / Dummy | 95 % interval | model better on |",
             "|---|---|---|---|---|---|"]
    for key, (label, unit) in METRICS.items():
        m, d = result["model"][key], result["dummy"][key]
        lo, hi = result["ratio_ci"][key]
        interval = f"{lo:.3f}–{hi:.3f}" if np.isfinite(lo) else "n/a"
        lines.append(f"| {label} ({unit}) | {m:.4f} | {d:.4f} | {_ratio(m, d)} | {interval} | "
                     f"{100 * result['better'][key]:.0f} % |")
    if "match_rate" in result["model"]:
        lines.append(f"| match rate (StructureMatcher defaults) | {100 * result['model']['match_rate']:.1f}% | "
                     f"{100 * result['dummy']['match_rate']:.1f}% | | | |")
    lines.append(f"| volume within {100 * VOLUME_TOLERANCE:.0f} % of the target's (share of structures) | "
                 f"{100 * result['model']['volume_within']:.1f}% | {100 * result['dummy']['volume_within']:.1f}% "
                 "| | | |")
    lines += ["", _cell_baselines(result)]
    lines += _group_table(result) + _group_table(result, "protocols", "protocol") + _share_table(result)
    energy = result.get("energy")
    if energy is not None:
        lines += ["", f"Single-point energy above the relaxed structure's ({energy['n']} structures with all three "
                  f"energies): the prediction is closer to the minimum than the input on "
                  f"{100 * energy['fraction_closer']:.1f} %; median above the minimum: prediction "
                  f"{1000 * energy['median_prediction_above']:.1f} meV/atom, input "
                  f"{1000 * energy['median_input_above']:.1f} meV/atom."]
    saved = result.get("steps_saved")
    if saved is not None:
        lines += ["", f"Potential steps to converge (FIRE, both starts converged for {saved['n_both_converged']} of "
                  f"{len(saved['ids'])} structures): from the unrelaxed structure {saved['mean_steps_unrelaxed']:.1f}, "
                  f"from the prediction {saved['mean_steps_prediction']:.1f}; saved {saved['mean_steps_saved']:.1f} "
                  f"on average ({100 * saved['fraction_steps_saved']:.1f} % of all steps, median "
                  f"{saved['median_steps_saved']:.1f}); final energy, prediction start minus unrelaxed start: "
                  f"{1000 * saved['mean_energy_difference']:+.2f} meV/atom."]
    path = out_dir / "report.md"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines += ["", "(matplotlib not installed: no plots)"]
    else:
        true_cells = np.stack([p.cell_relaxed for p in pairs])
        unrelaxed = np.stack([p.cell_unrelaxed for p in pairs])
        pred_cells = np.stack([c for _, c in result["predictions"]])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, fn, name in ((axes[0], lambda c: np.abs(np.linalg.det(c)), "volume (Å³)"),
                             (axes[1], lambda c: np.linalg.norm(c, axis=-1).ravel(), "lattice lengths (Å)")):
            t = fn(true_cells)
            ax.scatter(t, fn(unrelaxed), s=8, alpha=0.5, label="Dummy (unrelaxed)")
            ax.scatter(t, fn(pred_cells), s=8, alpha=0.7, label="model")
            ax.plot([t.min(), t.max()], [t.min(), t.max()], "k--", lw=1)
            ax.set_xlabel(f"true {name}")
            ax.set_ylabel(f"predicted {name}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "parity.png", dpi=120)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
        for ax, (key, (label, unit)) in zip(axes, METRICS.items(), strict=True):
            m, d = result["per_structure"]["model"][key], result["per_structure"]["dummy"][key]
            bins = np.linspace(0, max(m.max(), d.max()), 30)
            ax.hist(d, bins=bins, alpha=0.5, label="Dummy")
            ax.hist(m, bins=bins, alpha=0.7, label="model")
            ax.set_xlabel(f"{label} ({unit})")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "errors.png", dpi=120)
        plt.close(fig)
        lines += ["", "![parity](parity.png)", "", "![errors](errors.png)"]
    path.write_text("\n".join(lines) + "\n")
    return path
