"""Cost reports: totals by user, model, provider and day, from `llm_job` logs or Redis."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

DIMENSIONS = ("user", "model", "provider", "day")
_ZERO = Decimal(0)


@dataclass(kw_only=True)
class Totals:
    """Requests, tokens and USD summed over some jobs; USD kept exact as Decimal."""

    requests: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_usd: Decimal = _ZERO
    # Prompt-cache discount (cached input at its lower rate) and response-cache hits.
    cache_discount_usd: Decimal = _ZERO
    cost_saved_usd: Decimal = _ZERO
    reserved_usd: Decimal | None = None

    @property
    def saved_usd(self) -> Decimal:
        """Everything caching saved: prompt-cache discount plus response-cache hits."""
        return self.cache_discount_usd + self.cost_saved_usd

    def add(self, record: dict[str, Any]) -> None:
        """Count one `llm_job` record."""
        self.requests += 1
        self.failed += 1 if record.get("error") else 0
        self.input_tokens += _int(record.get("input_tokens"))
        self.output_tokens += _int(record.get("output_tokens"))
        self.cached_input_tokens += _int(record.get("cached_input_tokens"))
        self.cost_usd += _usd(record.get("cost_usd"))
        self.cache_discount_usd += _usd(record.get("cache_discount_usd"))
        self.cost_saved_usd += _usd(record.get("cost_saved_usd"))

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values; USD as numbers rounded to 1e-10."""
        data: dict[str, Any] = {
            "requests": self.requests,
            "failed": self.failed,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cost_usd": _number(self.cost_usd),
            "cache_discount_usd": _number(self.cache_discount_usd),
            "cost_saved_usd": _number(self.cost_saved_usd),
            "saved_usd": _number(self.saved_usd),
        }
        if self.reserved_usd is not None:
            data["reserved_usd"] = _number(self.reserved_usd)
        return data


@dataclass(kw_only=True)
class CostReport:
    """The grand total and the totals per user, model, provider and day."""

    source: str
    total: Totals = field(default_factory=Totals)
    by: dict[str, dict[str, Totals]] = field(
        default_factory=lambda: {dimension: {} for dimension in DIMENSIONS}
    )
    skipped_lines: int = 0

    def add(self, record: dict[str, Any]) -> None:
        """Count one `llm_job` record in the total and in each dimension."""
        self.total.add(record)
        keys = {
            "user": record.get("user_id") or "(unknown)",
            "model": record.get("model") or "(default)",
            "provider": record.get("provider") or "(none)",
            "day": str(record.get("timestamp") or "(unknown)")[:10],
        }
        for dimension, key in keys.items():
            self.by[dimension].setdefault(str(key), Totals()).add(record)

    def as_json(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return {
            "source": self.source,
            "total": self.total.as_json(),
            **{
                dimension: {key: totals.as_json() for key, totals in sorted(rows.items())}
                for dimension, rows in self.by.items()
            },
            "skipped_lines": self.skipped_lines,
        }


def from_log_lines(lines: Iterable[str], *, source: str = "logs") -> CostReport:
    """Totals of every `"event": "llm_job"` JSON line; other lines are skipped."""
    report = CostReport(source=source)
    for line in lines:
        if '"llm_job"' not in line:
            continue
        try:
            # Decimal floats: summing the logged values exactly, not their binary floats.
            record = json.loads(line, parse_float=Decimal)
        except ValueError:
            report.skipped_lines += 1
            continue
        if isinstance(record, dict) and record.get("event") == "llm_job":
            report.add(record)
    return report


def from_log_files(paths: list[str], *, stdin: TextIO) -> CostReport:
    """Totals over the files in order; "-" reads `stdin`."""

    def lines() -> Iterator[str]:
        for path in paths:
            if path == "-":
                yield from stdin
                continue
            with open(path, encoding="utf-8", errors="replace") as file:
                yield from file

    sources = ", ".join("stdin" if path == "-" else path for path in paths)
    return from_log_lines(lines(), source=sources)


def from_spend_totals(totals: dict[str, Any]) -> CostReport:
    """A report from `SpendTracker.totals()`: the live Redis counters of one UTC day."""
    from worker.spend import to_usd

    def convert(counters: dict[str, int]) -> Totals:
        reserved = counters.get("reserved_units")
        return Totals(
            requests=counters["requests"],
            input_tokens=counters["input_tokens"],
            output_tokens=counters["output_tokens"],
            cached_input_tokens=counters["cached_input_tokens"],
            cost_usd=to_usd(counters["cost_units"]),
            cost_saved_usd=to_usd(counters["saved_units"]),
            reserved_usd=None if reserved is None else to_usd(reserved),
        )

    day = str(totals["day"])
    report = CostReport(source=f"redis {day}", total=convert(totals["total"]))
    for dimension in ("user", "model", "provider"):
        report.by[dimension] = {name: convert(c) for name, c in totals[dimension].items()}
    report.by["day"] = {day: report.total}
    return report


def render(report: CostReport, console: Console) -> None:
    """One rich table per dimension, then the grand total."""
    # Names come from logs and Redis: Text, never markup, so a user called "[/evil]" or
    # ":smile:" prints as it is instead of crashing the report or turning into a style.
    for dimension in DIMENSIONS:
        rows = report.by[dimension]
        if not rows:
            continue
        reserved = any(t.reserved_usd is not None for t in rows.values())
        table = Table(title=Text(f"by {dimension} ({report.source})"), title_justify="left")
        # Names fold rather than end in an ellipsis: a cut-off user id is useless.
        table.add_column(dimension, overflow="fold")
        for name in ("requests", "failed", "input", "output", "cached in", "cost $", "saved $"):
            table.add_column(name, justify="right", no_wrap=True)
        if reserved:
            table.add_column("reserved $", justify="right", no_wrap=True)
        for key, totals in sorted(rows.items(), key=lambda item: -item[1].cost_usd):
            table.add_row(Text(key), *_cells(totals, reserved=reserved))
        table.add_section()
        table.add_row("total", *_cells(report.total, reserved=False), *([""] if reserved else []))
        console.print(table)
    if report.total.requests == 0:
        console.print(Text(f"no jobs recorded in {report.source}"))
    if report.skipped_lines:
        console.print(f"{report.skipped_lines} unreadable llm_job lines skipped")


def _cells(totals: Totals, *, reserved: bool) -> list[str]:
    cells = [
        f"{totals.requests:,}",
        f"{totals.failed:,}",
        f"{totals.input_tokens:,}",
        f"{totals.output_tokens:,}",
        f"{totals.cached_input_tokens:,}",
        f"{totals.cost_usd:.6f}",
        f"{totals.saved_usd:.6f}",
    ]
    if reserved:
        cells.append(f"{totals.reserved_usd or 0:.6f}")
    return cells


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usd(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return _ZERO


def _number(value: Decimal) -> float:
    return float(round(value, 10))
