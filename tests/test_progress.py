"""The summarize display: a progress bar on a terminal only, each document, the report."""

from __future__ import annotations

import io

from rich.console import Console

from producer.batch import Report, Totals
from producer.progress import ProgressView, report_table

RECORD = {
    "id": "docs/a.md",
    "summary": "A short summary [not markup].",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "chunks": 3,
    "input_tokens": 44,
    "output_tokens": 28,
    "cost_usd": 0.0000234,
    "latency_ms": 812.4,
    "error": None,
}


def run_view(console: Console) -> str:
    with ProgressView(console) as view:
        view.started(total=4, skipped=1)
        totals = Totals()
        totals.add(RECORD)
        view.finished(RECORD, totals)
        failed = {**RECORD, "id": "docs/b.bin", "error": "Binary file (9 bytes)."}
        totals.add(failed)
        view.finished(failed, totals)
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def test_progress_bar_on_a_terminal_shows_counts_tokens_cost_and_eta() -> None:
    output = run_view(Console(file=io.StringIO(), force_terminal=True, width=160))
    assert "━" in output and "3/4" in output
    assert "1 failed · 6 chunks · 144 tokens · $0.0000" in output
    assert "ETA" in output


def test_no_progress_bar_when_not_a_terminal() -> None:
    output = run_view(Console(file=io.StringIO(), force_terminal=False, width=160))
    assert "━" not in output and "\x1b[" not in output
    assert "skipping 1 documents already summarized" in output
    assert "provider=openai model=gpt-4o-mini chunks=3 tokens=44+28" in output
    assert "latency=812ms" in output
    assert "A short summary [not markup]." in output
    assert "FAILED: Binary file (9 bytes)." in output


def test_report_table_shows_every_total() -> None:
    report = Report.of(
        [RECORD, {**RECORD, "latency_ms": 1000.0}],
        skipped=1,
        not_run=0,
        wall_time_s=2.5,
        interrupted=False,
    )
    console = Console(file=io.StringIO(), width=120)
    console.print(report_table(report))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    rows = {
        cells[0].strip(): cells[1].strip()
        for line in output.splitlines()
        if len(cells := line.strip("│").split("│")) == 2
    }
    assert rows["documents"] == "2" and rows["summarized"] == "2" and rows["failed"] == "0"
    assert rows["skipped (already summarized)"] == "1"
    assert (rows["chunks"], rows["input tokens"], rows["output tokens"]) == ("6", "88", "56")
    assert (rows["cost"], rows["wall time"]) == ("$0.000047", "2.5 s")
    assert "latency P50 per document" in output and "906 ms" in output
    assert "latency P95 per document" in output and "991 ms" in output
