"""Metrics (spec §10) on hand-computable cases, and the eval report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import denoising_pairs

from e3relax_fast.training.evaluate import evaluate, write_report
from e3relax_fast.training.metrics import coordinate_mae, periodic_coordinate_mae, shape_error, volume_error


def test_metrics_on_known_values():
    ptr = torch.tensor([0, 1, 3])
    target = torch.zeros(3, 3, dtype=torch.float64)
    pred = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, -0.3]], dtype=torch.float64)
    np.testing.assert_allclose(coordinate_mae(pred, target, ptr).numpy(), [0.1, 0.15])

    cells = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 4.0
    # An atom predicted one lattice vector away is wrong by 4 Å plainly, right periodically.
    wrapped = pred.clone()
    wrapped[0, 0] += 4.0
    assert coordinate_mae(wrapped, target, ptr)[0] > 1.0
    np.testing.assert_allclose(periodic_coordinate_mae(wrapped, target, cells, ptr).numpy(), [0.1, 0.15])

    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert shape_error(cells @ rot.T, cells).abs().max() < 1e-12  # rotation-invariant
    bigger = cells.clone()
    bigger[:, 0, 0] = 5.0
    np.testing.assert_allclose(volume_error(bigger, cells).numpy(), [16.0, 16.0])
    np.testing.assert_allclose(shape_error(bigger, cells).numpy(), [9.0, 9.0])


class _Identity(torch.nn.Module):
    """Predicts the unrelaxed structure: must score exactly like Dummy."""

    def forward(self, batch):
        from e3relax_fast.model import E3RelaxOutput

        return E3RelaxOutput([batch.positions], [batch.cells])


@pytest.mark.parametrize("frame", ["input", "canonical"])
def test_evaluate_identity_equals_dummy_and_report(tmp_path, frame):
    """Predicting the input scores exactly as Dummy, in either frame (the canonical frame maps an
    unchanged prediction back onto the input)."""
    pairs = denoising_pairs(6, 5)
    result = evaluate(_Identity(), pairs, match=True, frame=frame)
    for key, value in result["dummy"].items():
        assert abs(result["model"][key] - value) < 1e-12, key
    assert result["dummy"]["coord_mae"] > 0.01 and 0.0 <= result["dummy"]["match_rate"] <= 1.0
    if frame == "input":  # bit for bit; through the canonical frame and back, to float64 rounding
        assert result["ratio_ci"]["coord_mae"] == (1.0, 1.0) and result["better"]["coord_mae"] == 0.0
    else:
        assert result["ratio_ci"]["coord_mae"] == pytest.approx((1.0, 1.0), abs=1e-12)
    report = write_report(result, pairs, tmp_path, "identity")
    text = report.read_text()
    assert "| coordinate MAE (Å) |" in text and "1.000 | 1.000–1.000 |" in text
    assert frame == "canonical" or "1.000 | 1.000–1.000 | 0 % |" in text
    assert (tmp_path / "parity.png").exists() and (tmp_path / "errors.png").exists()


def test_ratio_interval():
    from e3relax_fast.training.evaluate import ratio_interval

    rng = np.random.default_rng(1)
    dummy = rng.uniform(0.1, 1.0, 400)
    assert ratio_interval(0.5 * dummy, dummy) == pytest.approx((0.5, 0.5))
    noisy = dummy * rng.uniform(0.6, 1.0, 400)  # true ratio about 0.8
    lo, hi = ratio_interval(noisy, dummy)
    assert lo < noisy.mean() / dummy.mean() < hi and 0.7 < lo < hi < 0.9 and hi - lo < 0.1
    assert ratio_interval(noisy, dummy) == (lo, hi)  # fixed seed


def test_eval_cli_reports_steps_saved_with_emt(tmp_path):
    """`e3relax-fast eval --steps-saved emt`: relaxes from both starts and reports the steps."""
    from e3relax_fast import E3Relax
    from e3relax_fast.cli import main
    from e3relax_fast.io import Pair, write_extxyz_pairs

    rng = np.random.default_rng(0)
    pairs = []
    for k in range(3):  # rattled fcc Cu (EMT knows Cu); "relaxed" = ideal cell
        a = 3.61
        frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        cell = np.eye(3) * a
        pos_r = frac @ cell
        pairs.append(Pair(f"cu{k}", np.full(4, 29), pos_r + rng.normal(0, 0.05, (4, 3)), cell * 1.02, pos_r, cell))
    write_extxyz_pairs(pairs, tmp_path / "data", "val")
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "model.pt")
    assert main(["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "model.pt"),
                 "--out", str(tmp_path / "report"), "--no-match", "--steps-saved", "emt", "--energy", "emt"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Potential steps to converge" in text and "both starts converged for 3 of 3" in text
    assert "Single-point energy above the relaxed structure's (3 structures with all three energies)" in text
    assert main(["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "model.pt"),
                 "--out", str(tmp_path / "r2"), "--no-match", "--protocol", "minimum"]) == 2  # none made so


def test_energies_above_minimum_with_emt():
    """The relaxed structure as the prediction is exactly at the minimum; strained, rattled inputs
    are above it, so the prediction is closer on every pair."""
    pytest.importorskip("ase")
    from e3relax_fast.datagen import energies_above_minimum, make_calculator
    from e3relax_fast.io import Pair

    rng = np.random.default_rng(2)
    cell = np.eye(3) * 3.59
    pos = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) @ cell
    pairs = [Pair(f"cu{k}", np.full(4, 29), pos + rng.normal(0, 0.05, (4, 3)), cell * 1.03, pos, cell)
             for k in range(3)]
    out = energies_above_minimum(pairs, [(p.pos_relaxed, p.cell_relaxed) for p in pairs], make_calculator("emt", True))
    assert out["n"] == 3 and out["prediction_above"] == [0.0, 0.0, 0.0]
    assert min(out["input_above"]) > 0.005 and out["fraction_closer"] == 1.0
    assert out["median_prediction_above"] == 0.0 < out["median_input_above"]


def test_report_says_n_a_for_a_zero_dummy_metric(tmp_path):
    """Pairs whose cells do not change give Dummy a zero volume error: the report prints n/a for the
    ratio instead of dividing by zero (it used to crash after computing everything)."""
    pairs = denoising_pairs(4, 7)
    for pair in pairs:
        pair.cell_relaxed = pair.cell_unrelaxed.copy()
        pair.family = "perov" if pair is pairs[0] else "oqmd"
    result = evaluate(_Identity(), pairs, match=False, frame="input")
    assert result["dummy"]["volume_error"] == 0.0
    text = write_report(result, pairs, tmp_path, "zero dummy").read_text()
    assert "| volume error (Å³) | 0.0000 | 0.0000 | n/a |" in text
    assert "| perov | 1 |" in text and "| oqmd | 3 |" in text  # the per-family table
    perov = next(line for line in text.splitlines() if line.startswith("| perov | 1 |"))
    assert perov.endswith("| n/a | 100 % | 100 % |")  # volume error / Dummy, then volume within 3 %
    assert "| volume within 3 % of the target's (share of structures) | 100.0% | 100.0% |" in text
    for pair in pairs:
        pair.cell_relaxed = pair.cell_unrelaxed * 1.02  # +6 % volume: outside the 3 %
    assert evaluate(_Identity(), pairs, match=False, frame="input")["dummy"]["volume_within"] == 0.0


def test_eval_cli_minima_scores_relaxed_structures_as_their_own_targets(tmp_path):
    """`eval --minima`: each pair's relaxed structure is the input and the target, so Dummy is exact
    (zero error, every volume within 3 %) and the model's share within 3 % is what is left to read."""
    from e3relax_fast import E3Relax
    from e3relax_fast.cli import main
    from e3relax_fast.io import write_extxyz_pairs

    write_extxyz_pairs(denoising_pairs(5, 0), tmp_path / "data", "test")
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2)
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "model.pt")
    assert main(["eval", "--data", str(tmp_path / "data"), "--split", "test", "--checkpoint",
                 str(tmp_path / "model.pt"), "--out", str(tmp_path / "report"), "--no-match", "--minima"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("| 0.0000 | n/a | n/a |") == 4  # Dummy exact on every metric: no ratio, no interval
    assert "| volume within 3 % of the target's (share of structures) |" in text
    assert "| 100.0% |" in text.split("volume within 3 % of the target's (share of structures)")[1].split("\n")[0]


def test_true_cell_baseline_is_the_input_fractions_in_the_relaxed_cell(tmp_path):
    """"True cell" places the input's fractions in the relaxed cell: zero coordinate error on a pair
    whose relaxation is a pure strain of the input, Dummy's error where the cell does not change."""
    pairs = denoising_pairs(3, 11)
    strain = np.array([[1.04, 0.01, 0.0], [0.01, 0.97, 0.0], [0.0, 0.0, 1.02]])
    pairs[0].cell_relaxed = pairs[0].cell_unrelaxed @ strain
    pairs[0].pos_relaxed = pairs[0].pos_unrelaxed @ strain
    for pair in pairs[1:]:
        pair.cell_relaxed = pair.cell_unrelaxed.copy()
    result = evaluate(_Identity(), pairs, match=False, frame="input")
    true_cell, dummy = (result["per_structure"][who]["coord_mae"] for who in ("true_cell", "dummy"))
    assert true_cell[0] < 1e-12 < dummy[0]
    np.testing.assert_allclose(true_cell[1:], dummy[1:], rtol=0, atol=1e-12)
    text = write_report(result, pairs, tmp_path, "true cell").read_text()
    assert f"coordinate MAE {true_cell.mean():.4f} Å" in text


def test_true_volume_baseline_is_the_prediction_at_the_targets_volume(tmp_path):
    """"True volume" scales the prediction isotropically to the target's volume: zero error where the
    relaxation is an isotropic scaling of the input (here predicted unchanged), the anisotropic part
    of the error kept where it is not."""
    pairs = denoising_pairs(2, 5)
    for pair, strain in zip(pairs, (np.eye(3) * 1.07, np.diag([1.08, 0.95, 1.0])), strict=True):
        pair.cell_relaxed = pair.cell_unrelaxed @ strain
        pair.pos_relaxed = pair.pos_unrelaxed @ strain
    result = evaluate(_Identity(), pairs, match=False, frame="input")
    per = result["per_structure"]
    assert per["true_volume"]["coord_mae"][0] < 1e-12 < per["dummy"]["coord_mae"][0]
    assert per["true_volume"]["volume_error"][1] < 1e-9 < per["true_volume"]["coord_mae"][1]
    # scaled to the target's volume, the prediction's cell is C_u * s with s^3 = det(strain)
    s = np.linalg.det(np.diag([1.08, 0.95, 1.0])) ** (1 / 3)
    scaled = pairs[1].cell_unrelaxed * s
    expected = np.linalg.norm(scaled @ scaled.T - pairs[1].cell_relaxed @ pairs[1].cell_relaxed.T)
    assert per["true_volume"]["shape_error"][1] == pytest.approx(expected, rel=1e-9)
    text = write_report(result, pairs, tmp_path, "true volume").read_text()
    assert f"{result['true_volume']['coord_mae']:.4f} Å" in text and "what a perfect volume alone would give" in text


def test_report_says_where_dummys_error_is_per_family_and_protocol(tmp_path):
    """The share table: each seed family · protocol group's share of Dummy's summed coordinate error
    (largest first), the model / Dummy ratio there, and its share of the model's."""
    pairs = denoising_pairs(6, 3)
    for k, pair in enumerate(pairs):
        pair.family, pair.protocol = "ab"[k // 3], "xy"[k % 2]
    result = evaluate(_Identity(), pairs, match=False, frame="input")
    dummy = result["per_structure"]["dummy"]["coord_mae"]
    labels = [f"{p.family} · {p.protocol}" for p in pairs]
    sums = {g: sum(e for e, label in zip(dummy, labels, strict=True) if label == g) for g in set(labels)}
    text = write_report(result, pairs, tmp_path, "shares").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| a · ", "| b · "))]
    assert [row.split(" | ")[0][2:] for row in rows] == sorted(sums, key=lambda g: -sums[g])
    for row in rows:
        group, n, share, ratio, model_share = row.strip("| ").split(" | ")
        assert int(n) == labels.count(group) and ratio == "1.000" and model_share == share
        assert share == f"{100 * sums[group] / dummy.sum():.1f} %"
