"""RESULTS.md sections written by their own commands survive bench.run_cpu's rewrite (bench/report.py)."""

from __future__ import annotations

from bench import report


def test_a_section_is_replaced_in_place_and_read_back():
    text = report.splice_section("# Title\n\n## Later\nkept\n", "original-pipeline", "first")
    assert text.endswith("<!-- original-pipeline -->\nfirst\n<!-- /original-pipeline -->\n")
    again = report.splice_section(text, "original-pipeline", "second\nrow")
    assert "first" not in again and again.count("<!-- original-pipeline -->") == 1 and "## Later\nkept" in again
    assert report.section(again, "original-pipeline") == "second\nrow"
    assert report.section(again, "static-report") is None


def test_kept_sections_carry_over_a_fresh_report():
    """What run_cpu does: a fresh text gets every kept section of the old file, unchanged."""
    old = report.splice_section(report.splice_section("# old\n", "static-report", "S"), "original-pipeline", "O")
    fresh = "# new report\n"
    for name in report.KEPT_SECTIONS:
        kept = report.section(old, name)
        if kept is not None:
            fresh = report.splice_section(fresh, name, kept)
    assert fresh.startswith("# new report\n") and "# old" not in fresh
    assert report.section(fresh, "static-report") == "S" and report.section(fresh, "original-pipeline") == "O"
