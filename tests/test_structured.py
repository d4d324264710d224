"""Structured outputs: parsed answers, one re-ask, refusals, the schema in every identity."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from producer import ParsedResult, submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Worker, wait_for
from worker.cache import cache_request
from worker.errors import RefusalError, SchemaValidationError
from worker.models import CompletionJob
from worker.pipeline import JobContext
from worker.prices import load_prices
from worker.providers.openai import JSON_MODE_INSTRUCTION
from worker.settings import load_settings

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "total": {"type": "number", "minimum": 0},
        "lines": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["vendor", "total"],
    "additionalProperties": False,
}
ANSWER = {"vendor": "ACME", "total": 12.5, "lines": ["bolts", "nuts"]}


def json_schema(schema: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}}


def messages(tag: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Extract the invoice: ACME, 12.50 USD. {tag}"}]


def job_records(worker: Worker, user_id: str, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [r for r in worker.records("llm_job") if r.get("user_id") == user_id]

    return list(wait_for(lambda: len(found()) >= count and found(), timeout=10, what="llm_job"))


def test_json_schema_answer_is_returned_parsed(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.text = json.dumps(ANSWER)
    result = submit(messages(), user_id, response_format=json_schema()).get(timeout=30)
    assert result["parsed"] == ANSWER and result["text"] == fake.text
    assert result["refusal"] is None and result["attempts"] == 1
    sent = fake.seen[0].body["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}


def test_non_conforming_answer_costs_one_reask_then_fails_with_the_errors(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.text = json.dumps({"vendor": "ACME", "total": "twelve", "secret": "prompt echo"})
    pending = submit(messages(), user_id, response_format=json_schema())
    with pytest.raises(SchemaValidationError) as raised:
        pending.get(timeout=30)
    error = raised.value
    # The fields crossed the result backend intact, not parsed from the message.
    assert error.attempts == 2
    assert error.errors == [
        "$: has properties the schema does not allow (additionalProperties)",
        "$.total: fails 'type' (\"number\")",
    ]
    assert "twelve" not in str(error) and "prompt echo" not in str(error)
    assert fake.requests() == 2
    reask = fake.seen[1].body["messages"]
    assert reask[-2] == {"role": "assistant", "content": fake.text}
    assert reask[-1]["role"] == "user" and "$.total: fails 'type'" in reask[-1]["content"]
    # Both answers were charged: 2 x (11 in, 7 out) on gpt-4o-mini.
    [record] = job_records(worker, user_id)
    assert record["charged_calls"] == 2 and record["error_kind"] == "SchemaValidationError"
    assert record["cost_usd"] == pytest.approx(2 * (11 * 0.15e-6 + 7 * 0.60e-6), abs=1e-12)


def test_a_reask_that_conforms_is_returned(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", Fault(text="Sure! Here it is: {"), Fault(text=json.dumps(ANSWER)))
    result = make_pipeline().complete(
        {"messages": messages(), "user_id": user_id, "response_format": json_schema()},
        context=JobContext(),
    )
    assert result.parsed == ANSWER and result.attempts == 2
    assert (result.input_tokens, result.output_tokens) == (22, 14)
    assert "not JSON" in fake.seen[1].body["messages"][-1]["content"]


def test_json_object_mode_asks_for_json(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.text = '{"anything": [1, 2]}'
    result = make_pipeline().complete(
        {"messages": messages(), "user_id": user_id, "response_format": {"type": "json_object"}},
        context=JobContext(),
    )
    assert result.parsed == {"anything": [1, 2]}
    body = fake.seen[0].body
    assert body["response_format"] == {"type": "json_object"}
    # OpenAI's JSON mode refuses messages that never say "JSON".
    assert body["messages"][0] == {"role": "system", "content": JSON_MODE_INSTRUCTION}


def test_anthropic_native_structured_output(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.text = json.dumps(ANSWER)
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    result = pipeline.complete(
        {"messages": messages(), "user_id": user_id, "response_format": json_schema()},
        context=JobContext(),
    )
    assert result.parsed == ANSWER
    body = fake.seen[0].body
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tools" not in body


def test_anthropic_without_native_support_uses_a_forced_tool(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.text = json.dumps(ANSWER)
    pipeline = make_pipeline(
        LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai", LLM_ANTHROPIC_MODEL="claude-3-5-haiku"
    )
    result = pipeline.complete(
        {"messages": messages(), "user_id": user_id, "response_format": json_schema()},
        context=JobContext(),
    )
    assert result.parsed == ANSWER and result.finish_reason == "stop"
    body = fake.seen[0].body
    assert [t["input_schema"] for t in body["tools"]] == [SCHEMA]
    assert body["tool_choice"] == {"type": "tool", "name": body["tools"][0]["name"]}


def test_refusal_is_returned_as_refusal_not_text(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.script("openai", Fault(refusal="I can't help with that."))

    class Invoice(BaseModel):
        vendor: str

    pending = submit(messages(), user_id, response_model=Invoice)
    result = pending.get(timeout=30)
    assert result["refusal"] == "I can't help with that."
    assert result["text"] == "" and result["parsed"] is None
    assert fake.requests() == 1  # a refusal is an answer, not a reason to re-ask
    with pytest.raises(RefusalError) as raised:
        pending.get_parsed(timeout=5)
    assert raised.value.refusal == "I can't help with that."


class Line(BaseModel):
    sku: str
    qty: int


class Invoice(BaseModel):
    vendor: str
    total: float
    lines: list[Line]
    note: str | None = None


def test_submit_with_response_model_returns_an_instance(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    answer = {"vendor": "ACME", "total": 3.0, "lines": [{"sku": "b-1", "qty": 2}], "note": None}
    fake.text = json.dumps(answer)
    pending = submit(messages(uuid.uuid4().hex), user_id, response_model=Invoice)
    assert isinstance(pending, ParsedResult)
    invoice = pending.get_parsed(timeout=30)
    assert isinstance(invoice, Invoice) and invoice == Invoice.model_validate(answer)
    # The schema sent is strict: closed objects, every property required.
    sent = fake.seen[0].body["response_format"]["json_schema"]
    assert sent["name"] == "Invoice" and sent["strict"] is True
    assert sent["schema"]["additionalProperties"] is False
    assert sent["schema"]["required"] == ["vendor", "total", "lines", "note"]
    assert sent["schema"]["$defs"]["Line"]["additionalProperties"] is False


def test_schema_is_part_of_the_cache_key_and_the_fingerprint() -> None:
    settings = load_settings(LLM_PROVIDER="openai", OPENAI_API_KEY="k")
    other = {**SCHEMA, "required": ["vendor"]}

    def make(schema: dict[str, Any]) -> CompletionJob:
        return CompletionJob.model_validate(
            {
                "messages": messages(),
                "user_id": "u",
                "request_id": "r",
                "temperature": 0,
                "response_format": json_schema(schema),
            }
        )

    first, second = make(SCHEMA), make(other)
    keys = [cache_request(j, settings=settings, prices=load_prices()) for j in (first, second)]
    assert keys[0] is not None and keys[1] is not None
    assert keys[0].digest != keys[1].digest
    assert first.fingerprint() != second.fingerprint()
    # Log tags and the end user change neither answer nor key.
    tagged = first.model_copy(update={"metadata": {"a": "b"}, "user": "x"})
    tagged_key = cache_request(tagged, settings=settings, prices=load_prices())
    assert tagged_key is not None and tagged_key.digest == keys[0].digest


def test_a_job_without_new_options_keeps_its_identity() -> None:
    job = CompletionJob.model_validate({"messages": messages(), "user_id": "u", "request_id": "r"})
    dumped = job.options_dump(exclude=set())
    assert "response_format" not in dumped and "seed" not in dumped
    assert dumped["temperature"] is None  # the fields that were there stay, None included
