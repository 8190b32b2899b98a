"""benchmarks/README.md shows exactly the figures the committed results hold."""

from __future__ import annotations

from benchmarks import summary


def test_the_figures_table_matches_the_recorded_results() -> None:
    readme = summary.README.read_text()
    assert summary.with_table(readme) == readme, (
        "benchmarks/README.md's figures differ from benchmarks/results/*.json: "
        "run `.venv/bin/python -m benchmarks.summary --write`"
    )


def test_every_claim_reads_its_result_file() -> None:
    for claim in summary.CLAIMS:
        row = summary.row(claim)
        assert "unreadable result" not in row, row
