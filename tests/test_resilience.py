"""Retries (tenacity) and provider fallback: real SDKs against the fake provider."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pytest

from producer import submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Worker, wait_for
from worker.errors import (
    AllProvidersFailedError,
    DeadlineExceededError,
    MalformedResponseError,
)
from worker.pipeline import JobContext

PROMPT = "Name three prime numbers."


def job(user_id: str, **options: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPT}], "user_id": user_id, **options}


def call_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llmq.calls"]


def gaps(fake: FakeProvider, api: str) -> list[float]:
    times = [seen.at for seen in fake.seen if seen.api == api]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def log_lines(worker: Worker, request_id: str) -> list[dict[str, Any]]:
    return [r for r in worker.records() if request_id in json.dumps(r)]


def test_429_retry_after_twice_then_success_through_worker(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    limited = Fault(status=429, headers={"Retry-After": "1"})
    fake.script("openai", limited, limited)
    result = submit(job(user_id)["messages"], user_id).get(timeout=60)

    assert result["provider"] == "openai" and result["attempts"] == 3
    assert result["text"] == fake.text
    assert fake.requests("openai") == 3 and fake.requests("anthropic") == 0
    # Recorded arrival times at the fake: each retry came at least the second it asked for.
    for gap in gaps(fake, "openai"):
        assert 1.0 <= gap < 15

    def calls() -> list[dict[str, Any]]:
        found = [r for r in log_lines(worker, result["request_id"]) if r.get("event") == "llm_call"]
        return found if len(found) == 3 else []

    records = wait_for(calls, timeout=10, what="the job's three llm_call records")
    assert [c["attempt"] for c in records] == [1, 2, 3]
    assert [c["wait_seconds"] for c in records] == [1.0, 1.0, None]
    assert [c["error_kind"] for c in records] == [
        "RateLimitedByProviderError",
        "RateLimitedByProviderError",
        None,
    ]


def test_retry_after_ms_is_honoured(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", Fault(status=503, headers={"retry-after-ms": "400"}))
    result = make_pipeline().complete(job(user_id), context=JobContext())
    assert result.provider == "openai" and result.attempts == 2
    assert 0.4 <= gaps(fake, "openai")[0] < 10


def test_retry_after_over_the_cap_falls_back_instead_of_waiting(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", Fault(status=429, headers={"Retry-After": "120"}))
    pipeline = make_pipeline(LLM_RETRY_MAX_WAIT_SECONDS=5)
    result = pipeline.complete(job(user_id), context=JobContext())
    assert result.provider == "anthropic" and result.attempts == 2
    assert fake.requests("openai") == 1
    first = call_records(caplog)[0]
    assert first.error_kind == "RateLimitedByProviderError" and first.wait_seconds is None


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 529])
def test_transient_status_is_retried_with_backoff(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any, status: int
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", Fault(status=status), Fault(status=status))
    result = make_pipeline().complete(job(user_id), context=JobContext())
    assert result.provider == "openai" and result.attempts == 3
    waits = [r.wait_seconds for r in call_records(caplog)]
    # Exponential with jitter: 0.05 s then 0.1 s, each plus up to 0.05 s.
    assert waits[2] is None
    assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.15
    for gap, wait in zip(gaps(fake, "openai"), waits, strict=False):
        assert gap >= wait - 0.001


def test_anthropic_529_overloaded_is_retried(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("anthropic", Fault(status=529))
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    result = pipeline.complete(job(user_id), context=JobContext())
    assert result.provider == "anthropic" and result.attempts == 2
    assert fake.requests("openai") == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_non_transient_status_is_never_retried(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, status: int
) -> None:
    fake.script("openai", Fault(status=status))
    result = make_pipeline().complete(job(user_id), context=JobContext())
    assert fake.requests("openai") == 1
    assert result.provider == "anthropic" and result.attempts == 2


def test_401_falls_back_at_once_with_an_error_record(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", Fault(status=401))
    result = submit(job(user_id)["messages"], user_id).get(timeout=30)

    assert result["provider"] == "anthropic" and result["model"] == "claude-haiku-4-5"
    assert result["attempts"] == 2
    assert fake.requests("openai") == 1 and fake.requests("anthropic") == 1
    records = wait_for(
        lambda: [r for r in log_lines(worker, result["request_id"]) if r.get("level") == "ERROR"],
        timeout=10,
        what="an ERROR record for the 401",
    )
    assert records[0]["error_kind"] == "AuthenticationError"
    assert "401" in records[0]["error"]
    loud = [line for line in worker.output().splitlines() if "rejected its API key" in line]
    assert loud and json.loads(loud[-1])["level"] == "ERROR"


def test_malformed_json_is_a_provider_failure_and_fallback_serves(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", Fault(malformed=True))
    result = make_pipeline().complete(job(user_id), context=JobContext())
    assert result.provider == "anthropic" and result.text == fake.text
    assert fake.requests("openai") == 1
    first = call_records(caplog)[0]
    assert first.error_kind == MalformedResponseError.__name__
    assert "not valid JSON" in first.error


NO_CHOICES = {"id": "x", "object": "chat.completion", "model": "m", "choices": []}
EMPTY_CONTENT = {
    **NO_CHOICES,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
}


@pytest.mark.parametrize(
    ("body", "problem"),
    [(NO_CHOICES, "sent no choices"), (EMPTY_CONTENT, "sent empty content")],
    ids=["no choices", "empty content"],
)
def test_unusable_answers_fall_back(
    make_pipeline: MakePipeline,
    fake: FakeProvider,
    user_id: str,
    caplog: Any,
    body: dict[str, Any],
    problem: str,
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", Fault(body=json.dumps(body)))
    result = make_pipeline().complete(job(user_id), context=JobContext())
    assert result.provider == "anthropic" and result.text == fake.text
    assert fake.requests("openai") == 1
    first = call_records(caplog)[0]
    assert first.error_kind == "MalformedResponseError" and problem in first.error


def test_timeout_is_retried(make_pipeline: MakePipeline, fake: FakeProvider, user_id: str) -> None:
    fake.script("openai", Fault(delay=1.5))
    result = make_pipeline(LLM_TIMEOUT_SECONDS=0.5).complete(job(user_id), context=JobContext())
    assert result.provider == "openai" and result.attempts == 2


def test_every_provider_failing_lists_each_last_error(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.set_always("openai", Fault(status=503))
    fake.set_always("anthropic", Fault(status=401))
    with pytest.raises(AllProvidersFailedError) as raised:
        make_pipeline(LLM_RETRY_ATTEMPTS=2).complete(job(user_id), context=JobContext())
    message = str(raised.value)
    assert "openai (gpt-4o-mini): openai answered HTTP 503" in message
    assert "anthropic (claude-haiku-4-5): anthropic answered HTTP 401" in message
    assert fake.requests("openai") == 2 and fake.requests("anthropic") == 1


def test_deadline_bounds_the_whole_job(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    slow = Fault(status=503, headers={"Retry-After": "0.4"})
    fake.set_always("openai", slow)
    fake.set_always("anthropic", slow)
    pipeline = make_pipeline(LLM_RETRY_ATTEMPTS=10, LLM_JOB_DEADLINE_SECONDS=1)
    with pytest.raises(DeadlineExceededError) as raised:
        pipeline.complete(job(user_id), context=JobContext())
    # 10 attempts on each would be 20 requests; a 1 s deadline with 0.4 s waits allows four.
    assert 1 <= fake.requests() <= 4
    assert "LLM_JOB_DEADLINE_SECONDS" in str(raised.value)
    assert isinstance(raised.value, AllProvidersFailedError)
