"""Sampling options and reasoning models: mapped per provider, or refused with zero calls."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import genai_prices
import pytest

from producer import submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Worker, wait_for
from worker import tokens
from worker.errors import (
    AllProvidersFailedError,
    InvalidJobError,
    UnsupportedOptionError,
)
from worker.guard import CostGuard
from worker.models import Message
from worker.options import RequestOptions
from worker.pipeline import JobContext
from worker.prices import load_prices

SAMPLING: dict[str, Any] = {
    "stop": ["\n\nEND", "###"],
    "seed": 42,
    "top_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
}


def job(user_id: str, **options: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three CRDTs."},
    ]
    return {"messages": messages, "user_id": user_id, "max_tokens": 100, **options}


def genai_cost(model: str, provider_id: str, **usage: int) -> Decimal:
    return Decimal(
        genai_prices.calc_price(
            genai_prices.Usage(**usage), model, provider_id=provider_id
        ).total_price
    )


def test_openai_gets_every_option_in_its_own_shape(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    make_pipeline().complete(
        job(user_id, **SAMPLING, user="end-user-7", metadata={"feature": "faq", "ab": "b"}),
        context=JobContext(),
    )
    body = fake.seen[0].body
    assert {k: body[k] for k in SAMPLING} == SAMPLING
    assert body["safety_identifier"] == "end-user-7"  # `user` is deprecated for this
    assert (body["max_tokens"], body["temperature"]) == (100, 0.7)
    # Tags are for llmq's logs only.
    assert "metadata" not in body and "user" not in body


def test_a_single_stop_string_is_a_list_of_one(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    make_pipeline().complete(job(user_id, stop="\n"), context=JobContext())
    assert fake.seen[0].body["stop"] == ["\n"]


def test_anthropic_gets_its_own_names_for_them(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    pipeline.complete(
        job(user_id, stop=["###"], top_p=0.8, user="end-user-7", metadata={"feature": "faq"}),
        context=JobContext(),
    )
    body = fake.seen[0].body
    assert body["stop_sequences"] == ["###"] and body["top_p"] == 0.8
    assert "temperature" not in body  # Claude 4.5 takes one of them, not both
    assert body["metadata"] == {"user_id": "end-user-7"}  # never the job's tags
    assert "stop" not in body and "seed" not in body


@pytest.mark.parametrize(
    ("provider", "options", "refused"),
    [
        ("anthropic", {"seed": 1}, ["seed"]),
        (
            "anthropic",
            {"presence_penalty": 0.1, "frequency_penalty": 0.1},
            ["frequency_penalty", "presence_penalty"],
        ),
        ("anthropic", {"reasoning_effort": "low"}, ["reasoning_effort"]),
        ("anthropic", {"temperature": 1.5}, ["temperature"]),
        ("anthropic", {"temperature": 0.5, "top_p": 0.9}, ["top_p"]),
        ("openai", {"reasoning_effort": "low"}, ["reasoning_effort"]),  # gpt-4o-mini
        ("openai", {"thinking": {"budget_tokens": 2048}}, ["thinking"]),
        ("openai", {"model": "gpt-5-mini", "temperature": 0.2}, ["temperature"]),
        ("openai", {"model": "gpt-5-mini", "top_p": 0.5, "stop": "x"}, ["stop", "top_p"]),
        ("openai", {"model": "o4-mini", "reasoning_effort": "minimal"}, ["reasoning_effort"]),
    ],
)
def test_what_the_primary_cannot_honour_fails_typed_with_zero_calls(
    make_pipeline: MakePipeline,
    fake: FakeProvider,
    user_id: str,
    provider: str,
    options: dict[str, Any],
    refused: list[str],
) -> None:
    fallback = "openai" if provider == "anthropic" else "anthropic"
    pipeline = make_pipeline(LLM_PROVIDER=provider, LLM_FALLBACKS=fallback)
    with pytest.raises(UnsupportedOptionError) as raised:
        pipeline.complete(job(user_id, **options), context=JobContext())
    assert raised.value.options == refused
    assert raised.value.provider == provider
    assert "Fix:" in str(raised.value) and "CRDT" not in str(raised.value)
    assert fake.requests() == 0


def test_a_fallback_that_cannot_honour_is_skipped(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.set_always("openai", Fault(status=500))
    pipeline = make_pipeline(LLM_RETRY_ATTEMPTS=1)
    with pytest.raises(AllProvidersFailedError):
        pipeline.complete(job(user_id, seed=7), context=JobContext())
    # anthropic has no seed: never tried, so nothing was sent to it.
    assert fake.requests("openai") == 1 and fake.requests("anthropic") == 0


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"temprature": 0.2}, "temprature: Extra inputs are not permitted"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": True}, "top_p"),
        ({"seed": "42"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"thinking": {"budget_tokens": 100}}, "thinking.budget_tokens"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"user": "x" * 65}, "user"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": 3}}},
                    },
                }
            },
            "not a valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array"}},
                }
            },
            '"type": "object" at its root',
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_values_fail_validation_with_zero_calls(
    make_pipeline: MakePipeline,
    fake: FakeProvider,
    user_id: str,
    options: dict[str, Any],
    problem: str,
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        make_pipeline().complete(job(user_id, **options), context=JobContext())
    assert problem in str(raised.value)
    assert fake.requests() == 0


def test_reasoning_model_through_a_worker(worker: Worker, fake: FakeProvider, user_id: str) -> None:
    fake.usage = {
        "input_tokens": 1_234,
        "output_tokens": 950,
        "cached_input_tokens": 200,
        "reasoning_tokens": 700,
    }
    pending = submit(
        job(user_id)["messages"],
        user_id,
        model="gpt-5-mini",
        max_tokens=3_000,
        reasoning_effort="low",
        seed=3,
    )
    result = pending.get(timeout=30)
    body = fake.seen[0].body
    assert body["max_completion_tokens"] == 3_000 and body["reasoning_effort"] == "low"
    assert "max_tokens" not in body and "temperature" not in body
    assert result["reasoning_tokens"] == 700 and result["output_tokens"] == 950
    # Reasoning tokens are output tokens, priced as such: genai-prices' own price.
    expected = genai_cost(
        "gpt-5-mini", "openai", input_tokens=1_234, cache_read_tokens=200, output_tokens=950
    )
    assert abs(Decimal(str(result["cost_usd"])) - expected) < Decimal("1e-9")


def test_anthropic_cache_writes_and_reads_priced_as_genai_prices_does(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.usage = {
        "input_tokens": 5_000,
        "output_tokens": 300,
        "cached_input_tokens": 2_000,
        "cache_write_input_tokens": 1_500,
    }
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    result = pipeline.complete(job(user_id), context=JobContext())
    assert (result.cached_input_tokens, result.cache_write_input_tokens) == (2_000, 1_500)
    expected = genai_cost(
        "claude-haiku-4-5",
        "anthropic",
        input_tokens=5_000,
        cache_read_tokens=2_000,
        cache_write_tokens=1_500,
        output_tokens=300,
    )
    assert abs(Decimal(str(result.cost_usd)) - expected) < Decimal("1e-9")
    # The cache-write rate ($1.25/M), not the base rate ($1/M): 1,500 x $0.25/M more.
    at_base = (1_500 * 1 + 2_000 * Decimal("0.1") + 1_500 * 1 + 300 * 5) / Decimal(10**6)
    assert expected - at_base == Decimal("0.000375")


def test_extended_thinking_is_sent_and_reserved_in_the_worst_case(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    plan = pipeline.plan(pipeline_job := _validated(job(user_id, thinking={"budget_tokens": 2048})))
    estimate = plan.primary.estimate
    assert (estimate.max_output_tokens, estimate.thinking_tokens) == (2148, 2048)
    price = load_prices().get("claude-haiku-4-5")
    assert estimate.cost_usd == price.worst_case(
        input_tokens=estimate.input_tokens, output_tokens=2148
    )
    pipeline.complete(pipeline_job.model_dump(), context=JobContext())
    body = fake.seen[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 2148 and "temperature" not in body


def _validated(raw: dict[str, Any]) -> Any:
    from worker.pipeline import validate

    return validate(raw)


def test_schema_size_counts_as_input_tokens() -> None:
    guard = CostGuard(load_prices(), max_cost_per_request=1.0)
    messages = [Message(role="user", content="Extract the invoice.")]
    schema = {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "x" * 40} for i in range(30)
        },
    }
    options = _validated(
        job(
            "u",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "inv", "schema": schema},
            },
        )
    )
    plain = guard.check(messages, model="gpt-4o-mini", max_tokens=100)
    shaped = guard.check(
        messages, model="gpt-4o-mini", max_tokens=100, options=RequestOptions.from_job(options)
    )
    counted = tokens.count_text(json.dumps(schema, sort_keys=True, separators=(",", ":")))
    assert shaped.input_tokens - plain.input_tokens == shaped.schema_tokens > counted
    assert shaped.cost_usd > plain.cost_usd


def test_metadata_tags_reach_the_logs(worker: Worker, fake: FakeProvider, user_id: str) -> None:
    pending = submit(job(user_id)["messages"], user_id, metadata={"feature": "faq-bot"})
    pending.get(timeout=30)

    def records() -> list[dict[str, Any]]:
        found = worker.records("llm_call", "llm_job")
        return [r for r in found if r.get("user_id") == user_id]

    found = wait_for(lambda: len(records()) >= 2 and records(), timeout=10, what="records")
    assert {r["event"] for r in found} == {"llm_call", "llm_job"}
    assert all(r["metadata"] == {"feature": "faq-bot"} for r in found)
    assert "metadata" not in fake.seen[0].body
