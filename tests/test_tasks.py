"""llm.complete end to end: producer -> Redis -> real worker -> real SDK -> fake provider."""

from __future__ import annotations

import time
from typing import Any

import pytest

from producer import submit
from tests.fakes import FakeProvider, Fault
from tests.harness import TEST_KEYS, Worker, wait_for
from worker.errors import InvalidJobError, UnknownModelError

PROMPT = "Summarize the plot of the secret novel ZEPHYR-QUILL-77 in two lines."


def test_openai_job_returns_usage_and_cost(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.usage = {"input_tokens": 1200, "output_tokens": 300, "cached_input_tokens": 0}
    result = submit([{"role": "user", "content": PROMPT}], user_id, temperature=0.2).get(timeout=30)

    assert fake.requests("openai") == 1
    sent = fake.seen[0]
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["temperature"] == 0.2
    assert sent.headers["authorization"] == f"Bearer {TEST_KEYS[0]}"
    assert result["provider"] == "openai"
    assert result["text"] == fake.text
    assert (result["input_tokens"], result["output_tokens"]) == (1200, 300)
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens.
    assert result["cost_usd"] == pytest.approx(1200 * 0.15e-6 + 300 * 0.60e-6, abs=1e-12)
    assert result["finish_reason"] == "stop"
    assert result["cached"] is False
    assert result["queue_wait_ms"] is not None and result["queue_wait_ms"] >= 0


def test_anthropic_job_returns_usage_and_cost(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.usage = {"input_tokens": 2000, "output_tokens": 100, "cached_input_tokens": 0}
    messages = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": PROMPT},
    ]
    result = submit(messages, user_id, model="claude-haiku-4-5", temperature=0.0).get(timeout=30)

    assert fake.requests("anthropic") == 1 and fake.requests("openai") == 0
    sent = fake.seen[0].body
    assert sent["system"] == "Answer tersely."
    assert sent["messages"] == [{"role": "user", "content": PROMPT}]
    assert sent["temperature"] == 0.0
    headers = fake.seen[0].headers
    sent_key = headers.get("x-api-key") or headers["authorization"].removeprefix("Bearer ")
    assert sent_key == TEST_KEYS[1]
    assert result["provider"] == "anthropic" and result["model"] == "claude-haiku-4-5"
    # claude-haiku-4-5: $1 in, $5 out per 1M tokens.
    assert result["cost_usd"] == pytest.approx(2000 * 1e-6 + 100 * 5e-6, abs=1e-12)


BAD_JOBS: list[tuple[str, dict[str, Any], str]] = [
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("non-string content", {"messages": [{"role": "user", "content": 42}]}, "content"),
    ("messages not a list", {"messages": "hello"}, "messages"),
    ("negative max_tokens", {"max_tokens": -5}, "max_tokens"),
    ("absurd max_tokens", {"max_tokens": 10_000_000}, "max_tokens"),
    ("over model max output", {"max_tokens": 100_000}, "maximum output"),
    ("unknown model", {"model": "gpt-17-ultra"}, "Unknown model 'gpt-17-ultra'"),
    ("temperature out of range", {"temperature": 9}, "temperature"),
    ("blank user_id", {"user_id": "  "}, "user_id"),
    ("no user turn", {"messages": [{"role": "system", "content": "x"}]}, "role 'user'"),
    ("unexpected option", {"temprature": 0.5}, "temprature"),
    ("missing content", {"messages": [{"role": "user"}]}, "content"),
]


@pytest.mark.parametrize(("case", "override", "needle"), BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_input_fails_typed_with_no_provider_call(
    worker: Worker,
    fake: FakeProvider,
    app: Any,
    user_id: str,
    case: str,
    override: dict[str, Any],
    needle: str,
) -> None:
    job: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "user_id": user_id}
    job.update(override)
    result = app.send_task("llm.complete", kwargs=job)
    with pytest.raises(InvalidJobError) as raised:
        result.get(timeout=30)
    assert needle in str(raised.value)
    assert result.state == "FAILURE"
    assert fake.requests() == 0
    if case == "unknown model":
        assert isinstance(raised.value, UnknownModelError)
        assert "LLM_PRICES_FILE" in str(raised.value)


def test_worker_survives_bad_input(worker: Worker, fake: FakeProvider, user_id: str) -> None:
    bad = submit([{"role": "user", "content": 1}], user_id)  # type: ignore[dict-item]
    good = submit([{"role": "user", "content": PROMPT}], user_id)
    with pytest.raises(InvalidJobError):
        bad.get(timeout=30)
    assert good.get(timeout=30)["text"] == fake.text
    assert worker.process.poll() is None


def test_prompt_never_in_worker_log_or_task_repr(
    worker: Worker, fake: FakeProvider, app: Any, user_id: str
) -> None:
    from worker.tasks import complete

    good = submit([{"role": "user", "content": PROMPT}], user_id)
    good.get(timeout=30)
    via_delay = complete.delay(messages=[{"role": "user", "content": PROMPT}], user_id=user_id)
    via_delay.get(timeout=30)
    bad = submit([{"role": "wizard", "content": PROMPT}], user_id)
    with pytest.raises(InvalidJobError) as raised:
        bad.get(timeout=30)

    assert PROMPT not in str(raised.value)
    log = worker.output()
    assert f"{good.id}] received" in log and f"{via_delay.id}] received" in log
    assert "ZEPHYR" not in log
    assert "messages=<1 messages>" in log
    for key in TEST_KEYS:
        assert key not in log
    # The result backend keeps the result only, not the job's arguments.
    assert "ZEPHYR" not in str(app.backend.get_task_meta(good.id))


HOSTILE = [
    {"messages": [{"role": "user", "content": "HOSTILE-1 hi \ud800"}]},
    {"messages": [{"role": "user", "content": "HOSTILE-2"}], "temperature": float("inf")},
    {"messages": [{"role": "user", "content": "HOSTILE-3"}], "temperature": float("nan")},
    {"messages": [{"role": "user", "content": "HOSTILE-4"}], "max_tokens": True},
    {"messages": [{"role": "user", "content": "HOSTILE-5"}], "temperature": "0.5"},
    {"messages": [{"role": "user", "content": "HOSTILE-6"}], "cache": "no"},
    {"messages": [{"role": "user", "content": "\x00\x00\x01"}]},
]


@pytest.mark.parametrize("fields", HOSTILE, ids=lambda f: repr(sorted(f))[:40])
def test_hostile_input_is_a_typed_error_that_quotes_nothing(
    worker: Worker, fake: FakeProvider, app: Any, user_id: str, fields: dict[str, Any]
) -> None:
    # Sent as any Celery producer would: no validation on the way in.
    sent = app.send_task("llm.complete", kwargs={"user_id": user_id, **fields})
    with pytest.raises(InvalidJobError) as raised:
        sent.get(timeout=30)
    message = str(raised.value)
    assert "HOSTILE" not in message and "\ud800" not in message
    assert fake.requests() == 0
    record = wait_for(
        lambda: next((r for r in worker.records("llm_job") if r.get("task_id") == sent.id), None),
        timeout=10,
        what="the job's record",
    )
    assert record["error_kind"] == "InvalidJobError"
    assert "HOSTILE" not in worker.output()
    assert worker.process.poll() is None


def test_a_deferred_slow_job_is_delivered_and_run_once(
    isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    # Visibility 30 s, deadline 20 s: a deferral may wait at most 30 - 20 - 5 = 5 s, so
    # waiting out a 15 s limit and then an 18 s call never outlast the visibility timeout.
    worker = start_worker(
        isolated=isolated,
        LLM_TIMEOUT_SECONDS="19",
        LLM_USER_REQUESTS_PER_MINUTE="1",
        LLM_USER_REQUEST_WINDOW_SECONDS="15",
        LLM_FALLBACKS="",
    )
    fake.script("openai", Fault(), Fault(delay=18))
    kwargs = {"messages": [{"role": "user", "content": "Hi"}], "user_id": user_id, "cache": False}
    first = isolated.app.send_task("llm.complete", kwargs=kwargs, queue="llm")
    assert first.get(timeout=30)["text"] == fake.text
    slow = isolated.app.send_task(
        "llm.complete", kwargs={**kwargs, "on_limit": "defer"}, queue="llm"
    )
    assert slow.get(timeout=90)["text"] == fake.text
    finished = time.monotonic()
    deferrals = [r for r in worker.records("llm_deferred") if r["task_id"] == slow.id]
    assert deferrals and max(r["countdown"] for r in deferrals) <= 5.0
    # A redelivery would come once the last delivery is 30 s old, plus kombu's 5 s sweep:
    # nothing can signal that it did not happen, so wait that long.
    time.sleep(max(0.0, finished + 20 - time.monotonic()))
    runs = [r for r in worker.records("llm_job") if r["task_id"] == slow.id]
    assert [r["error"] is None for r in runs] == [False] * len(deferrals) + [True]
    assert fake.requests("openai") == 2
    received = worker.output().count(f"[{slow.id}] received")
    assert received == len(deferrals) + 1
