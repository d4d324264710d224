"""Anthropic Messages through the official anthropic SDK."""

from __future__ import annotations

import json
import threading
from typing import Any

import anthropic

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


def to_anthropic(messages: list[Message]) -> tuple[str | None, list[dict[str, str]]]:
    """Split out system messages (Anthropic takes them apart) and merge same-role runs."""
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "system":
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    return system, turns


class AnthropicProvider:
    """Messages API through the official anthropic SDK."""

    name = "anthropic"

    def __init__(self, *, api_key: str, base_url: str | None, timeout: float) -> None:
        self._client = client(api_key=api_key, base_url=base_url, timeout=timeout)

    def complete(self, request: ProviderRequest) -> Completion:
        """Send the request; normalize the answer or raise a typed ProviderError."""
        system, turns = to_anthropic(request.messages)
        options: dict[str, Any] = {"system": system} if system else {}
        try:
            response = self._client.messages.create(
                model=request.model,
                messages=turns,  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                # anthropic 2.x dropped `temperature` from the signature; the API takes it.
                extra_body={"temperature": request.temperature},
                timeout=request.timeout,
                **options,
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
        return self._normalize(response)

    def _normalize(self, response: Any) -> Completion:
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
        # all input together, with the cache reads as the cached subset.
        return Usage(
            input_tokens=counted.input_tokens + cache_read + cache_write,
            output_tokens=counted.output_tokens,
            cached_input_tokens=cache_read,
        )

    def _malformed(self, problem: str, usage: Usage | None) -> MalformedResponseError:
        return MalformedResponseError(
            f"anthropic {problem}", provider=self.name, answered=True, usage=usage
        )
