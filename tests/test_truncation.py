"""finish_reason "length": fail, retry_larger or accept, and always the alert."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from producer import submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Worker, wait_for
from worker.errors import TruncatedResponseError
from worker.pipeline import JobContext

CUT = Fault(finish_reason="length")


def job(user_id: str, **options: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Write a long poem."}]
    return {"messages": messages, "user_id": user_id, "max_tokens": 100, **options}


def alerts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "llm_alert"]


def job_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    return next(r for r in caplog.records if getattr(r, "event", None) == "llm_job")


def test_fail_raises_typed_and_alerts(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", CUT)
    with pytest.raises(TruncatedResponseError) as raised:
        make_pipeline().complete(job(user_id), context=JobContext())
    assert "max_tokens=100" in str(raised.value) and "on_truncation" in str(raised.value)
    # Truncation is not a provider failure: no fallback, no retry.
    assert fake.requests() == 1
    [alert] = alerts(caplog)
    assert alert.alert == "TRUNCATED_RESPONSE" and alert.on_truncation == "fail"
    assert alert.max_tokens == 100 and alert.levelno == logging.WARNING
    record = job_record(caplog)
    assert record.alert == "TRUNCATED_RESPONSE" and record.error_kind == "TruncatedResponseError"


def test_accept_returns_it_marked_truncated(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.script("openai", CUT)
    result = make_pipeline().complete(job(user_id, on_truncation="accept"), context=JobContext())
    assert result.truncated is True and result.finish_reason == "length"
    assert result.text == fake.text
    assert [a.on_truncation for a in alerts(caplog)] == ["accept"]
    assert job_record(caplog).alert == "TRUNCATED_RESPONSE"


def test_default_policy_comes_from_settings(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", CUT)
    result = make_pipeline(LLM_ON_TRUNCATION="accept").complete(job(user_id), context=JobContext())
    assert result.truncated is True


def test_retry_larger_once_and_pay_for_both(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.usage = {"input_tokens": 1000, "output_tokens": 100, "cached_input_tokens": 0}
    fake.script("openai", CUT)
    pipeline = make_pipeline(LLM_TRUNCATION_RETRY_FACTOR=3)
    result = pipeline.complete(job(user_id, on_truncation="retry_larger"), context=JobContext())

    assert [seen.body["max_tokens"] for seen in fake.seen] == [100, 300]
    assert result.truncated is False and result.finish_reason == "stop"
    assert result.attempts == 2
    # Both answers were paid for: 2 x (1000 in at $0.15/M + 100 out at $0.60/M).
    assert (result.input_tokens, result.output_tokens) == (2000, 200)
    assert result.cost_usd == pytest.approx(2 * (1000 * 0.15e-6 + 100 * 0.60e-6), abs=1e-12)
    assert [a.on_truncation for a in alerts(caplog)] == ["retry_larger"]


def test_retry_larger_still_truncated_fails(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    fake.set_always("openai", CUT)
    with pytest.raises(TruncatedResponseError) as raised:
        make_pipeline().complete(job(user_id, on_truncation="retry_larger"), context=JobContext())
    assert "max_tokens=200" in str(raised.value)
    assert fake.requests("openai") == 2 and fake.requests("anthropic") == 0
    assert [a.max_tokens for a in alerts(caplog)] == [100, 200]


def test_retry_larger_must_pass_the_cost_guard(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", CUT)
    # 1000 output tokens of gpt-4o-mini cost $0.0006 at worst; 2000 would be $0.0012.
    pipeline = make_pipeline(LLM_MAX_COST_PER_REQUEST=0.001)
    with pytest.raises(TruncatedResponseError) as raised:
        pipeline.complete(
            job(user_id, on_truncation="retry_larger", max_tokens=1000), context=JobContext()
        )
    assert "max_tokens=2000" in str(raised.value) and "per-request budget" in str(raised.value)
    assert fake.requests() == 1


def test_anthropic_max_tokens_counts_as_truncated(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("anthropic", CUT)
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    with pytest.raises(TruncatedResponseError):
        pipeline.complete(job(user_id), context=JobContext())


def test_truncated_job_fails_typed_through_the_worker(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", CUT)
    pending = submit(job(user_id)["messages"], user_id, max_tokens=100)
    with pytest.raises(TruncatedResponseError):
        pending.get(timeout=30)
    line = wait_for(
        lambda: next(
            (
                line
                for line in worker.output().splitlines()
                if pending.id in line and "llm_alert" in line
            ),
            None,
        ),
        timeout=10,
        what="the TRUNCATED_RESPONSE alert in the worker log",
    )
    assert '"alert": "TRUNCATED_RESPONSE"' in line
