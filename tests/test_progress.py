"""The summarize display: a progress bar on a terminal only, each document, the report."""

from __future__ import annotations

import io
import re
import uuid

from rich.console import Console

from producer.batch import BatchOptions, BatchRun, Document, Report, Totals
from producer.progress import ProgressView, report_table
from tests.conftest import StartWorker
from tests.fakes import FakeProvider
from worker import tokens
from worker.deferrals import Deferral, format_duration, waiting
from worker.mapreduce import summarize_instruction, summary_max_tokens
from worker.models import Message

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


def test_a_binding_limit_shows_as_waiting_and_is_counted_in_the_report(
    start_worker: StartWorker, fake: FakeProvider, user_id: str
) -> None:
    words = 30
    texts = [f"Document number {i} says something short about queues." for i in range(6)]
    per_job = max(
        tokens.count_messages(
            [
                Message(role="system", content=summarize_instruction(words)),
                Message(role="user", content=text),
            ]
        )
        for text in texts
    ) + summary_max_tokens(words)
    # Every answer bills its whole worst case, so settling frees nothing early.
    fake.usage = {
        "input_tokens": per_job - summary_max_tokens(words),
        "output_tokens": summary_max_tokens(words),
        "cached_input_tokens": 0,
    }
    tag = uuid.uuid4().hex[:8]
    start_worker(
        concurrency=6,
        queues="llm,batch",
        LLM_RATE_LIMIT_PREFIX=f"progress-{tag}",
        LLM_DEFERRED_QUEUE=f"deferred-{tag}",
        # Two documents' worst case per 3 s window: the rest are deferred, then run.
        LLM_USER_TOKENS_PER_HOUR=str(2 * per_job + per_job // 2),
        LLM_USER_TOKEN_WINDOW_SECONDS="3",
        LLM_DEFER_MAX_WAIT_SECONDS="60",
    )
    output = io.StringIO()
    console = Console(file=output, width=200, force_terminal=False)
    view = ProgressView(console)
    documents = [Document(id=f"d{i}", source="mem", text=text) for i, text in enumerate(texts)]
    with view:
        report = BatchRun(
            documents=documents,
            options=BatchOptions(
                user_id=user_id, words=words, cache=False, concurrency=6, deferral_interval=0.2
            ),
            listener=view,
        ).run()
    console.print(report_table(report))
    shown = output.getvalue()

    assert report.succeeded == 6, shown
    waiting = re.search(r"waiting: (\d+) on (\S+), frees in (\d+)s", shown)
    assert waiting, shown
    assert int(waiting.group(1)) >= 1 and waiting.group(2) == "user_tokens"
    assert int(waiting.group(3)) <= 3
    # Four of six waited at least once; each deferral is counted, with its wait.
    assert report.deferrals >= 4 and report.waited_s > 0
    assert re.search(rf"rate-limit deferrals\s*│\s*{report.deferrals}\s", shown)


def test_waiting_names_the_limit_most_jobs_wait_on_and_its_earliest_reset() -> None:
    now = 1000.0

    def note(task_id: str, limit: str, since: float, frees_at: float) -> Deferral:
        return Deferral(
            task_id=task_id, request_id="r", limit=limit, since=since, frees_at=frees_at, count=1
        )

    notes = [
        note("a", "user_tokens", 990, 1300),
        note("b", "user_tokens", 995, 1200),
        note("c", "model_rpm:x", 995, 1010),
        note("d", "model_rpm:x", 900, 950),  # ran already
    ]
    status = waiting(notes, now=now)
    assert status is not None
    assert (status.jobs, status.limit, status.frees_in_s) == (3, "user_tokens", 200.0)
    assert status.describe() == "waiting: 3 on user_tokens, frees in 3m 20s"
    assert waiting(notes[3:], now=now) is None
    assert [format_duration(s) for s in (5, 200, 3420, 3900)] == ["5s", "3m 20s", "57m", "1h 05m"]
