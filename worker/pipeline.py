"""The completion pipeline: every job runs these steps, top to bottom, from here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis
from pydantic import ValidationError

from worker import logs, tokens
from worker.breaker import CircuitBreaker
from worker.connections import redis_client
from worker.errors import InvalidJobError, LLMQError, TruncatedResponseError
from worker.guard import CostGuard, Estimate
from worker.limits import RateLimiter
from worker.metrics import LatencyRecorder
from worker.models import CompletionJob, CompletionResult, Usage
from worker.prices import ModelPrice, load_prices
from worker.providers import ProviderRequest, get_provider
from worker.reservations import Reservations
from worker.resilience import Attempt, Outcome, RetryPolicy, Target, call_chain
from worker.reuse import ResultReuse, Reused
from worker.settings import ProviderName, Settings, TruncationPolicy
from worker.spend import SpendTracker
from worker.truncation import TruncationHandler


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What the queue knows about a job that its arguments do not say."""

    task_id: str | None = None
    queue_wait_ms: float | None = None
    # Extra fields the steps add to the job's `llm_job` record (e.g. the rate-limit decision).
    log_fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One provider and model that may serve the job, already priced."""

    provider: ProviderName
    estimate: Estimate


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated job with everything decided before the first call."""

    job: CompletionJob
    candidates: list[Candidate]
    temperature: float
    prompt_hash: str
    on_truncation: TruncationPolicy
    deadline: float  # time.monotonic() by which the provider calls must be done

    @property
    def primary(self) -> Candidate:
        """The candidate tried first."""
        return self.candidates[0]


def validate(raw: dict[str, Any], *, context: JobContext | None = None) -> CompletionJob:
    """Step 1: the job's arguments as a typed model, or InvalidJobError saying what to fix."""
    try:
        return CompletionJob.model_validate(raw)
    except ValidationError as exc:
        # Input values are left out on purpose: they may be prompt text.
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or 'job'}: {error['msg']}"
            for error in exc.errors()
        ]
        error = InvalidJobError(
            f"Invalid llm.complete job ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems)
        )
        logs.log_job(
            request_id=raw.get("request_id") if isinstance(raw.get("request_id"), str) else None,
            task_id=context.task_id if context else None,
            user_id=raw.get("user_id") if isinstance(raw.get("user_id"), str) else None,
            cost_usd=0.0,
            cached=False,
            error=str(error),
            error_kind=type(error).__name__,
        )
        raise error from None


class Pipeline:
    """Validates, guards, calls and records one completion job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prices = load_prices(settings.prices_file, unknown=settings.unknown_model_pricing)
        self.guard = CostGuard(self.prices, max_cost_per_request=settings.max_cost_per_request)
        self.latency = LatencyRecorder(
            redis_client(settings), window_seconds=settings.metrics_window_seconds
        )
        self.reuse = ResultReuse(settings, self.prices)
        self.spend = SpendTracker.from_settings(settings)
        self.limiter = RateLimiter(settings)
        self.retry_policy = RetryPolicy.from_settings(settings)
        self.breaker = CircuitBreaker.from_settings(redis_client(settings), settings)
        self.truncation = TruncationHandler(self.guard, factor=settings.truncation_retry_factor)

    def warm(self) -> None:
        """Check every chain model is priced, build the providers, load the encoding."""
        for provider in self.settings.chain:
            self.prices.get(self.settings.model_for(provider), provider=provider)
            get_provider(provider, self.settings)
        tokens.get_encoding("o200k_base")

    def complete(self, raw: dict[str, Any], *, context: JobContext) -> CompletionResult:
        """Run one job through every step and return its result."""
        started = time.perf_counter()
        job = validate(raw, context=context)  # 1. validate
        try:
            plan = self.plan(job)  # 2. cost guard: price, per-request budget, context window
            # 4. stored result of this request_id, or cache hit: no call, nothing reserved.
            with self.reuse.flight(job, queue_wait_ms=context.queue_wait_ms) as flight:
                reused = flight.reused
                if reused is None:
                    # 2-3. daily budget, rate limits
                    with self.reserve(plan, context) as reservations:
                        outcome = self.call(plan, context)  # 5. provider chain
                        # 5b. finish_reason "length": fail, retry larger or accept
                        outcome = self.enforce_truncation(plan, context, outcome)
                        result = self.result(plan, outcome, context, started)
                        flight.record(result)  # paid for: kept before anything else can fail
                        reservations.settle(result)
                else:
                    result = reused.result
        except LLMQError as exc:
            self.log_job(job, context, error=exc, started=started)
            self.record_latency(context, started=started)
            raise
        self.log_job(job, context, result=result, started=started, reused=reused)  # 6. logs
        # A reused result made no provider call now: only its queue wait and total count.
        self.record_latency(context, started=started, result=None if reused else result)
        return result  # 7. the result backend stores it

    def plan(self, job: CompletionJob) -> Plan:
        """Step 2: the providers to try, in order, each priced by the cost guard."""
        return Plan(
            job=job,
            candidates=self.candidates(job),
            temperature=self.settings.temperature if job.temperature is None else job.temperature,
            prompt_hash=job.prompt_hash(),
            on_truncation=job.on_truncation or self.settings.on_truncation,
            deadline=time.monotonic() + self.settings.job_deadline_seconds,
        )

    @contextmanager
    def reserve(self, plan: Plan, context: JobContext | None = None) -> Iterator[Reservations]:
        """Steps 2-3: hold the worst case against budgets and limits; release on failure."""
        held = Reservations()
        try:
            # Any candidate may serve the job: hold the costliest worst case.
            worst_case = max(c.estimate.cost_usd for c in plan.candidates)
            held.add(self.spend.reserve(user_id=plan.job.user_id, worst_case_usd=worst_case))
            record = context.log_fields if context else None
            held.add(self.limiter.reserve_plan(plan, record=record))  # 3. rate limits
            yield held
        except BaseException:
            held.release()
            raise

    def call(
        self, plan: Plan, context: JobContext, candidates: list[Candidate] | None = None
    ) -> Outcome:
        """Step 5: the provider chain with retries and the circuit breaker, every attempt logged."""
        job = plan.job

        prices: dict[str, ModelPrice] = {c.provider: c.estimate.price for c in plan.candidates}

        def record(attempt: Attempt) -> None:
            usage = attempt.completion.usage if attempt.completion else None
            cost = prices[attempt.provider].cost(usage) if usage else Decimal(0)
            logs.log_call(
                request_id=job.request_id,
                task_id=context.task_id,
                user_id=job.user_id,
                provider=attempt.provider,
                model=attempt.model,
                attempt=attempt.number,
                input_tokens=usage.input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None,
                cost_usd=float(round(cost, 10)),
                latency_ms=round(attempt.latency_ms, 3),
                queue_wait_ms=context.queue_wait_ms,
                finish_reason=attempt.completion.finish_reason if attempt.completion else None,
                cached=False,
                error=str(attempt.error) if attempt.error else None,
                error_kind=type(attempt.error).__name__ if attempt.error else None,
                wait_seconds=attempt.wait_seconds,
                probe=attempt.probe,
                prompt_hash=plan.prompt_hash,
            )

        targets: list[Target] = [
            (
                get_provider(c.provider, self.settings),
                ProviderRequest(
                    messages=c.estimate.messages,
                    model=c.estimate.model,
                    max_tokens=c.estimate.max_output_tokens,
                    temperature=plan.temperature,
                    timeout=self.settings.timeout_seconds,
                ),
            )
            for c in candidates or plan.candidates
        ]
        return call_chain(
            targets,
            on_attempt=record,
            policy=self.retry_policy,
            gate=self.breaker,
            deadline=plan.deadline,
        )

    def enforce_truncation(self, plan: Plan, context: JobContext, outcome: Outcome) -> Outcome:
        """Step 5b: the job's policy for an answer cut off at max_tokens."""
        served = next(c for c in plan.candidates if c.provider == outcome.provider)
        return self.truncation.enforce(
            outcome,
            policy=plan.on_truncation,
            messages=plan.job.messages,
            estimate=served.estimate,
            retry=lambda larger: self.call(
                plan, context, [Candidate(provider=served.provider, estimate=larger)]
            ),
            request_id=plan.job.request_id,
            task_id=context.task_id,
            user_id=plan.job.user_id,
        )

    def result(
        self, plan: Plan, outcome: Outcome, context: JobContext, started: float
    ) -> CompletionResult:
        """Step 7: the result, priced from the usage the provider reported."""
        served = next(c for c in plan.candidates if c.provider == outcome.provider)
        usage = outcome.usage  # a discarded truncated answer was paid for too
        return CompletionResult(
            request_id=plan.job.request_id,
            text=outcome.completion.text,
            provider=outcome.provider,
            model=outcome.model,
            finish_reason=outcome.completion.finish_reason,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cost_usd=float(round(served.estimate.price.cost(usage), 10)),
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            provider_latency_ms=round(sum(a.latency_ms for a in outcome.attempts), 3),
            queue_wait_ms=context.queue_wait_ms,
            attempts=len(outcome.attempts),
            truncated=outcome.completion.finish_reason == "length",
            messages_dropped=served.estimate.messages_dropped,
        )

    def log_job(
        self,
        job: CompletionJob,
        context: JobContext,
        *,
        started: float,
        result: CompletionResult | None = None,
        error: BaseException | None = None,
        reused: Reused | None = None,
    ) -> None:
        """Step 6: one `llm_job` record per job, failed or not."""
        truncated = (result is not None and result.truncated and reused is None) or isinstance(
            error, TruncatedResponseError
        )
        private: dict[str, Any] = {}
        if self.settings.log_prompts:
            private["prompt"] = [m.model_dump() for m in job.messages]
            private["response"] = result.text if result else None
        # A reused result cost nothing now; what the original call cost is what we saved.
        saved = {"cost_saved_usd": reused.cost_saved_usd, "reused": reused.kind} if reused else {}
        logs.log_job(
            request_id=job.request_id,
            task_id=context.task_id,
            user_id=job.user_id,
            provider=result.provider if result else None,
            model=result.model if result else job.model,
            attempt=result.attempts if result else None,
            input_tokens=result.input_tokens if result else None,
            output_tokens=result.output_tokens if result else None,
            cached_input_tokens=result.cached_input_tokens if result else None,
            cost_usd=result.cost_usd if result and not reused else 0.0,
            cache_discount_usd=self.cache_discount(result) if result and not reused else 0.0,
            messages_dropped=result.messages_dropped if result else 0,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            queue_wait_ms=context.queue_wait_ms,
            finish_reason=result.finish_reason if result else None,
            cached=result.cached if result else False,
            error=str(error) if error else None,
            error_kind=type(error).__name__ if error else None,
            prompt_hash=job.prompt_hash(),
            **context.log_fields,
            **({"alert": logs.TRUNCATED_ALERT} if truncated else {}),
            **private,
            **saved,
        )

    def record_latency(
        self, context: JobContext, *, started: float, result: CompletionResult | None = None
    ) -> None:
        """Step 6: queue wait, provider and total latency into the fleet-wide metrics."""
        try:
            self.latency.record(
                queue_wait_ms=context.queue_wait_ms,
                provider_latency_ms=result.provider_latency_ms if result else None,
                total_latency_ms=(time.perf_counter() - started) * 1000,
            )
        except redis.RedisError as exc:
            # Metrics must never fail a job that has already been paid for.
            logs.logger.warning("latency not recorded: %s", exc)

    def cache_discount(self, result: CompletionResult) -> float:
        """USD the provider's prompt cache saved this job (cached input at its lower rate)."""
        usage = Usage(
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cached_input_tokens=result.cached_input_tokens,
        )
        try:
            price = self.prices.get(result.model)
        except LLMQError:  # a result from elsewhere (the cache) for a model priced no more
            return 0.0
        return float(round(price.cache_discount(usage), 10))

    def candidates(self, job: CompletionJob) -> list[Candidate]:
        """The job's model first (or the primary's), then the fallbacks that can take it."""
        chain = list(self.settings.chain)
        if job.model is not None:
            owner = self.prices.get(job.model, provider=self.settings.provider).provider
            if owner not in chain:
                raise InvalidJobError(
                    f"Model {job.model!r} is served by provider {owner!r}, which is not "
                    f"configured (chain: {', '.join(chain)}). Fix: set LLM_PROVIDER or "
                    f"LLM_FALLBACKS to include {owner!r}, or pick a model of "
                    f"{', '.join(chain)}."
                )
            chain.sort(key=lambda name: name != owner)
        candidates: list[Candidate] = []
        for position, provider in enumerate(chain):
            model = job.model if position == 0 and job.model else self.settings.model_for(provider)
            try:
                max_tokens = self.guard.output_budget(
                    model,
                    job.max_tokens if position == 0 else None,
                    job.max_tokens or self.settings.max_tokens,
                )
                estimate = self.guard.check(
                    job.messages, model=model, max_tokens=max_tokens, trim=job.trim
                )
            except LLMQError as exc:
                if position == 0:
                    raise
                # A fallback that cannot take this job is skipped, not fatal.
                logs.logger.warning("fallback %s skipped: %s", provider, exc)
                continue
            candidates.append(Candidate(provider=provider, estimate=estimate))
        return candidates
