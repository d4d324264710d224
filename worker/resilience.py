"""Calling the provider chain: each candidate in order until one answers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.errors import AllProvidersFailedError, ProviderError
from worker.models import Completion
from worker.providers import Provider, ProviderRequest


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One provider call, as the logs record it."""

    provider: str
    model: str
    number: int
    latency_ms: float
    completion: Completion | None = None
    error: ProviderError | None = None


@dataclass(kw_only=True)
class Outcome:
    """The completion that served the job and every attempt made for it."""

    provider: str
    model: str
    completion: Completion
    attempts: list[Attempt] = field(default_factory=list)


Target = tuple[Provider, ProviderRequest]
OnAttempt = Callable[[Attempt], None]


def call_chain(targets: list[Target], *, on_attempt: OnAttempt) -> Outcome:
    """Try each (provider, request) in order; raise AllProvidersFailedError if none answers."""
    attempts: list[Attempt] = []
    last_errors: list[str] = []
    for provider, request in targets:
        started = time.perf_counter()
        try:
            completion = provider.complete(request)
        except ProviderError as exc:
            attempt = Attempt(
                provider=provider.name,
                model=request.model,
                number=len(attempts) + 1,
                latency_ms=(time.perf_counter() - started) * 1000,
                error=exc,
            )
            attempts.append(attempt)
            on_attempt(attempt)
            last_errors.append(f"{provider.name} ({request.model}): {exc}")
            continue
        attempt = Attempt(
            provider=provider.name,
            model=request.model,
            number=len(attempts) + 1,
            latency_ms=(time.perf_counter() - started) * 1000,
            completion=completion,
        )
        attempts.append(attempt)
        on_attempt(attempt)
        return Outcome(
            provider=provider.name, model=request.model, completion=completion, attempts=attempts
        )
    raise AllProvidersFailedError(
        "Every provider failed: " + "; ".join(last_errors or ["no provider configured"])
    )
