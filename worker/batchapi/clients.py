"""The providers' Batch APIs through their official SDKs: create, retrieve, cancel, results.

OpenAI: the requests go up as a JSONL file (`files.create`, purpose "batch"), then
`batches.create` on /v1/chat/completions with a 24 h window; results come back as an
output file and an error file. Anthropic: `messages.batches.create` takes the requests
inline; `messages.batches.results` streams one result per request. Both are matched
back by `custom_id`. The SDKs run with max_retries=0 and explicit timeouts: a poll that
fails is simply tried again at the next poll.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

import anthropic
import openai
from openai.types.chat import ChatCompletion

from worker.errors import (
    BatchRequestFailedError,
    LLMQError,
    MalformedResponseError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
)
from worker.models import Completion
from worker.providers import anthropic as anthropic_provider
from worker.providers import openai as openai_provider
from worker.providers.base import ProviderRequest, error_for_status, error_message, short

# The providers' own limits per batch (requests, bytes of the request file or body).
PROVIDER_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (50_000, 200 * 1024 * 1024),
    "anthropic": (100_000, 256 * 1024 * 1024),
}
CHAT_ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
# Where the local batch's id goes on an OpenAI batch, to find it again after a crash.
METADATA_KEY = "llmq_batch"

State = Literal["in_progress", "ended"]


@dataclass(frozen=True, kw_only=True)
class Status:
    """A provider batch as a poll sees it."""

    state: State
    provider_state: str
    total: int
    done: int
    failed: int
    # OpenAI's whole-batch errors (a batch that failed validation).
    errors: str | None = None


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One request's result: an answer, a provider error, or not run (expired, cancelled)."""

    custom_id: str
    completion: Completion | None = None
    error: LLMQError | None = None
    not_run: str | None = None


@dataclass(frozen=True, kw_only=True)
class Found:
    """A batch on the provider's side, as its list shows it."""

    id: str
    created_at: float
    total: int
    metadata: dict[str, str] = field(default_factory=dict)


class BatchClient(Protocol):
    """A provider's Batch API."""

    provider: str
    guard: Guard

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        """One request's provider-ready body."""
        ...

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """The request as it is sent within the batch, to size batches by."""
        ...

    def create(
        self,
        requests: list[tuple[str, dict[str, Any]]],
        *,
        local_id: str,
        sending: Callable[[], None] = lambda: None,
    ) -> str:
        """Create the batch (`sending` runs just before the request that makes it)."""
        ...

    def retrieve(self, batch_id: str) -> Status:
        """The batch's state and counts."""
        ...

    def cancel(self, batch_id: str) -> Status:
        """Ask the provider to cancel the batch."""
        ...

    def results(self, batch_id: str) -> Iterator[Outcome]:
        """Every request's outcome, once the batch has ended."""
        ...

    def recent(self) -> list[Found]:
        """The newest batches on the account, to find one a crash left unrecorded."""
        ...


def _wrap(provider: str, exc: Exception) -> ProviderError:
    """An SDK error as llmq's typed provider error."""
    if isinstance(exc, (openai.APITimeoutError, anthropic.APITimeoutError)):
        return ProviderTimeoutError(f"{provider} batch API timed out", provider=provider)
    if isinstance(exc, (openai.APIConnectionError, anthropic.APIConnectionError)):
        return ProviderConnectionError(
            f"{provider} batch API unreachable: {short(exc)}", provider=provider
        )
    if isinstance(exc, (openai.APIStatusError, anthropic.APIStatusError)):
        return error_for_status(
            exc.status_code,
            short(error_message(exc.body) or exc.message),
            provider=provider,
            headers=exc.response.headers,
        )
    return MalformedResponseError(
        f"{provider} batch API sent an unreadable response: {type(exc).__name__}",
        provider=provider,
    )


_SDK_ERRORS = (openai.OpenAIError, anthropic.AnthropicError, ValueError)
T = TypeVar("T")


class Guard(Protocol):
    """Runs one call of `requests` HTTP requests behind the provider's circuit and limits."""

    def __call__(self, provider: str, what: str, call: Callable[[], T], requests: int = 1) -> T:
        """The call's result; raises what it raises, or why it may not run now."""
        ...


def unguarded(provider: str, what: str, call: Callable[[], T], requests: int = 1) -> T:
    """No circuit, no limits: the call as it is."""
    return call()


class _Calls:
    """SDK calls made through the guard, SDK errors turned into llmq's typed ones."""

    provider: str
    guard: Guard

    def _call(self, what: str, call: Callable[[], T], requests: int = 1) -> T:
        def typed() -> T:
            try:
                return call()
            except _SDK_ERRORS as exc:
                raise _wrap(self.provider, exc) from None

        return self.guard(self.provider, what, typed, requests)


class OpenAIBatches(_Calls):
    """OpenAI's Batch API on /v1/chat/completions."""

    provider = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        timeout: float,
        guard: Guard = unguarded,
    ) -> None:
        self.guard = guard
        self._client = openai_provider.client(api_key=api_key, base_url=base_url, timeout=timeout)
        # Its normalizer reads a batch answer exactly as a real-time one.
        self._reader = openai_provider.OpenAIProvider(
            name="openai", api_key=api_key, base_url=base_url, timeout=timeout
        )
        self.timeout = timeout

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        """Chat Completions arguments, as the real-time provider sends them."""
        return openai_provider.request_body(request, provider="openai")

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """One line of the JSONL input file."""
        item = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def create(
        self,
        requests: list[tuple[str, dict[str, Any]]],
        *,
        local_id: str,
        sending: Callable[[], None] = lambda: None,
    ) -> str:
        """Upload the JSONL file, then create the batch tagged with `local_id`."""
        data = b"".join(self.line(custom_id, body) for custom_id, body in requests)
        uploaded = self._call(
            "upload",
            lambda: self._client.files.create(
                file=(f"{local_id}.jsonl", data, "application/jsonl"),
                purpose="batch",
                timeout=self.timeout,
            ),
        )

        def make() -> Any:
            sending()
            return self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint=CHAT_ENDPOINT,
                completion_window="24h",
                metadata={METADATA_KEY: local_id},
                timeout=self.timeout,
            )

        batch = self._call("create", make)
        return str(batch.id)

    def _status(self, batch: Any) -> Status:
        counts = batch.request_counts
        errors = None
        if batch.errors is not None and batch.errors.data:
            errors = "; ".join(short(e.message or e.code or "") for e in batch.errors.data)
        ended = batch.status in ("completed", "expired", "failed", "cancelled")
        return Status(
            state="ended" if ended else "in_progress",
            provider_state=str(batch.status),
            total=int(counts.total) if counts else 0,
            done=int(counts.completed) if counts else 0,
            failed=int(counts.failed) if counts else 0,
            errors=errors,
        )

    def retrieve(self, batch_id: str) -> Status:
        """The batch's status and request counts."""
        return self._status(
            self._call(
                "retrieve", lambda: self._client.batches.retrieve(batch_id, timeout=self.timeout)
            )
        )

    def cancel(self, batch_id: str) -> Status:
        """Cancel: OpenAI moves it to cancelling, then cancelled with partial results."""
        return self._status(
            self._call(
                "cancel", lambda: self._client.batches.cancel(batch_id, timeout=self.timeout)
            )
        )

    def _lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        if not file_id:
            return
        text = self._call(
            "download", lambda: self._client.files.content(file_id, timeout=self.timeout).text
        )
        for raw in text.splitlines():
            if raw.strip():
                yield json.loads(raw)

    def results(self, batch_id: str) -> Iterator[Outcome]:
        """The output file's answers, then the error file's failures."""
        batch = self._call(
            "retrieve", lambda: self._client.batches.retrieve(batch_id, timeout=self.timeout)
        )
        for item in self._lines(batch.output_file_id):
            yield self._outcome(item)
        for item in self._lines(batch.error_file_id):
            yield self._outcome(item)

    def _outcome(self, item: dict[str, Any]) -> Outcome:
        custom_id = str(item.get("custom_id"))
        response = item.get("response") or {}
        status = response.get("status_code")
        if status == 200:
            try:
                completion = self._reader._normalize(
                    ChatCompletion.model_validate(response.get("body"))
                )
            except (ProviderError, ValueError) as exc:
                failure = exc if isinstance(exc, ProviderError) else _wrap(self.provider, exc)
                return Outcome(custom_id=custom_id, error=failure)
            return Outcome(custom_id=custom_id, completion=completion)
        if isinstance(status, int):
            message = short(error_message(response.get("body")) or f"HTTP {status}")
            return Outcome(
                custom_id=custom_id,
                error=BatchRequestFailedError(
                    f"openai batch request failed with HTTP {status}: {message}"
                ),
            )
        error = item.get("error") or {}
        code = str(error.get("code") or "")
        if code in ("batch_expired", "batch_cancelled", "batch_canceled"):
            return Outcome(custom_id=custom_id, not_run=code.removeprefix("batch_"))
        return Outcome(
            custom_id=custom_id,
            error=BatchRequestFailedError(
                f"openai batch request failed: {short(error.get('message') or code)}"
            ),
        )

    def recent(self) -> list[Found]:
        """The account's 100 newest batches."""
        page = self._call(
            "list", lambda: self._client.batches.list(limit=100, timeout=self.timeout)
        )
        return [
            Found(
                id=str(b.id),
                created_at=float(b.created_at),
                total=int(b.request_counts.total) if b.request_counts else 0,
                metadata={str(k): str(v) for k, v in (b.metadata or {}).items()},
            )
            for b in page.data
        ]


class AnthropicBatches(_Calls):
    """Anthropic's Message Batches."""

    provider = "anthropic"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        timeout: float,
        guard: Guard = unguarded,
    ) -> None:
        self.guard = guard
        self._client = anthropic_provider.client(
            api_key=api_key, base_url=base_url, timeout=timeout
        )
        self._reader = anthropic_provider.AnthropicProvider(
            api_key=api_key, base_url=base_url, timeout=timeout
        )
        self.timeout = timeout

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        """Messages API params, as the real-time provider sends them (extra_body merged in)."""
        body = anthropic_provider.request_body(request)
        # The SDK's extra_body (temperature, top_p) is part of the params in a batch.
        extra = body.pop("extra_body", {})
        return {**body, **extra}

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """One request of the batch body."""
        item = {"custom_id": custom_id, "params": body}
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + ",").encode()

    def create(
        self,
        requests: list[tuple[str, dict[str, Any]]],
        *,
        local_id: str,
        sending: Callable[[], None] = lambda: None,
    ) -> str:
        """Create the batch with every request inline."""

        def make() -> Any:
            sending()
            return self._client.messages.batches.create(
                requests=[
                    {"custom_id": custom_id, "params": body}  # type: ignore[typeddict-item]
                    for custom_id, body in requests
                ],
                timeout=self.timeout,
            )

        batch = self._call("create", make)
        return str(batch.id)

    def _status(self, batch: Any) -> Status:
        counts = batch.request_counts
        total = sum(
            int(getattr(counts, name))
            for name in ("processing", "succeeded", "errored", "canceled", "expired")
        )
        return Status(
            state="ended" if batch.processing_status == "ended" else "in_progress",
            provider_state=str(batch.processing_status),
            total=total,
            done=int(counts.succeeded),
            failed=int(counts.errored) + int(counts.canceled) + int(counts.expired),
        )

    def retrieve(self, batch_id: str) -> Status:
        """The batch's processing status and request counts."""
        return self._status(
            self._call(
                "retrieve",
                lambda: self._client.messages.batches.retrieve(batch_id, timeout=self.timeout),
            )
        )

    def cancel(self, batch_id: str) -> Status:
        """Cancel: the batch goes to canceling, then ends with the rest canceled."""
        return self._status(
            self._call(
                "cancel",
                lambda: self._client.messages.batches.cancel(batch_id, timeout=self.timeout),
            )
        )

    def results(self, batch_id: str) -> Iterator[Outcome]:
        """The streamed results, one per request."""
        # The SDK retrieves the batch for its results_url, then streams them: 2 requests.
        items = self._call(
            "results",
            lambda: list(self._client.messages.batches.results(batch_id, timeout=self.timeout)),
            requests=2,
        )
        for item in items:
            custom_id, result = str(item.custom_id), item.result
            if result.type == "succeeded":
                try:
                    completion = self._reader._normalize(result.message)
                except ProviderError as exc:
                    yield Outcome(custom_id=custom_id, error=exc)
                    continue
                yield Outcome(custom_id=custom_id, completion=completion)
            elif result.type == "errored":
                inner = getattr(result.error, "error", None)
                message = short(getattr(inner, "message", None) or getattr(inner, "type", "error"))
                yield Outcome(
                    custom_id=custom_id,
                    error=BatchRequestFailedError(f"anthropic batch request failed: {message}"),
                )
            else:
                yield Outcome(custom_id=custom_id, not_run=str(result.type))

    def recent(self) -> list[Found]:
        """The account's 100 newest batches."""
        page = self._call(
            "list", lambda: self._client.messages.batches.list(limit=100, timeout=self.timeout)
        )
        found = []
        for b in page.data:
            status = self._status(b)
            created = b.created_at
            stamp = created.timestamp() if isinstance(created, datetime) else float(created)
            found.append(Found(id=str(b.id), created_at=stamp, total=status.total))
        return found


def split(
    requests: list[tuple[str, dict[str, Any]]],
    client: BatchClient,
    *,
    max_requests: int,
    max_bytes: int,
) -> list[list[tuple[str, dict[str, Any]]]]:
    """Requests in order, cut into batches within the request-count and byte limits."""
    groups: list[list[tuple[str, dict[str, Any]]]] = []
    current: list[tuple[str, dict[str, Any]]] = []
    size = 0
    for custom_id, body in requests:
        length = len(client.line(custom_id, body))
        if length > max_bytes:
            raise LLMQError(
                f"Request {custom_id} is {length} bytes, more than a whole batch may hold "
                f"({max_bytes}). Fix: lower LLM_BATCH_CHUNK_TOKENS."
            )
        if current and (len(current) >= max_requests or size + length > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append((custom_id, body))
        size += length
    if current:
        groups.append(current)
    return groups
