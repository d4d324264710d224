"""What `llmq summarize` shows: each document as it finishes, a progress bar, the report."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as BarTask
from rich.table import Table
from rich.text import Text

from producer.batch import Record, Report, Totals
from worker.deferrals import Waiting, format_duration


class WaitAwareETA(ProgressColumn):
    """Time remaining, never less than the wait for the rate limit the run is blocked on."""

    def render(self, task: BarTask) -> Text:
        """`ETA 3m 20s`, `ETA >57m` while waiting with no rate yet, or `ETA -`."""
        remaining = task.time_remaining
        frees_in = task.fields.get("frees_in")
        if frees_in is not None:
            if remaining is None or task.finished:
                return Text(f"ETA >{format_duration(frees_in)}", style="progress.remaining")
            remaining = max(remaining, 0.0) + frees_in
        if remaining is None:
            return Text("ETA -", style="progress.remaining")
        return Text(f"ETA {format_duration(remaining)}", style="progress.remaining")


class ProgressView:
    """A rich progress bar (only on a terminal) above each finished document's summary."""

    def __init__(self, console: Console, *, show_documents: bool = True) -> None:
        self.console = console
        self.show_documents = show_documents
        self.progress = Progress(
            TextColumn("[bold]summarizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TextColumn("{task.fields[waiting]}", style="yellow"),
            TimeElapsedColumn(),
            WaitAwareETA(),
            console=console,
            # Redrawing a bar into a pipe or a file would only fill it with escape codes.
            disable=not console.is_terminal,
            transient=False,
        )
        self.task: TaskID | None = None
        self.waiting_now: Waiting | None = None

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def started(self, *, total: int, skipped: int) -> None:
        """Show the bar; documents already summarized count as done."""
        if skipped:
            self.console.print(f"skipping {skipped} documents already summarized")
        self.task = self.progress.add_task(
            "summarize",
            total=total,
            completed=skipped,
            status=_status(Totals()),
            waiting="",
            frees_in=None,
        )

    def finished(self, record: Record, totals: Totals) -> None:
        """Print the document's line and summary, advance the bar."""
        if self.show_documents:
            self.console.print(document_text(record), soft_wrap=True)
        if self.task is not None:
            self.progress.update(self.task, advance=1, status=_status(totals))

    def waiting(self, status: Waiting | None) -> None:
        """Show which limit the run waits on and when it frees; in a log, say it once."""
        previous, self.waiting_now = self.waiting_now, status
        if self.task is not None:
            self.progress.update(
                self.task,
                waiting=status.describe() if status else "",
                frees_in=status.frees_in_s if status else None,
            )
        # Without a bar, a line per change of limit (not per poll) keeps a log readable.
        changed = status is not None and (previous is None or previous.limit != status.limit)
        if changed and status is not None and not self.console.is_terminal:
            self.console.print(status.describe())

    def stopping(self) -> None:
        """Say what the first Ctrl-C does."""
        self.console.print(
            "stopping: finishing the documents in flight (Ctrl-C again to quit now; "
            "finished documents are saved)"
        )


def _status(totals: Totals) -> str:
    return (
        f"{totals.failed} failed · {totals.chunks} chunks · "
        f"{totals.input_tokens + totals.output_tokens:,} tokens · ${totals.cost_usd:.4f}"
    )


def document_text(record: Record) -> Text:
    """One finished document: its numbers, then its summary or its error."""
    text = Text()
    text.append(f"\n{record['id']}\n", style="bold")
    if record.get("error") is not None:
        text.append(f"  FAILED: {record['error']}", style="red")
        return text
    text.append(
        f"  provider={record['provider']} model={record['model']} chunks={record['chunks']} "
        f"tokens={record['input_tokens']}+{record['output_tokens']} "
        f"cost=${record['cost_usd']:.6f} latency={record['latency_ms']:.0f}ms\n"
    )
    text.append(f"  {record['summary']}")
    return text


def report_table(report: Report) -> Table:
    """The final report as a two-column table."""
    table = Table(title="llmq summarize report", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f} ms"

    rows = [
        ("documents", f"{report.documents:,}"),
        ("  summarized", f"{report.succeeded:,}"),
        ("  failed", f"{report.failed:,}"),
        ("  skipped (already summarized)", f"{report.skipped:,}"),
        ("  not run (interrupted)", f"{report.not_run:,}"),
        ("chunks", f"{report.chunks:,}"),
        ("input tokens", f"{report.input_tokens:,}"),
        ("output tokens", f"{report.output_tokens:,}"),
        ("cost", f"${report.cost_usd:.6f}"),
        ("rate-limit deferrals", f"{report.deferrals:,}"),
        ("  time jobs spent deferred", f"{report.waited_s:,.1f} s"),
        ("wall time", f"{report.wall_time_s:,.1f} s"),
        ("latency P50 per document", ms(report.latency_p50_ms)),
        ("latency P95 per document", ms(report.latency_p95_ms)),
    ]
    if report.realtime_cost_usd is not None:
        saved = report.realtime_cost_usd - report.cost_usd
        rows[9:9] = [
            ("  in real time (Batch API saved)", f"${report.realtime_cost_usd:.6f} (${saved:.6f})")
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table
