"""A job's request options, and which provider and model can honour each of them.

The providers map each option to their own API's shape (worker/providers); this module
decides, before anything is sent, whether a provider can take the job at all: the
primary that cannot fails it with UnsupportedOptionError, a fallback that cannot is
skipped (worker/pipeline.py, `Pipeline.candidates`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from worker import tokens
from worker.errors import UnsupportedOptionError
from worker.models import CompletionJob, JsonObjectFormat, JsonSchemaFormat, ResponseFormat
from worker.prices import ModelPrice
from worker.tools import Tool, ToolChoice

TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls")
# What each provider's API can be asked (beyond model, messages, max_tokens, temperature).
# `user` is not listed: it is passed on where the API has a field for it, dropped where it
# has none, since it never changes the answer. `metadata` is never sent.
SUPPORTED: dict[str, frozenset[str]] = {
    "openai": frozenset(
        {
            "stop",
            "seed",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "reasoning_effort",
            "response_format",
            *TOOL_OPTIONS,
        }
    ),
    # Gemini's OpenAI-compatible endpoint (and vLLM, Ollama behind the same path).
    "gemini": frozenset(
        {
            "stop",
            "seed",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "reasoning_effort",
            "response_format",
            *TOOL_OPTIONS,
        }
    ),
    "anthropic": frozenset({"stop", "top_p", "thinking", "response_format", *TOOL_OPTIONS}),
    # The offline summarizer takes nothing but the text.
    "extractive": frozenset(),
}
# OpenAI's reasoning models refuse sampling controls: only the default temperature.
NOT_FOR_REASONING = ("top_p", "presence_penalty", "frequency_penalty", "stop")
# Tokens a schema costs beyond its own text: the provider wraps it in instructions
# (Anthropic documents 313-346 tokens of tool-use system prompt; OpenAI a few).
SCHEMA_OVERHEAD_TOKENS = {"anthropic": 350}
DEFAULT_SCHEMA_OVERHEAD = 20
# Anthropic's extended thinking accepts top_p only from here up.
THINKING_MIN_TOP_P = 0.95


@dataclass(frozen=True, kw_only=True)
class RequestOptions:
    """What a job asks of the provider beyond its messages, model and max_tokens."""

    # The job's own temperature; None: the default, which some models must not be sent.
    temperature: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    reasoning_effort: str | None = None
    thinking_budget: int | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @classmethod
    def from_job(cls, job: CompletionJob) -> RequestOptions:
        """The options of `job`."""
        return cls(
            temperature=job.temperature,
            stop=tuple(job.stop) if isinstance(job.stop, list) else None,
            seed=job.seed,
            top_p=job.top_p,
            presence_penalty=job.presence_penalty,
            frequency_penalty=job.frequency_penalty,
            reasoning_effort=job.reasoning_effort,
            thinking_budget=job.thinking.budget_tokens if job.thinking else None,
            response_format=job.response_format,
            user=job.user,
            tools=tuple(job.tools) if job.tools else None,
            tool_choice=job.tool_choice,
            parallel_tool_calls=job.parallel_tool_calls,
        )

    @property
    def asked(self) -> list[str]:
        """The names of the options set, as the job spells them."""
        names = {
            "stop": self.stop,
            "seed": self.seed,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "reasoning_effort": self.reasoning_effort,
            "thinking": self.thinking_budget,
            "response_format": self.response_format,
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        return [name for name, value in names.items() if value is not None]

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a json_schema job."""
        if isinstance(self.response_format, JsonSchemaFormat):
            return self.response_format.json_schema.schema_
        return None

    @property
    def json_object(self) -> bool:
        """Whether the job asks for any JSON object."""
        return isinstance(self.response_format, JsonObjectFormat)


def check_supported(options: RequestOptions, *, model: str, price: ModelPrice) -> None:
    """Nothing, or UnsupportedOptionError naming every option `model` cannot honour."""
    provider = price.provider
    supported = SUPPORTED.get(provider, SUPPORTED["openai"])
    problems: dict[str, str] = {}
    for name in options.asked:
        if name not in supported:
            problems[name] = f"{provider} has no {name}"
    if price.reasoning:
        for name in NOT_FOR_REASONING:
            if name in options.asked:
                problems[name] = f"{model} is a reasoning model, which refuses {name}"
        if options.temperature is not None and options.temperature != 1:
            problems["temperature"] = (
                f"{model} is a reasoning model: it takes only the default temperature (1)"
            )
    if options.reasoning_effort is not None and "reasoning_effort" not in problems:
        if not price.reasoning_efforts:
            problems["reasoning_effort"] = f"{model} has no reasoning_effort"
        elif options.reasoning_effort not in price.reasoning_efforts:
            problems["reasoning_effort"] = (
                f"{model} takes reasoning_effort {', '.join(price.reasoning_efforts)}, "
                f"not {options.reasoning_effort!r}"
            )
    if options.thinking_budget is not None and "thinking" not in problems:
        _check_thinking(options, model=model, price=price, problems=problems)
    if provider == "anthropic" and options.tools:
        _check_anthropic_tools(options, price=price, problems=problems)
    if provider == "anthropic" and (options.temperature or 0) > 1:
        problems["temperature"] = "anthropic takes a temperature from 0 to 1"
    if provider == "anthropic" and None not in (options.temperature, options.top_p):
        problems["top_p"] = "anthropic takes temperature or top_p, not both"
    if problems:
        raise UnsupportedOptionError(
            f"{provider} ({model}) cannot honour "
            + "; ".join(f"{name}: {why}" for name, why in problems.items())
            + ". Fix: drop those options, or send the job to a model that takes them "
            "(job `model`, LLM_PROVIDER, LLM_MODEL).",
            {"options": sorted(problems), "provider": provider, "model": model},
        )


def _check_thinking(
    options: RequestOptions, *, model: str, price: ModelPrice, problems: dict[str, str]
) -> None:
    if not price.thinking:
        problems["thinking"] = f"{model} has no extended thinking"
        return
    # Anthropic: thinking is incompatible with a set temperature, a low top_p and a
    # forced tool (the way llmq asks models without native structured outputs).
    if options.temperature is not None and options.temperature != 1:
        problems["temperature"] = "extended thinking takes only the default temperature (1)"
    if options.top_p is not None and options.top_p < THINKING_MIN_TOP_P:
        problems["top_p"] = f"extended thinking takes top_p from {THINKING_MIN_TOP_P} to 1"
    if options.json_object or (options.schema is not None and not price.structured_outputs):
        problems["response_format"] = (
            f"{model} answers in a schema through a forced tool call, which extended "
            "thinking does not allow"
        )


def _check_anthropic_tools(
    options: RequestOptions, *, price: ModelPrice, problems: dict[str, str]
) -> None:
    if options.response_format is not None and (
        options.json_object or not price.structured_outputs
    ):
        # Without native structured outputs the answer itself is a forced tool call.
        problems["response_format"] = (
            f"{price.provider} answers in a schema through a forced tool, which the job's "
            "own tools would compete with"
        )
    forced = options.tool_choice is not None and options.tool_choice not in ("auto", "none")
    if options.thinking_budget is not None and forced:
        problems["tool_choice"] = "extended thinking takes tool_choice auto or none only"


def tools_tokens(options: RequestOptions, *, price: ModelPrice) -> int:
    """Input tokens the tool definitions add to the prompt (0 without tools)."""
    if not options.tools:
        return 0
    from worker.tools import (
        DEFAULT_TOOLS_OVERHEAD,
        TOKENS_PER_TOOL,
        TOOLS_OVERHEAD_TOKENS,
        tools_text,
    )

    counted = (
        tokens.count_text(tools_text(options.tools))
        + TOKENS_PER_TOOL * len(options.tools)
        + TOOLS_OVERHEAD_TOKENS.get(price.provider, DEFAULT_TOOLS_OVERHEAD)
    )
    if price.provider in ("openai", "extractive"):
        return counted
    from worker.guard import NON_OPENAI_MARGIN

    return math.ceil(counted * NON_OPENAI_MARGIN)


def schema_tokens(options: RequestOptions, *, price: ModelPrice) -> int:
    """Input tokens the response format adds to the prompt (0 without one)."""
    if options.response_format is None:
        return 0
    schema = options.schema if options.schema is not None else {"type": "object"}
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    counted = tokens.count_text(text) + SCHEMA_OVERHEAD_TOKENS.get(
        price.provider, DEFAULT_SCHEMA_OVERHEAD
    )
    if price.provider in ("openai", "extractive"):
        return counted
    # Counted with OpenAI's encoding: the same margin as the prompt's (worker/guard.py).
    from worker.guard import NON_OPENAI_MARGIN

    return math.ceil(counted * NON_OPENAI_MARGIN)
