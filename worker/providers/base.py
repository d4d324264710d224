"""The interface every provider implements, and the helpers they share."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

from worker.errors import (
    AuthenticationError,
    ProviderError,
    ProviderRequestError,
    ProviderUnavailableError,
    RateLimitedByProviderError,
)
from worker.models import Completion, Message, Usage
from worker.options import RequestOptions


@dataclass(frozen=True, kw_only=True)
class ProviderRequest:
    """One call to a provider: already validated, already priced."""

    messages: list[Message]
    model: str
    # Everything the provider may write, thinking and reasoning tokens included.
    max_tokens: int
    temperature: float
    timeout: float
    options: RequestOptions = field(default_factory=RequestOptions)
    # An OpenAI reasoning model: max_completion_tokens, and no temperature sent.
    reasoning: bool = False
    # The model answers in a JSON schema natively (Anthropic output_config.format).
    native_schema: bool = False


class Provider(Protocol):
    """Something that turns a request into a normalized completion."""

    name: str

    def complete(self, request: ProviderRequest) -> Completion:
        """Make the call; raise a ProviderError subclass on failure."""
        ...


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, then `Retry-After`."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def error_for_status(
    status: int, message: str, *, provider: str, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """The typed error for an HTTP status from a provider."""
    retry_after = retry_after_seconds(headers)
    text = f"{provider} answered HTTP {status}: {message}"
    if status == 429:
        return RateLimitedByProviderError(
            text, provider=provider, status=status, retry_after=retry_after
        )
    if status in (408, 409) or status >= 500:
        return ProviderUnavailableError(
            text, provider=provider, status=status, retry_after=retry_after
        )
    if status in (401, 403):
        return AuthenticationError(text, provider=provider, status=status)
    return ProviderRequestError(text, provider=provider, status=status)


def request_sent(exc: BaseException) -> bool:
    """False when the HTTP client never connected, so the provider cannot have billed."""
    return type(exc.__cause__).__name__ not in ("ConnectError", "ConnectTimeout")


def usage_of(
    input_tokens: object,
    output_tokens: object,
    cached: object = 0,
    *,
    cache_written: object = 0,
    reasoning: object = 0,
) -> Usage | None:
    """A Usage from the numbers a provider reported, or None if any is missing or not a count."""
    reported = (input_tokens, output_tokens, cached or 0, cache_written or 0, reasoning or 0)
    counts = [v for v in reported if _is_count(v)]
    if len(counts) != len(reported):
        return None
    return Usage(
        input_tokens=counts[0],
        output_tokens=counts[1],
        cached_input_tokens=counts[2],
        cache_write_input_tokens=counts[3],
        reasoning_tokens=counts[4],
    )


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def short(text: object, limit: int = 300) -> str:
    """A one-line excerpt of an error body, for messages and logs."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_message(body: object) -> str | None:
    """The human message inside a provider's JSON error body."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)
        return str(inner)
    return None
