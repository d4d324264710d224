"""`llmq cost`: totals by user, model, provider and day from llm_job logs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console

from producer import costs, submit
from tests.fakes import FakeProvider
from tests.harness import Worker

LLMQ = str(Path(sys.executable).with_name("llmq"))


def _line(**fields: Any) -> str:
    record = {
        "timestamp": "2026-11-27T06:00:00.000+00:00",
        "level": "INFO",
        "logger": "llmq.jobs",
        "message": "llm_job",
        "event": "llm_job",
        **fields,
    }
    return json.dumps(record)


LINES = [
    "celery@host ready.",  # not JSON
    json.dumps({"event": "llm_call", "cost_usd": 5.0}),  # another event: not counted
    _line(
        user_id="alice",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=10_000,
        output_tokens=500,
        cached_input_tokens=4_000,
        cost_usd=0.0015,
        cache_discount_usd=0.0003,
    ),
    _line(
        user_id="alice",
        provider="anthropic",
        model="claude-haiku-4-5",
        input_tokens=3_333,
        output_tokens=1,
        cached_input_tokens=3_000,
        cost_usd=0.000638,
        cache_discount_usd=0.0027,
        timestamp="2026-11-28T00:00:01.000+00:00",
    ),
    _line(user_id="bob", model="gpt-4o", cost_usd=0.0, error="budget", error_kind="X"),
    # A response-cache hit, once the cache issue logs what it saved.
    _line(
        user_id="bob",
        provider="openai",
        model="gpt-4o",
        input_tokens=0,
        output_tokens=0,
        cost_usd=0.0,
        cost_saved_usd=0.0125,
        cached=True,
    ),
    '{"event": "llm_job", "cost_usd": 0.1',  # truncated mid-write
]


def test_totals_by_every_dimension_are_exact() -> None:
    report = costs.from_log_lines(LINES)
    total = report.total
    assert (total.requests, total.failed) == (4, 1)
    assert total.cost_usd == Decimal("0.0015") + Decimal("0.000638")
    assert total.saved_usd == Decimal("0.0003") + Decimal("0.0027") + Decimal("0.0125")
    assert (total.input_tokens, total.output_tokens, total.cached_input_tokens) == (
        13_333,
        501,
        7_000,
    )
    assert report.by["user"]["alice"].cost_usd == Decimal("0.002138")
    assert report.by["user"]["bob"].cost_saved_usd == Decimal("0.0125")
    assert report.by["provider"]["(none)"].failed == 1
    assert set(report.by["model"]) == {"gpt-4o-mini", "claude-haiku-4-5", "gpt-4o"}
    assert report.by["day"]["2026-11-28"].requests == 1
    assert report.by["day"]["2026-11-27"].requests == 3
    assert report.skipped_lines == 1


def test_sums_are_decimal_not_float() -> None:
    report = costs.from_log_lines([_line(user_id="u", cost_usd=0.1)] * 10)
    assert sum([0.1] * 10) != 1.0  # what a float total would print
    assert report.total.cost_usd == Decimal("1.0")
    assert report.as_json()["total"]["cost_usd"] == 1.0


def test_rich_tables_show_each_dimension() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    costs.render(costs.from_log_lines(LINES), console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for title in ("by user", "by model", "by provider", "by day"):
        assert title in text
    assert "alice" in text and "0.002138" in text and "0.015500" in text
    assert "1 unreadable llm_job lines skipped" in text


def test_cli_reads_files_and_stdin(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("\n".join(LINES) + "\n")
    from_file = subprocess.run(
        [LLMQ, "cost", "--json", str(log)], capture_output=True, text=True, timeout=60
    )
    from_stdin = subprocess.run(
        [LLMQ, "cost", "--json"], input=log.read_text(), capture_output=True, text=True, timeout=60
    )
    assert from_file.returncode == from_stdin.returncode == 0, from_file.stderr
    by_file, by_stdin = json.loads(from_file.stdout), json.loads(from_stdin.stdout)
    assert by_file["total"] == by_stdin["total"]
    assert by_file["total"]["cost_usd"] == 0.002138 and by_file["total"]["requests"] == 4
    assert by_stdin["source"] == "stdin"


def test_cli_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"
    done = subprocess.run([LLMQ, "cost", str(missing)], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"cannot read {missing}" in done.stderr


def test_cost_of_the_worker_log_equals_the_sum_of_job_costs(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    usages = [(1200, 300, 0), (10_000, 500, 4_000), (777, 33, 512), (5, 1, 0)]
    results = []
    for n, (input_tokens, output_tokens, cached) in enumerate(usages):
        fake.usage = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_input_tokens": cached,
        }
        model = "claude-haiku-4-5" if n % 2 else "gpt-4o-mini"
        messages = [{"role": "user", "content": f"question {n}"}]
        results.append(submit(messages, user_id, model=model).get(timeout=30))

    done = subprocess.run(
        [LLMQ, "cost", "--json"], input=worker.output(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    mine = json.loads(done.stdout)["user"][user_id]
    expected = sum(Decimal(str(r["cost_usd"])) for r in results)
    assert expected > 0
    assert Decimal(str(mine["cost_usd"])) == expected
    assert mine["requests"] == len(usages) and mine["failed"] == 0
    assert mine["input_tokens"] == sum(u[0] for u in usages)
    assert mine["cached_input_tokens"] == sum(u[2] for u in usages)
    assert mine["cache_discount_usd"] > 0

    table = subprocess.run(
        [LLMQ, "cost"], input=worker.output(), capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0 and user_id in table.stdout and "by provider" in table.stdout


HOSTILE = ["[/evil]", "ali[i]ce", "[bold red]boss[/]", ":thumbs_up:", "back\\[slash"]


def _hostile_lines() -> list[str]:
    return [
        _line(user_id=name, provider=f"p{name}", model=f"m{name}", cost_usd=0.001)
        for name in HOSTILE
    ]


def test_names_from_the_logs_print_literally() -> None:
    console = Console(file=io.StringIO(), width=300, color_system=None)
    costs.render(costs.from_log_lines(_hostile_lines(), source="logs[1]"), console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for name in HOSTILE:
        for shown in (name, f"p{name}", f"m{name}"):
            assert shown in text, shown
    assert "by user (logs[1])" in text
    assert "👍" not in text  # ":thumbs_up:" is a user id, not an emoji code


def test_cli_prints_hostile_user_names(tmp_path: Path) -> None:
    log = tmp_path / "worker[1].log"
    log.write_text("\n".join(_hostile_lines()) + "\n")
    done = subprocess.run([LLMQ, "cost", str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in HOSTILE:
        assert name in done.stdout, name
    assert str(log) in done.stdout
