"""Every attempt admitted before it is sent, every answer charged: fault injection, real workers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Isolated, Worker
from worker.errors import (
    DailyBudgetExceededError,
    MalformedResponseError,
    RateLimitedError,
    TruncatedResponseError,
)
from worker.models import Message, Usage
from worker.pipeline import JobContext
from worker.prices import load_prices
from worker.tokens import count_messages

LLMQ = str(Path(sys.executable).with_name("llmq"))
PROMPT = [{"role": "user", "content": "Write a very long poem about the sea."}]
MINI = load_prices().get("gpt-4o-mini")


def prompt_tokens() -> int:
    return count_messages([Message.model_validate(m) for m in PROMPT], model="gpt-4o-mini")


def cost_of(input_tokens: int, output_tokens: int) -> Decimal:
    return MINI.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens))


def send(isolated: Isolated, user_id: str, count: int, **options: Any) -> list[Any]:
    """`count` jobs one after the other (each waits for the last), as outcomes."""
    outcomes = []
    for _ in range(count):
        job = isolated.app.send_task(
            "llm.complete",
            kwargs={"messages": PROMPT, "user_id": user_id, "cache": False, **options},
            queue="llm",
        )
        outcomes.append(job.get(timeout=60, propagate=False))
    return outcomes


def llmq_cost(isolated: Isolated, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [LLMQ, "cost", "--json", *args],
        env=isolated.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def user_cost(report: dict[str, Any], user_id: str) -> Decimal:
    """The user's total cost in a `llmq cost --json` report."""
    row = report["user"].get(user_id)
    return Decimal(str(row["cost_usd"])) if row else Decimal(0)


def money_env(**env: str) -> dict[str, str]:
    return {"LLM_FALLBACKS": "", "LLM_USER_DAILY_BUDGET_USD": "0.001", **env}


@pytest.mark.parametrize("policy", ["fail", "retry_larger"])
def test_truncated_answers_are_charged_and_the_budget_stops_them(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str, policy: str
) -> None:
    worker: Worker = start_worker(isolated=isolated, **money_env(LLM_ON_TRUNCATION=policy))
    fake.set_always("openai", Fault(finish_reason="length"))
    # Each answer is as long as max_tokens allowed: the worst case of the first call.
    fake.usage = {"input_tokens": prompt_tokens(), "output_tokens": 100, "cached_input_tokens": 0}
    per_answer = cost_of(prompt_tokens(), 100)

    outcomes = send(isolated, user_id, 60, max_tokens=100)

    served = fake.requests("openai")
    truncated = [o for o in outcomes if isinstance(o, TruncatedResponseError)]
    refused = [o for o in outcomes if isinstance(o, DailyBudgetExceededError)]
    assert len(truncated) + len(refused) == 60 and truncated and refused
    # The budget held: what the provider served costs no more than the budget plus one
    # job's worst case (a retry_larger job's second call may ask for twice the output).
    one_job = per_answer + (cost_of(prompt_tokens(), 200) if policy == "retry_larger" else 0)
    assert served * per_answer <= Decimal("0.001") + one_job
    if policy == "fail":
        assert served == len(truncated)
    else:
        # Some jobs got their first answer and then no budget for the larger retry.
        assert 2 * len(truncated) <= served <= 2 * len(truncated) + len(refused)
    # Every answer served is charged: in the log records, in Redis, in the rate limits.
    charged = served * per_answer
    assert abs(user_cost(llmq_cost(isolated, str(worker.log_path)), user_id) - charged) < 1e-9
    assert abs(user_cost(llmq_cost(isolated, "--today"), user_id) - charged) < 1e-9
    jobs = [r for r in worker.records("llm_job") if r["user_id"] == user_id]
    assert sum(r["charged_calls"] for r in jobs) == served
    done = subprocess.run(
        [LLMQ, "limits", user_id, "--json"], env=isolated.env, capture_output=True, text=True
    )
    (tokens,) = json.loads(done.stdout)["limits"]
    assert tokens["usage"] == served * (prompt_tokens() + 100)


def test_timeouts_are_charged_at_the_worst_case(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    worker: Worker = start_worker(
        isolated=isolated, **money_env(LLM_TIMEOUT_SECONDS="0.5", LLM_RETRY_ATTEMPTS="1")
    )
    fake.set_always("openai", Fault(delay=0.8))
    outcomes = send(isolated, user_id, 3, max_tokens=100)
    assert all(type(o).__name__ == "AllProvidersFailedError" for o in outcomes), outcomes
    worst = cost_of(prompt_tokens(), 100)
    records = [r for r in worker.records("llm_job") if r["user_id"] == user_id]
    assert [r["charged_as"] for r in records] == ["worst_case"] * 3
    assert abs(user_cost(llmq_cost(isolated, "--today"), user_id) - 3 * worst) < 1e-9
    calls = [r for r in worker.records("llm_call") if r["user_id"] == user_id]
    assert {c["charged_as"] for c in calls} == {"worst_case"}


def test_provider_limits_count_every_attempt(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(
        isolated=isolated,
        LLM_FALLBACKS="",
        LLM_PROVIDER_LIMITS='{"openai": {"rpm": 10}}',
        LLM_RETRY_INITIAL_WAIT_SECONDS="0.01",
    )
    for _ in range(20):
        fake.script("openai", Fault(status=500), Fault(status=500), Fault())
    outcomes = send(isolated, user_id, 6, max_tokens=20)
    # Three jobs of three requests each, then the tenth request; then nothing more.
    assert fake.requests("openai") == 10
    assert [isinstance(o, dict) for o in outcomes] == [True] * 3 + [False] * 3
    assert all(isinstance(o, RateLimitedError) for o in outcomes[3:])
    assert {o.limit_name for o in outcomes[3:]} == {"provider_rpm:openai"}


def test_a_fallback_is_admitted_by_its_own_limits(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(
        isolated=isolated,
        concurrency=8,
        LLM_PROVIDER_LIMITS='{"anthropic": {"rpm": 20}}',
        LLM_RETRY_ATTEMPTS="1",
    )
    fake.set_always("openai", Fault(status=503))  # the primary is down
    jobs = [
        isolated.app.send_task(
            "llm.complete",
            kwargs={"messages": PROMPT, "user_id": user_id, "max_tokens": 20, "cache": False},
            queue="llm",
        )
        for _ in range(60)
    ]
    outcomes = [job.get(timeout=60, propagate=False) for job in jobs]
    served = [o for o in outcomes if isinstance(o, dict)]
    limited = [o for o in outcomes if isinstance(o, RateLimitedError)]
    assert fake.requests("anthropic") == len(served) == 20
    assert {o["provider"] for o in served} == {"anthropic"}
    assert len(limited) == 40
    assert {o.limit_name for o in limited} == {"provider_rpm:anthropic"}


def test_unusable_usage_is_malformed_and_the_fallback_serves(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    for usage in ({}, {"prompt_tokens": None, "completion_tokens": 3, "total_tokens": 3}):
        fake.reset()
        fake.script("openai", Fault(body=json.dumps({**body, "usage": usage})))
        job = {"messages": PROMPT, "user_id": user_id, "max_tokens": 50, "cache": False}
        result = make_pipeline(LLM_RETRY_ATTEMPTS="1").complete(job, context=JobContext())
        assert result.provider == "anthropic" and result.charged_as == "worst_case"
        calls = [r for r in caplog.records if getattr(r, "event", None) == "llm_call"]
        assert calls[-2].error_kind == "MalformedResponseError"
        assert calls[-2].charged_as == "worst_case"
        caplog.clear()
    assert issubclass(MalformedResponseError, Exception)


def test_a_free_provider_is_not_metered_by_spend_limits(
    make_pipeline: MakePipeline, user_id: str
) -> None:
    pipeline = make_pipeline(
        LLM_PROVIDER="extractive", LLM_FALLBACKS="", LLM_USER_TOKENS_PER_HOUR=100
    )
    text = "Otters hold hands while they sleep. " * 40  # ~350 tokens, over the 100 allowed
    for _ in range(3):
        job = {"messages": [{"role": "user", "content": text}], "user_id": user_id}
        assert pipeline.complete(job, context=JobContext()).provider == "extractive"
