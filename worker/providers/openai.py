"""OpenAI Chat Completions, and any server that speaks it (Gemini, vLLM, Ollama)."""

from __future__ import annotations

import json
import threading
from typing import Any

import openai

from worker.errors import MalformedResponseError, ProviderConnectionError, ProviderTimeoutError
from worker.models import Completion, FinishReason, Usage
from worker.providers.base import (
    ProviderRequest,
    error_for_status,
    error_message,
    request_sent,
    short,
    usage_of,
)

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}

_clients: dict[tuple[str, str | None, float], openai.OpenAI] = {}
_clients_lock = threading.Lock()


def client(*, api_key: str, base_url: str | None, timeout: float) -> openai.OpenAI:
    """One SDK client per process and configuration: it holds the connection pool."""
    key = (api_key, base_url, timeout)
    with _clients_lock:
        if key not in _clients:
            # Retries happen once, in our pipeline; the SDK's own would stack on them.
            _clients[key] = openai.OpenAI(
                api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
            )
        return _clients[key]


class OpenAIProvider:
    """Chat Completions through the official openai SDK."""

    def __init__(self, *, name: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.name = name
        self._client = client(api_key=api_key, base_url=base_url, timeout=timeout)

    def complete(self, request: ProviderRequest) -> Completion:
        """Send the request; normalize the answer or raise a typed ProviderError."""
        try:
            response = self._client.chat.completions.create(
                model=request.model,
                messages=[m.model_dump() for m in request.messages],  # type: ignore[misc]
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                timeout=request.timeout,
            )
        except openai.APITimeoutError as exc:
            raise ProviderTimeoutError(
                f"{self.name} timed out after {request.timeout}s",
                provider=self.name,
                sent=request_sent(exc),
            ) from None
        except openai.APIConnectionError as exc:
            raise ProviderConnectionError(
                f"{self.name} unreachable: {short(exc)}",
                provider=self.name,
                sent=request_sent(exc),
            ) from None
        except openai.APIStatusError as exc:
            raise error_for_status(
                exc.status_code,
                short(error_message(exc.body) or exc.message),
                provider=self.name,
                headers=exc.response.headers,
            ) from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            # A 200 whose body cannot be read: it may still have been billed.
            raise MalformedResponseError(
                f"{self.name} sent a response that is not valid JSON: {type(exc).__name__}",
                provider=self.name,
                answered=True,
            ) from None
        return self._normalize(response)

    def _normalize(self, response: Any) -> Completion:
        """The answer as a Completion, or MalformedResponseError carrying whatever usage it had."""
        usage = self._usage(response)
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise self._malformed("sent no choices", usage)
        choice = choices[0]
        text = getattr(getattr(choice, "message", None), "content", None)
        reason = FINISH_REASONS.get(str(getattr(choice, "finish_reason", None)), "other")
        if not isinstance(text, str) or (not text.strip() and reason == "stop"):
            raise self._malformed(
                f"sent empty content (finish_reason={getattr(choice, 'finish_reason', None)})",
                usage,
            )
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
        details = getattr(usage, "prompt_tokens_details", None)
        return usage_of(
            getattr(usage, "prompt_tokens", None),
            getattr(usage, "completion_tokens", None),
            getattr(details, "cached_tokens", None),
        )

    def _malformed(self, problem: str, usage: Usage | None) -> MalformedResponseError:
        return MalformedResponseError(
            f"{self.name} {problem}", provider=self.name, answered=True, usage=usage
        )
