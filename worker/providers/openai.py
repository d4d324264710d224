"""OpenAI Chat Completions, and any server that speaks it (Gemini, vLLM, Ollama)."""

from __future__ import annotations

import json
import threading
from typing import Any

import openai

from worker.content import ContentPart, ImagePart, UrlSource
from worker.errors import MalformedResponseError, ProviderConnectionError, ProviderTimeoutError
from worker.models import Completion, FinishReason, JsonSchemaFormat, Message, Usage
from worker.providers.base import (
    ProviderRequest,
    error_for_status,
    error_message,
    request_sent,
    short,
    usage_of,
)
from worker.tools import openai_tool_choice, openai_tools, received

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


# JSON mode needs the word "JSON" in the messages (the API answers 400 without it).
JSON_MODE_INSTRUCTION = "Answer with a JSON object."


def openai_part(part: ContentPart) -> dict[str, Any]:
    """A content part in Chat Completions' shape (Anthropic's image source translated)."""
    if isinstance(part, ImagePart):
        source = part.source
        url = (
            source.url
            if isinstance(source, UrlSource)
            else f"data:{source.media_type};base64,{source.data}"
        )
        return {"type": "image_url", "image_url": {"url": url}}
    # Documents never reach here: the guard keeps them for providers that take them.
    return part.model_dump(exclude_none=True)


def openai_message(message: Message) -> dict[str, Any]:
    """A message in Chat Completions' shape: a plain one exactly as before, {role, content}."""
    shaped: dict[str, Any] = {"role": message.role}
    if isinstance(message.content, list):
        shaped["content"] = [openai_part(p) for p in message.content]
    else:
        shaped["content"] = message.content
    if message.tool_calls:
        shaped["tool_calls"] = [call.openai() for call in message.tool_calls]
    if message.tool_call_id is not None:
        shaped["tool_call_id"] = message.tool_call_id
    return shaped


def request_body(request: ProviderRequest, *, provider: str) -> dict[str, Any]:
    """The Chat Completions arguments for `request`, in OpenAI's (or the compatible) shape."""
    options = request.options
    messages = [openai_message(m) for m in request.messages]
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.reasoning:
        # Reasoning models refuse max_tokens and any but the default temperature; the
        # bound covers their reasoning tokens too.
        body["max_completion_tokens"] = request.max_tokens
    else:
        body["max_tokens"] = request.max_tokens
        body["temperature"] = request.temperature
    optional = {
        "stop": list(options.stop) if options.stop else None,
        "seed": options.seed,
        "top_p": options.top_p,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "reasoning_effort": options.reasoning_effort,
        # `user` is deprecated for the end user's id; Gemini and vLLM have neither.
        "safety_identifier": options.user if provider == "openai" else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if options.tools:
        body["tools"] = openai_tools(options.tools)
        if options.tool_choice is not None:
            body["tool_choice"] = openai_tool_choice(options.tool_choice)
        if options.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = options.parallel_tool_calls
    response_format = options.response_format
    if isinstance(response_format, JsonSchemaFormat):
        spec = response_format.json_schema
        schema: dict[str, Any] = {"name": spec.name, "schema": spec.schema_}
        # OpenAI's own: strict adherence and a description; the compatible servers
        # (Gemini, vLLM) take the name and schema and constrain decoding by them.
        if provider == "openai":
            if spec.strict is not None:
                schema["strict"] = spec.strict
            if spec.description is not None:
                schema["description"] = spec.description
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif response_format is not None:
        body["response_format"] = {"type": "json_object"}
        if not any("json" in m.text.lower() for m in request.messages):
            messages.insert(0, {"role": "system", "content": JSON_MODE_INSTRUCTION})
    return body


class OpenAIProvider:
    """Chat Completions through the official openai SDK."""

    def __init__(self, *, name: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.name = name
        self._client = client(api_key=api_key, base_url=base_url, timeout=timeout)

    def complete(self, request: ProviderRequest) -> Completion:
        """Send the request; normalize the answer or raise a typed ProviderError."""
        try:
            response = self._client.chat.completions.create(
                **request_body(request, provider=self.name), timeout=request.timeout
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
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        reason = FINISH_REASONS.get(str(getattr(choice, "finish_reason", None)), "other")
        refusal = getattr(message, "refusal", None)
        if isinstance(refusal, str) and refusal.strip() and usage is not None:
            # A refusal is the model's answer, not text to return or parse.
            return Completion(
                text="",
                refusal=refusal,
                finish_reason="content_filter",
                usage=usage,
                model=str(getattr(response, "model", "") or ""),
            )
        calls = [
            received(
                getattr(call, "id", None),
                getattr(getattr(call, "function", None), "name", None),
                getattr(getattr(call, "function", None), "arguments", None),
            )
            for call in getattr(message, "tool_calls", None) or []
        ]
        if calls and usage is not None:
            # A tool-only answer is an answer; a forced call finishes with "stop".
            return Completion(
                text=text if isinstance(text, str) else "",
                finish_reason="length" if reason == "length" else "tool_calls",
                usage=usage,
                model=str(getattr(response, "model", "") or ""),
                tool_calls=calls,
            )
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
        output_details = getattr(usage, "completion_tokens_details", None)
        return usage_of(
            getattr(usage, "prompt_tokens", None),
            getattr(usage, "completion_tokens", None),
            getattr(details, "cached_tokens", None),
            # Part of completion_tokens, and billed with them at the output rate.
            reasoning=getattr(output_details, "reasoning_tokens", None),
        )

    def _malformed(self, problem: str, usage: Usage | None) -> MalformedResponseError:
        return MalformedResponseError(
            f"{self.name} {problem}", provider=self.name, answered=True, usage=usage
        )
