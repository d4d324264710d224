"""Anthropic Messages through the official anthropic SDK."""

from __future__ import annotations

import json
import threading
from typing import Any

import anthropic

from worker.content import ContentPart, ImageUrlPart, TextPart
from worker.errors import MalformedResponseError, ProviderConnectionError, ProviderTimeoutError
from worker.models import Completion, FinishReason, Message, Usage
from worker.providers.base import (
    ProviderRequest,
    error_for_status,
    error_message,
    request_sent,
    short,
    usage_of,
)
from worker.tools import anthropic_tool_choice, anthropic_tools, received

STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_clients: dict[tuple[str, str | None, float], anthropic.Anthropic] = {}
_clients_lock = threading.Lock()


def client(*, api_key: str, base_url: str | None, timeout: float) -> anthropic.Anthropic:
    """One SDK client per process and configuration: it holds the connection pool."""
    key = (api_key, base_url, timeout)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = anthropic.Anthropic(
                api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
            )
        return _clients[key]


def to_anthropic(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split out system messages (Anthropic takes them apart) and merge same-role runs.

    Plain text turns stay strings, as before; a turn with parts, tool calls or tool
    results becomes content blocks (a tool result is a user turn in Anthropic's API).
    """
    system = "\n\n".join(m.text for m in messages if m.role == "system") or None
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        role = "user" if m.role == "tool" else m.role
        plain = isinstance(m.content, str) and m.role != "tool" and not m.tool_calls
        if turns and turns[-1]["role"] == role:
            last = turns[-1]
            if plain and isinstance(last["content"], str):
                last["content"] += "\n\n" + str(m.content)
            else:
                last["content"] = _blocks(last["content"]) + anthropic_blocks(m)
        else:
            turns.append({"role": role, "content": m.content if plain else anthropic_blocks(m)})
    return system, turns


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def anthropic_part(part: ContentPart) -> dict[str, Any] | None:
    """A content part as an Anthropic block (OpenAI's image_url translated); None if empty."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, ImageUrlPart):
        inline = part.image_url.base64
        source = (
            {"type": "base64", "media_type": inline[0], "data": inline[1]}
            if inline
            else {"type": "url", "url": part.image_url.url}
        )
        return {"type": "image", "source": source}
    return part.model_dump(exclude_none=True)


def anthropic_blocks(message: Message) -> list[dict[str, Any]]:
    """A message's content as Anthropic blocks: parts, tool_use calls, or one tool_result."""
    blocks = [b for b in (anthropic_part(p) for p in message.parts) if b is not None]
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if blocks:
            result["content"] = blocks
        return [result]
    return blocks + [call.anthropic() for call in message.tool_calls or ()]


# The tool a model without native structured outputs is made to call with its answer.
ANSWER_TOOL = "answer"


def request_body(request: ProviderRequest) -> dict[str, Any]:
    """The Messages API arguments for `request`, in Anthropic's shape."""
    options = request.options
    system, turns = to_anthropic(request.messages)
    body: dict[str, Any] = {"model": request.model, "messages": turns}
    if system:
        body["system"] = system
    # Thinking tokens count towards max_tokens: the guard already added the budget.
    body["max_tokens"] = request.max_tokens
    # anthropic 2.x dropped `temperature` and `top_p` from the signature; the API takes them.
    extra: dict[str, Any] = {}
    if options.thinking_budget is not None:
        # Extended thinking takes only the default temperature: none is sent.
        body["thinking"] = {"type": "enabled", "budget_tokens": options.thinking_budget}
    elif options.top_p is None or options.temperature is not None:
        # Claude 4.5 models take temperature or top_p, not both: a job that sets top_p
        # alone is sent no default temperature.
        extra["temperature"] = request.temperature
    if options.top_p is not None:
        extra["top_p"] = options.top_p
    if options.stop:
        body["stop_sequences"] = list(options.stop)
    if options.user is not None:
        body["metadata"] = {"user_id": options.user}
    schema = options.schema
    if schema is not None and request.native_schema:
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    elif options.response_format is not None:
        # Strict tool use's equivalent for every model: one tool, which it must call,
        # whose input is the answer.
        body["tools"] = [
            {
                "name": ANSWER_TOOL,
                "description": "Give the answer, as the input of this tool.",
                "input_schema": schema if schema is not None else {"type": "object"},
            }
        ]
        body["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL}
    if options.tools:
        body["tools"] = anthropic_tools(options.tools)
        choice = anthropic_tool_choice(options.tool_choice, options.parallel_tool_calls)
        if choice is not None:
            body["tool_choice"] = choice
    if extra:
        body["extra_body"] = extra
    return body


def _answer_tool(request: ProviderRequest) -> bool:
    """Whether the request forced llmq's answer tool (structured output without native)."""
    options = request.options
    return options.response_format is not None and not (
        options.schema is not None and request.native_schema
    )


class AnthropicProvider:
    """Messages API through the official anthropic SDK."""

    name = "anthropic"

    def __init__(self, *, api_key: str, base_url: str | None, timeout: float) -> None:
        self._client = client(api_key=api_key, base_url=base_url, timeout=timeout)

    def complete(self, request: ProviderRequest) -> Completion:
        """Send the request; normalize the answer or raise a typed ProviderError."""
        try:
            response = self._client.messages.create(
                **request_body(request), timeout=request.timeout
            )
        except anthropic.APITimeoutError as exc:
            raise ProviderTimeoutError(
                f"anthropic timed out after {request.timeout}s",
                provider=self.name,
                sent=request_sent(exc),
            ) from None
        except anthropic.APIConnectionError as exc:
            raise ProviderConnectionError(
                f"anthropic unreachable: {short(exc)}",
                provider=self.name,
                sent=request_sent(exc),
            ) from None
        except anthropic.APIStatusError as exc:
            raise error_for_status(
                exc.status_code,
                short(error_message(exc.body) or exc.message),
                provider=self.name,
                headers=exc.response.headers,
            ) from None
        except (anthropic.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            # A 200 whose body cannot be read: it may still have been billed.
            raise MalformedResponseError(
                f"anthropic sent a response that is not valid JSON: {type(exc).__name__}",
                provider=self.name,
                answered=True,
            ) from None
        return self._normalize(response, answer_tool=_answer_tool(request))

    def _normalize(self, response: Any, *, answer_tool: bool = True) -> Completion:
        """The answer as a Completion, or MalformedResponseError carrying whatever usage it had."""
        usage = self._usage(response)
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise self._malformed("sent no content", usage)
        text = "".join(
            str(getattr(b, "text", "") or "") for b in blocks if getattr(b, "type", "") == "text"
        )
        stop_reason = getattr(response, "stop_reason", None)
        reason = STOP_REASONS.get(str(stop_reason), "other")
        uses = [b for b in blocks if getattr(b, "type", "") == "tool_use"]
        answer = next(
            (b for b in uses if answer_tool and getattr(b, "name", "") == ANSWER_TOOL), None
        )
        calls = [
            received(getattr(b, "id", None), getattr(b, "name", None), getattr(b, "input", None))
            for b in uses
            if b is not answer
        ]
        if calls and answer is None and usage is not None:
            # A tool-only answer is an answer, with or without text beside the calls.
            return Completion(
                text=text,
                finish_reason="length" if reason == "length" else "tool_calls",
                usage=usage,
                model=str(getattr(response, "model", "") or ""),
                tool_calls=calls,
            )
        if answer is not None:
            # The forced answer tool's input is the structured answer: a finished one.
            text = json.dumps(getattr(answer, "input", None), ensure_ascii=False)
            reason = "stop" if reason == "tool_calls" else reason
        if usage is not None and stop_reason == "refusal":
            return Completion(
                text="",
                refusal=text.strip() or "anthropic declined to answer (stop_reason 'refusal')",
                finish_reason="content_filter",
                usage=usage,
                model=str(getattr(response, "model", "") or ""),
            )
        if not text.strip() and reason == "stop":
            raise self._malformed(f"sent empty content (stop_reason={stop_reason})", usage)
        if usage is None:
            raise self._malformed("sent no usable usage (token counts)", None)
        return Completion(
            text=text,
            finish_reason=reason,
            usage=usage,
            model=str(getattr(response, "model", "") or ""),
        )

    def _usage(self, response: Any) -> Usage | None:
        usage = getattr(response, "usage", None)
        counted = usage_of(
            getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
        )
        cache_read = getattr(usage, "cache_read_input_tokens", None) or 0
        cache_write = getattr(usage, "cache_creation_input_tokens", None) or 0
        if counted is None or not all(isinstance(n, int) for n in (cache_read, cache_write)):
            return None
        # Anthropic counts cache reads and writes apart from `input_tokens`; we report
        # all input together, with the cache reads and writes as subsets of it.
        return Usage(
            input_tokens=counted.input_tokens + cache_read + cache_write,
            output_tokens=counted.output_tokens,
            cached_input_tokens=cache_read,
            cache_write_input_tokens=cache_write,
        )

    def _malformed(self, problem: str, usage: Usage | None) -> MalformedResponseError:
        return MalformedResponseError(
            f"anthropic {problem}", provider=self.name, answered=True, usage=usage
        )
