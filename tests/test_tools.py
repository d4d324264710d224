"""Function calling through the queue: tools out, tool calls back, across providers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer import submit
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import Worker
from worker.cache import cache_request
from worker.errors import (
    InvalidJobError,
    ToolCallMismatchError,
    ToolCallValidationError,
    UnsupportedOptionError,
)
from worker.models import CompletionJob
from worker.pipeline import JobContext, validate
from worker.prices import load_prices
from worker.providers.anthropic import to_anthropic
from worker.settings import load_settings

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def loop_messages(call_id: str = "call_0") -> list[dict[str, Any]]:
    """The second step of a tool loop, as the OpenAI SDK's messages look."""
    return [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
    ]


def test_openai_tool_call_is_a_successful_answer(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    result = make_pipeline().complete(
        {
            "messages": ASK,
            "user_id": user_id,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        context=JobContext(),
    )
    assert result.finish_reason == "tool_calls" and result.text == ""
    assert result.tool_calls is not None
    assert [c.model_dump() for c in result.tool_calls] == [{"id": "call_0", **CALL}]
    body = fake.seen[0].body
    assert body["tools"] == [WEATHER]
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert fake.requests() == 1


def test_anthropic_gets_the_same_tools_translated(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    pipeline = make_pipeline(LLM_PROVIDER="anthropic", LLM_FALLBACKS="openai")
    result = pipeline.complete(
        {
            "messages": ASK,
            "user_id": user_id,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        },
        context=JobContext(),
    )
    assert result.provider == "anthropic" and result.finish_reason == "tool_calls"
    assert result.tool_calls is not None and result.tool_calls[0].arguments == CALL["arguments"]
    body = fake.seen[0].body
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather now in a city.",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }


def test_tool_loop_messages_translate_to_anthropic_blocks() -> None:
    job = CompletionJob.model_validate({"messages": loop_messages(), "user_id": "u"})
    system, turns = to_anthropic(job.messages)
    assert system is None
    assert turns == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_0",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_0",
                    "content": [{"type": "text", "text": '{"temp": 21}'}],
                },
            ],
        },
    ]


def test_tool_result_step_reaches_openai_in_its_own_shape(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.text = "It is 21 degrees in Paris."
    result = make_pipeline().complete(
        {"messages": loop_messages(), "user_id": user_id, "tools": [WEATHER]},
        context=JobContext(),
    )
    assert result.finish_reason == "stop" and result.text == fake.text
    assert result.tool_calls is None
    sent = fake.seen[0].body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert sent[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_0"}


def test_arguments_off_the_schema_fail_typed_without_quoting_them(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [{"name": "get_weather", "arguments": {"town": "SECRET-ARG"}}]
    with pytest.raises(ToolCallValidationError) as raised:
        make_pipeline().complete(
            {"messages": ASK, "user_id": user_id, "tools": [WEATHER]}, context=JobContext()
        )
    assert sorted(raised.value.errors) == [
        "tool_calls[0] (get_weather): $: has properties the schema does not allow "
        "(additionalProperties)",
        "tool_calls[0] (get_weather): $: missing required properties ['city']",
    ]
    assert "SECRET-ARG" not in str(raised.value)
    assert fake.requests() == 1


@pytest.mark.parametrize(
    ("messages", "kind"),
    [
        # a tool result with no call before it
        ([*ASK, {"role": "tool", "tool_call_id": "nope", "content": "x"}], ToolCallMismatchError),
        # a call answered under another id
        (
            [*loop_messages()[:2], {"role": "tool", "tool_call_id": "other", "content": "x"}],
            ToolCallMismatchError,
        ),
        # a call left unanswered
        (loop_messages()[:2], ToolCallMismatchError),
        # a tool message without its id
        ([*loop_messages()[:2], {"role": "tool", "content": "x"}], ToolCallMismatchError),
        # tool_calls on a user message
        ([{**ASK[0], "tool_calls": loop_messages()[1]["tool_calls"]}], InvalidJobError),
    ],
)
def test_tool_turns_that_do_not_match_are_rejected(
    messages: list[dict[str, Any]], kind: type[Exception], fake: FakeProvider
) -> None:
    with pytest.raises(kind):
        validate({"messages": messages, "user_id": "u"})
    assert fake.requests() == 0


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"tool_choice": "auto"}, "need tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not in tools",
        ),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        (
            {
                "tools": [
                    {
                        **WEATHER,
                        "function": {**WEATHER["function"], "parameters": {"type": "array"}},
                    }
                ]
            },
            "object",
        ),
    ],
)
def test_bad_tool_options_are_rejected(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidJobError, match=problem):
        validate({"messages": ASK, "user_id": "u", **options})


def test_anthropic_shaped_tool_definition_is_read_too() -> None:
    job = validate(
        {
            "messages": ASK,
            "user_id": "u",
            "tools": [
                {
                    "name": "get_weather",
                    "description": "The weather now in a city.",
                    "input_schema": WEATHER["function"]["parameters"],
                }
            ],
        }
    )
    assert job.tools is not None and job.tools[0].model_dump(exclude_none=True) == WEATHER


def test_tools_count_as_input_tokens(make_pipeline: MakePipeline, user_id: str) -> None:
    pipeline = make_pipeline()
    plain = pipeline.plan(validate({"messages": ASK, "user_id": user_id}))
    tooled = pipeline.plan(validate({"messages": ASK, "user_id": user_id, "tools": [WEATHER]}))
    for bare, with_tools in zip(plain.candidates, tooled.candidates, strict=True):
        added = with_tools.estimate.input_tokens - bare.estimate.input_tokens
        assert added == with_tools.estimate.tools_tokens > 50
        assert with_tools.estimate.cost_usd > bare.estimate.cost_usd


def test_extractive_cannot_take_tools(make_pipeline: MakePipeline, user_id: str) -> None:
    pipeline = make_pipeline(LLM_PROVIDER="extractive", LLM_FALLBACKS="")
    with pytest.raises(UnsupportedOptionError) as raised:
        pipeline.complete(
            {"messages": ASK, "user_id": user_id, "tools": [WEATHER]}, context=JobContext()
        )
    assert raised.value.options == ["tools"]


def test_tool_jobs_cache_only_at_temperature_zero() -> None:
    settings = load_settings()
    prices = load_prices(None)

    def key(**options: Any) -> str | None:
        job = CompletionJob.model_validate({"messages": ASK, "user_id": "u", **options})
        found = cache_request(job, settings=settings, prices=prices)
        return found.digest if found else None

    assert key(tools=[WEATHER], temperature=0.7, cache=True) is None
    zero = key(tools=[WEATHER], temperature=0)
    assert zero is not None and zero != key(temperature=0)
    other = {**WEATHER, "function": {**WEATHER["function"], "description": "Other."}}
    assert zero != key(tools=[other], temperature=0)
    assert key(temperature=0) == key(temperature=0)


# --- through real workers -------------------------------------------------------------


def test_tools_job_through_a_worker_via_openai(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    result = submit(ASK, user_id, tools=[WEATHER], tool_choice="auto").get(timeout=30)
    assert result["finish_reason"] == "tool_calls" and result["provider"] == "openai"
    assert result["tool_calls"] == [{"id": "call_0", **CALL}]
    assert fake.requests("openai") == 1


def test_tools_job_through_a_worker_via_anthropic(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    result = submit(ASK, user_id, model="claude-haiku-4-5", tools=[WEATHER]).get(timeout=30)
    assert result["finish_reason"] == "tool_calls" and result["provider"] == "anthropic"
    assert result["tool_calls"] == [{"id": "toolu_0", **CALL}]
    assert fake.seen[0].body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]


def test_failing_openai_falls_back_to_anthropic_with_the_same_tools(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    fake.set_always("openai", Fault(status=500))
    result = submit(ASK, user_id, tools=[WEATHER], tool_choice="required").get(timeout=30)
    assert result["provider"] == "anthropic" and result["finish_reason"] == "tool_calls"
    assert result["tool_calls"][0]["arguments"] == CALL["arguments"]
    assert fake.requests("openai") >= 1 and fake.requests("anthropic") == 1
    anthropic = next(s.body for s in fake.seen if s.api == "anthropic")
    assert anthropic["tool_choice"] == {"type": "any"}


def test_two_step_tool_loop_through_the_queue(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    first = submit(ASK, user_id, tools=[WEATHER]).get(timeout=30)
    [call] = first["tool_calls"]
    # The app runs the tool, then sends the call and its result back, as the README shows.
    messages = [
        *ASK,
        {"role": "assistant", "content": first["text"] or None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp": 21})},
    ]
    fake.tool_calls = None
    fake.text = "It is 21 degrees in Paris."
    final = submit(messages, user_id, tools=[WEATHER]).get(timeout=30)
    assert final["finish_reason"] == "stop" and final["text"] == fake.text
    assert final["tool_calls"] is None
    sent = fake.seen[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == CALL["arguments"]
    assert sent[2]["tool_call_id"] == call["id"]


def test_submit_takes_the_openai_sdks_own_messages(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    from openai.types.chat import ChatCompletionMessage

    # What a web app holds after its SDK call: the reply object, with the unset fields
    # (refusal, audio, annotations) the SDK fills in.
    reply = ChatCompletionMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "annotations": [],
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
    )
    messages: list[Any] = [
        *ASK,
        reply,
        {"role": "tool", "tool_call_id": "call_9", "content": "21C"},
    ]
    fake.text = "21 degrees."
    result = submit(messages, user_id, tools=[WEATHER]).get(timeout=30)
    assert result["text"] == "21 degrees." and result["finish_reason"] == "stop"
    sent = fake.seen[0].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_9" and sent[1]["content"] is None
    assert sent[2] == {"role": "tool", "content": "21C", "tool_call_id": "call_9"}


def test_a_temperature_zero_tool_call_is_served_from_the_cache(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.tool_calls = [CALL]
    pipeline = make_pipeline()
    job = {"messages": ASK, "user_id": user_id, "tools": [WEATHER], "temperature": 0}
    first = pipeline.complete(job, context=JobContext())
    again = pipeline.complete(job, context=JobContext())
    assert not first.cached and again.cached and again.cost_usd == 0
    assert again.finish_reason == "tool_calls" and again.tool_calls == first.tool_calls
    # Warmer, the same tool job is a new call every time.
    warm = {**job, "temperature": 0.5, "cache": True}
    pipeline.complete(warm, context=JobContext())
    pipeline.complete(warm, context=JobContext())
    assert fake.requests() == 3
