"""Calling the provider chain: retries per provider (tenacity), then the next provider."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from worker.errors import (
    AllProvidersFailedError,
    AuthenticationError,
    CircuitOpenError,
    DailyBudgetExceededError,
    DeadlineExceededError,
    MalformedResponseError,
    ProviderError,
    RateLimitedError,
)
from worker.guard import Estimate
from worker.logs import logger
from worker.metering import AdmissionRejected, Charge, Meter, Ticket
from worker.models import Completion, Usage
from worker.providers import Provider, ProviderRequest
from worker.secrets import scrub
from worker.settings import Settings


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One provider call, as the logs record it."""

    provider: str
    model: str
    number: int
    latency_ms: float
    completion: Completion | None = None
    error: ProviderError | None = None
    # Seconds slept before the next attempt on the same provider; None when none follows.
    wait_seconds: float | None = None
    probe: bool = False
    # What the attempt was charged (None: nothing was billed).
    charge: Charge | None = None


@dataclass(kw_only=True)
class Outcome:
    """The completion that served the job and every attempt made for it."""

    provider: str
    model: str
    completion: Completion
    attempts: list[Attempt] = field(default_factory=list)
    # Answers received but not returned (a truncated one retried larger): still paid for.
    discarded: list[Completion] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        """Tokens of every answer this job received, the returned one and the discarded ones."""
        answers = [*self.discarded, self.completion]
        return Usage(
            input_tokens=sum(c.usage.input_tokens for c in answers),
            output_tokens=sum(c.usage.output_tokens for c in answers),
            cached_input_tokens=sum(c.usage.cached_input_tokens for c in answers),
            cache_write_input_tokens=sum(c.usage.cache_write_input_tokens for c in answers),
            reasoning_tokens=sum(c.usage.reasoning_tokens for c in answers),
        )


@dataclass(frozen=True, kw_only=True)
class Target:
    """One provider to try, the request it gets, and the estimate each attempt is admitted by."""

    provider: Provider
    request: ProviderRequest
    estimate: Estimate | None = None


OnAttempt = Callable[[Attempt], None]
Rejection = RateLimitedError | DailyBudgetExceededError


class Admission(Enum):
    """What a circuit breaker says about calling a provider now."""

    CLOSED = "closed"
    PROBE = "probe"
    OPEN = "open"


class Gate(Protocol):
    """A circuit breaker as the chain sees it."""

    def admit(self, provider: str) -> Admission:
        """May `provider` be called now, and is this call the half-open probe?"""
        ...

    def is_open(self, provider: str) -> bool:
        """Whether `provider`'s circuit is open now (never takes the probe)."""
        ...

    def record(self, provider: str, *, error: ProviderError | None, probe: bool) -> None:
        """Count one call's result against the provider's circuit."""
        ...

    def abandon_probe(self, provider: str) -> None:
        """Give back a half-open probe that was never sent."""
        ...


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try each provider, and how long a whole job may take."""

    attempts: int = 3
    initial_wait: float = 0.5
    max_wait: float = 20.0
    deadline: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            attempts=settings.retry_attempts,
            initial_wait=settings.retry_initial_wait,
            max_wait=settings.retry_max_wait,
            deadline=settings.job_deadline_seconds,
        )


def is_retryable(exc: BaseException) -> bool:
    """Only transient provider failures: 429, 408, 409, 5xx, 529, timeouts, connections."""
    return isinstance(exc, ProviderError) and exc.transient


class wait_retry_after(wait_base):
    """The wait the server asked for (Retry-After, retry-after-ms), else `fallback`'s."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        """Seconds to wait before the next attempt."""
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        hint = getattr(error, "retry_after", None)
        if isinstance(hint, (int, float)):
            return float(hint)
        return self.fallback(retry_state)


class stop_when_wait_too_long(stop_base):
    """Give up on a provider rather than sleep past `max_wait` or the job's deadline."""

    def __init__(self, *, max_wait: float, deadline: float) -> None:
        self.max_wait = max_wait
        self.deadline = deadline

        self.hit_deadline = False

    def __call__(self, retry_state: RetryCallState) -> bool:
        """True when the upcoming sleep is over the cap or ends after the deadline."""
        upcoming = retry_state.upcoming_sleep
        if time.monotonic() + upcoming >= self.deadline:
            self.hit_deadline = True
            return True
        return upcoming > self.max_wait


def call_chain(
    targets: list[Target],
    *,
    on_attempt: OnAttempt,
    policy: RetryPolicy | None = None,
    gate: Gate | None = None,
    deadline: float | None = None,
    meter: Meter | None = None,
) -> Outcome:
    """Try each target in order, retrying the transient failures of each.

    `deadline` is a `time.monotonic()` instant (default: now + policy.deadline). With a
    `meter`, every attempt is admitted by the budget and the limits of its provider
    first; a provider they refuse is skipped like one whose circuit is open. Raises the
    refusal (RateLimitedError, DailyBudgetExceededError) when one kept every provider
    from answering, else AllProvidersFailedError (DeadlineExceededError when time ran
    out) naming each provider's last error.
    """
    policy = policy or RetryPolicy()
    deadline = time.monotonic() + policy.deadline if deadline is None else deadline
    attempts: list[Attempt] = []
    last_errors: list[str] = []
    rejections: list[Rejection] = []
    out_of_time = False
    for target in targets:
        provider, request = target.provider, target.request
        if time.monotonic() >= deadline:
            out_of_time = True
            break
        caller = _ProviderCaller(
            target, policy=policy, gate=gate, deadline=deadline, log=on_attempt, meter=meter
        )
        try:
            completion = caller.call(first_number=len(attempts) + 1)
        except AdmissionRejected as exc:
            if exc.job_wide:
                raise exc.error from None
            rejections.append(exc.error)
            last_errors.append(f"{provider.name} ({request.model}): {exc.error}")
            continue
        except ProviderError as exc:
            if isinstance(exc, AuthenticationError):
                # Loud on purpose: a revoked or mistyped key fails every job on this provider.
                logger.error(
                    "%s rejected its API key (HTTP %s): not retried, falling back. "
                    "Fix: check the key for %s.",
                    provider.name,
                    exc.status,
                    provider.name,
                )
            last_errors.append(f"{provider.name} ({request.model}): {exc}")
            continue
        finally:
            attempts.extend(caller.attempts)
            out_of_time = out_of_time or caller.stop.hit_deadline
        return Outcome(
            provider=provider.name, model=request.model, completion=completion, attempts=attempts
        )
    if rejections:
        # Waiting frees a rate limit; prefer it, soonest first, over an exhausted budget.
        limited = [r for r in rejections if isinstance(r, RateLimitedError)]
        if limited:
            raise min(limited, key=lambda r: r.retry_after or 0.0)
        raise rejections[0]
    if out_of_time:
        raise DeadlineExceededError(
            f"Job deadline of {policy.deadline:g}s (LLM_JOB_DEADLINE_SECONDS) reached "
            "before any provider answered: "
            + "; ".join(last_errors or ["no provider was tried"])
            + ". Fix: raise LLM_JOB_DEADLINE_SECONDS (below LLM_VISIBILITY_TIMEOUT), "
            "or lower LLM_TIMEOUT_SECONDS or LLM_RETRY_ATTEMPTS."
        )
    raise AllProvidersFailedError(
        "Every provider failed: " + "; ".join(last_errors or ["no provider configured"])
    )


class _ProviderCaller:
    """The attempts on one provider: tenacity decides whether and when to try again."""

    def __init__(
        self,
        target: Target,
        *,
        policy: RetryPolicy,
        gate: Gate | None,
        deadline: float,
        log: OnAttempt,
        meter: Meter | None,
    ) -> None:
        self.provider = target.provider
        self.request = target.request
        self.estimate = target.estimate
        self.meter = meter
        self.policy = policy
        self.gate = gate
        self.deadline = deadline
        self.log = log
        self.attempts: list[Attempt] = []
        self.probe = False
        self._failed: Attempt | None = None  # logged once its wait is known
        self._first = 1
        self.stop = stop_when_wait_too_long(max_wait=policy.max_wait, deadline=deadline)

    def call(self, *, first_number: int) -> Completion:
        """Attempt the provider until it answers, retries are spent, or its circuit opens."""
        self._first = first_number
        admission = self.gate.admit(self.provider.name) if self.gate else Admission.CLOSED
        if admission is Admission.OPEN:
            logger.info("%s skipped: its circuit is open", self.provider.name)
            raise CircuitOpenError(
                f"{self.provider.name}'s circuit is open after repeated failures; skipped "
                "until its cool-down probe (LLM_BREAKER_COOLDOWN_SECONDS)",
                provider=self.provider.name,
            )
        # The half-open probe is a single call: its result alone decides the circuit.
        self.probe = admission is Admission.PROBE
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(1 if self.probe else self.policy.attempts) | self.stop,
            wait=wait_retry_after(
                wait_exponential_jitter(
                    multiplier=self.policy.initial_wait,
                    max=self.policy.max_wait,
                    jitter=self.policy.initial_wait,
                )
            ),
            sleep=self.policy.sleep,
            before_sleep=self._log_failed,
            reraise=True,
        )
        try:
            return retrying(self._attempt)
        except AdmissionRejected:
            if self.probe and self.gate is not None:
                self.gate.abandon_probe(self.provider.name)
            raise
        finally:
            self._log_failed(None)

    def _attempt(self) -> Completion:
        if self.attempts and self.gate and self.gate.is_open(self.provider.name):
            # Other workers opened the circuit while we waited: stop paying for retries.
            raise CircuitOpenError(
                f"{self.provider.name}'s circuit opened during retries; moving on",
                provider=self.provider.name,
            )
        ticket: Ticket | None = None
        if self.meter is not None and self.estimate is not None:
            ticket = self.meter.admit(self.provider.name, self.estimate)  # AdmissionRejected
        request = self.request
        remaining = self.deadline - time.monotonic()
        if remaining < request.timeout:
            request = dataclasses.replace(request, timeout=max(remaining, 0.1))
        started = time.perf_counter()
        completion: Completion | None = None
        error: ProviderError | None = None
        try:
            completion = _clean(self.provider.complete(request))
        except ProviderError as exc:
            error = exc
        except Exception as exc:  # an SDK or adapter bug must not crash the job
            # Its message may quote the request: only the type is kept. It is charged at
            # the worst case, since the provider may have answered before the failure.
            logger.error("%s call failed unexpectedly: %s", self.provider.name, type(exc).__name__)
            error = MalformedResponseError(
                f"{self.provider.name} call failed unexpectedly ({type(exc).__name__})",
                provider=self.provider.name,
                answered=True,
            )
        charge = None
        if ticket is not None and self.meter is not None:
            charge = self.meter.settle(ticket, completion=completion, error=error)
        self._record(error)
        if completion is None:
            self._failed = self._make(started, error=error, charge=charge)
            raise error or MalformedResponseError("no answer", provider=self.provider.name)
        attempt = self._make(started, completion=completion, charge=charge)
        self.attempts.append(attempt)
        self.log(attempt)
        return completion

    def _make(
        self,
        started: float,
        *,
        completion: Completion | None = None,
        error: ProviderError | None = None,
        charge: Charge | None = None,
    ) -> Attempt:
        return Attempt(
            provider=self.provider.name,
            model=self.request.model,
            number=self._first + len(self.attempts),
            latency_ms=(time.perf_counter() - started) * 1000,
            completion=completion,
            error=error,
            probe=self.probe,
            charge=charge,
        )

    def _log_failed(self, retry_state: RetryCallState | None) -> None:
        if self._failed is None:
            return
        wait = round(retry_state.upcoming_sleep, 3) if retry_state else None
        attempt = dataclasses.replace(self._failed, wait_seconds=wait)
        self._failed = None
        self.attempts.append(attempt)
        self.log(attempt)

    def _record(self, error: ProviderError | None) -> None:
        if self.gate is not None:
            self.gate.record(self.provider.name, error=error, probe=self.probe)


def _clean(completion: Completion) -> Completion:
    """The answer with any configured secret the provider quoted back masked."""
    text = scrub(completion.text)
    return completion if text == completion.text else completion.model_copy(update={"text": text})
