"""bench/gpu_check.sh's plan check (what --plan and --cpu-dry-run run first): the stage limits plus the
summary's reserve fit the budget, a budget they exceed or a stage without a limit stops the script with
exit 3, and the stages run in the issue's order. The stages themselves are not run here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _plan(script: Path = SCRIPT, budget: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_BUDGET_S"}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(script), "--plan"], env=env, capture_output=True, text=True, timeout=60)


def _plan_entries(text: str) -> list[tuple[str, int]]:
    body = re.search(r"^PLAN=\(([^)]*)\)", text, re.M).group(1)
    return [(e.split(":")[0], int(e.split(":")[1])) for e in body.split()]


def test_plan_fits_the_default_budget():
    text = SCRIPT.read_text()
    entries = _plan_entries(text)
    reserve = int(re.search(r"^SUMMARY_RESERVE_S=(\d+)", text, re.M).group(1))
    default_budget = int(re.search(r'GPU_CHECK_BUDGET_S:-(\d+)', text).group(1))
    total = sum(limit for _, limit in entries) + reserve
    assert total <= default_budget
    proc = _plan()
    assert proc.returncode == 0, proc.stderr
    assert f"plan ok: {total} s of {default_budget} s" in proc.stdout


def test_plan_over_budget_fails_loudly():
    proc = _plan(budget=300)
    assert proc.returncode == 3
    assert "PLAN ERROR" in proc.stderr and "exceed the budget of 300 s" in proc.stderr


def test_every_stage_has_a_limit(tmp_path):
    text = SCRIPT.read_text()
    run = {m for m in re.findall(r"^\s*run_stage ([A-Za-z_]+)", text, re.M)}
    assert run == {name for name, _ in _plan_entries(text)}
    broken = tmp_path / "gpu_check.sh"
    broken.write_text(re.sub(r" tests:\d+", "", text, count=1))
    proc = _plan(broken)
    assert proc.returncode == 3 and "stage 'tests' runs but has no limit" in proc.stderr


def test_stage_order_follows_the_issue():
    """build -> op and lattice benchmarks -> GPU tests -> ncu and compute-sanitizer -> graph series."""
    order = [name for name, _ in _plan_entries(SCRIPT.read_text())]
    expected = ["build", "bench_message_op", "bench_lattice", "tests", "ncu", "sanitizer", "graph_series"]
    assert [n for n in order if n in expected] == expected
    calls = re.findall(r"^\s*run_stage ([A-Za-z_]+)", SCRIPT.read_text(), re.M)
    assert calls == order  # the script runs them in the plan's order


def test_graph_series_is_capped_and_tests_exist():
    text = SCRIPT.read_text()
    sizes = re.search(r'sizes="([\d ]+)" budget=', text).group(1).split()
    assert max(int(s) for s in sizes) == 4096
    listed = re.findall(r"tests/[\w/*]+\.py", text)
    assert listed
    for pattern in listed:  # no stale path: every listed file (or glob) matches something
        assert list(ROOT.glob(pattern)), pattern
