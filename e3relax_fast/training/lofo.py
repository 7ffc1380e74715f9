"""Leave one family out: does the recipe generalise to chemistry it has not seen?

For each seed family (:data:`~e3relax_fast.io.pairs.FAMILIES`) a model is trained without that
family (``train --exclude-family F``) and scored on every pair of it, all splits together (none was
seen in training or model selection), beside Dummy (the unrelaxed input as the prediction) and the
isotropic rescale of the input to the model's predicted volume (does the model know more than the
volume?). The command is ``e3relax-fast lofo``; this module holds the per-family summary and the
table that goes into the model card.
"""

from __future__ import annotations

from .evaluate import _ratio

#: The metrics of the table: coordinate MAE (Å) and volume error (Å³), each model / Dummy.
LOFO_METRICS = ("coord_mae", "volume_error")


def heldout_summary(result: dict) -> dict:
    """The numbers of one held-out family from :func:`~e3relax_fast.training.evaluate` 's result on
    its pairs: ``{"n": pairs, metric: {"model", "dummy", "rescale": mean, "ci": (lo, hi) of model /
    Dummy}, "volume_within": {"model", "dummy": share within 3 %}}`` (JSON-ready)."""
    n = len(result["per_structure"]["model"]["coord_mae"])
    summary = {"n": n}
    for metric in LOFO_METRICS:
        summary[metric] = {who: result[who][metric] for who in ("model", "dummy", "rescale")}
        summary[metric]["ci"] = list(result["ratio_ci"][metric])
    summary["volume_within"] = {who: result[who]["volume_within"] for who in ("model", "dummy")}
    return summary


def beats_dummy(summary: dict) -> bool:
    """The held-out family's model error is below Dummy's on both coordinate MAE and volume error."""
    return all(summary[m]["model"] < summary[m]["dummy"] for m in LOFO_METRICS)


def lofo_table(summaries: dict[str, dict]) -> str:
    """Markdown table, one row per held-out family (``{family: heldout_summary(...)}``)."""

    def ratio(entry: dict, who: str) -> str:
        return _ratio(entry[who], entry["dummy"])

    lines = ["| held-out family | pairs | coordinate MAE model / Dummy (95 % CI) | rescale / Dummy | "
             "volume error model / Dummy (95 % CI) | rescale / Dummy | volume within 3 %: model | Dummy | "
             "beats Dummy on both |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, s in summaries.items():
        coord, volume = s["coord_mae"], s["volume_error"]
        lines.append(
            f"| {family} | {s['n']} | {ratio(coord, 'model')} ({coord['ci'][0]:.2f}–{coord['ci'][1]:.2f}) | "
            f"{ratio(coord, 'rescale')} | {ratio(volume, 'model')} ({volume['ci'][0]:.2f}–{volume['ci'][1]:.2f}) | "
            f"{ratio(volume, 'rescale')} | {100 * s['volume_within']['model']:.0f} % | "
            f"{100 * s['volume_within']['dummy']:.0f} % | {'yes' if beats_dummy(s) else '**no**'} |")
    return "\n".join(lines) + "\n"
