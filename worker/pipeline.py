"""The completion pipeline: every job runs these steps, top to bottom, from here."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from worker import logs, media, tokens
from worker.breaker import CircuitBreaker, DeferredGate
from worker.connections import redis_client
from worker.errors import (
    InvalidContentError,
    InvalidJobError,
    LLMQError,
    StateUnavailableError,
    ToolCallMismatchError,
    TruncatedResponseError,
    UnexpectedError,
)
from worker.guard import CostGuard, Estimate
from worker.limits import RateLimiter
from worker.metering import Meter
from worker.metrics import LatencyRecorder
from worker.models import CompletionJob, CompletionResult, Usage
from worker.options import RequestOptions
from worker.prices import load_prices
from worker.providers import ProviderRequest, get_provider
from worker.resilience import Admission, Attempt, Gate, Outcome, RetryPolicy, Target, call_chain
from worker.reuse import Flight, ResultReuse, Reused
from worker.scripts import Settlement, scripts_for
from worker.settings import ProviderName, Settings, TruncationPolicy
from worker.spend import SpendTracker
from worker.structured import SchemaEnforcer
from worker.tools import check_calls
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


def problem_text(error: ErrorDetails) -> str:
    """Pydantic's message for one error, never quoting the input (a part type may be text)."""
    if error["type"] == "union_tag_invalid":
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"unknown type; send one of {expected}"
    return error["msg"]


def invalid_kind(exc: ValidationError) -> type[InvalidJobError]:
    """The typed error for a job's validation problems: tool turns, content, or the job."""
    errors = exc.errors()
    if any(e["type"] == "llmq_tool_call" for e in errors):
        return ToolCallMismatchError
    if any(
        e["type"] == "llmq_content"
        or (e["type"].startswith("union_tag_") and "content" in e["loc"])
        for e in errors
    ):
        return InvalidContentError
    return InvalidJobError


def validate(raw: dict[str, Any], *, context: JobContext | None = None) -> CompletionJob:
    """Step 1: the job's arguments as a typed model, or InvalidJobError saying what to fix."""
    try:
        return CompletionJob.model_validate(raw)
    except ValidationError as exc:
        # Input values are left out on purpose: they may be prompt text.
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or 'job'}: {problem_text(error)}"
            for error in exc.errors()
        ]
        error = invalid_kind(exc)(
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
        self.scripts = scripts_for(redis_client(settings))
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
        settlement = Settlement()
        meter = self.meter(job, context, settlement)
        flight: Flight | None = None
        reused: Reused | None = None
        try:
            plan = self.plan(job)  # 2. cost guard: price, per-request budget, context window
            flight = self.reuse.flight(job, task_id=context.task_id)
            # 4, 2-3. One round trip: the request_id's stored result or a cache hit (no
            # call, nothing reserved), or the leases, the first provider's circuit, the
            # daily budget and the rate limits for the first attempt.
            try:
                reused, circuit = self.admit(plan, flight, meter, context, started=started)
            except redis.RedisError as exc:
                # Fail closed: without Redis no budget or limit can be checked.
                raise StateUnavailableError(
                    f"llmq's Redis is unreachable ({type(exc).__name__}): budgets, rate "
                    "limits and stored results cannot be checked, so no provider was "
                    "called. Fix: check REDIS_URL and the Redis server; resubmitting the "
                    "job later is safe."
                ) from None
            if reused is None:
                gate = DeferredGate(self.breaker, settlement, circuit)
                # 5. the chain; every further attempt admitted and charged on its own.
                outcome = self.call(plan, context, meter, gate=gate)
                # 5b. finish_reason "length": fail, retry larger or accept
                outcome = self.enforce_truncation(plan, context, outcome, meter, gate=gate)
                # 5c. a structured answer validated, re-asked once if it fails
                outcome = self.enforce_schema(plan, context, outcome, meter, gate=gate)
                # 5d. tool calls' arguments validated against their tools' schemas
                check_calls(outcome.completion.tool_calls, plan.job.tools)
                meter.close()
                result = self.result(plan, outcome, meter, context, started)
                # 7. One round trip: charges, circuit, stored result and cache, leases, latency.
                self.settle(settlement, flight, result, context, started=started)
            else:
                result = reused.result
        except LLMQError as exc:
            self.abort(settlement, meter, flight, context, started=started)
            self.log_job(job, context, meter=meter, error=exc, started=started)
            raise
        except Exception as exc:
            self.abort(settlement, meter, flight, context, started=started)
            # Its message may quote the job: the caller learns the type, never the text.
            logs.logger.error(
                "unexpected %s in request %s at:\n%s",
                type(exc).__name__,
                job.request_id,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            error = UnexpectedError(
                f"llmq failed unexpectedly ({type(exc).__name__}) on request "
                f"{job.request_id!r}; the worker log has the traceback. Everything the "
                "provider answered was charged. Fix: report it; the job may be resubmitted."
            )
            self.log_job(job, context, meter=meter, error=error, started=started)
            raise error from None
        if reused is not None:
            # A reused result made no provider call now: only its queue wait and total count.
            self.record_latency(context, started=started)
        self.log_job(job, context, meter=meter, result=result, started=started, reused=reused)  # 6
        return result  # 7. the result backend stores it

    def admit(
        self, plan: Plan, flight: Flight, meter: Meter, context: JobContext, *, started: float
    ) -> tuple[Reused | None, dict[str, Admission]]:
        """Steps 4 and 2-3 in one script: a reused answer, or what the first attempt holds.

        Returns the reused result (or None), and the first provider's circuit as the
        admission found it. An identical job (or another delivery of this one) that
        is calling already is waited for, polling the same script.
        """
        primary = plan.primary
        wait_until = time.monotonic() + self.settings.cache_wait_seconds
        delay = 0.02
        while True:
            prepared = meter.prepare(primary.provider, primary.estimate)
            parts = [
                flight.admit_part(),
                self.breaker.admit_part(primary.provider),
                *prepared.parts,
            ]
            replies = self.scripts.admit(parts)
            verdict = flight.verdict(
                replies[0], started=started, queue_wait_ms=context.queue_wait_ms
            )
            if isinstance(verdict, Reused):
                return verdict, {}
            if verdict == "lead":
                break
            if time.monotonic() >= wait_until:
                if verdict == "follow_job":
                    raise flight.in_progress()
                # The identical job outlived our wait: call the provider ourselves.
                flight.take_cache_lease = False
                continue
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        circuit = CircuitBreaker.admission(replies[1])
        if circuit is not Admission.OPEN:
            meter.accept(prepared, replies[2:])
        return None, {primary.provider: circuit}

    def settle(
        self,
        settlement: Settlement,
        flight: Flight,
        result: CompletionResult,
        context: JobContext,
        *,
        started: float,
    ) -> None:
        """Write everything the job's answer settles, in one round trip."""
        latency = self.latency.record_part(
            queue_wait_ms=context.queue_wait_ms,
            provider_latency_ms=result.provider_latency_ms,
            total_latency_ms=(time.perf_counter() - started) * 1000,
        )
        try:
            settlement.send(self.scripts, flight.store_part(result), latency)
        except redis.RedisError as exc:
            # The answer is paid for: return it even if it cannot be kept or counted; the
            # reservations it held expire on their own.
            logs.logger.error("job settlement not written, Redis error: %s", exc)

    def abort(
        self,
        settlement: Settlement,
        meter: Meter,
        flight: Flight | None,
        context: JobContext,
        *,
        started: float,
    ) -> None:
        """A job that ends without an answer: settle what it was charged, free its leases."""
        meter.close()
        extra = [flight.release_part()] if flight is not None else []
        extra.append(
            self.latency.record_part(
                queue_wait_ms=context.queue_wait_ms,
                total_latency_ms=(time.perf_counter() - started) * 1000,
            )
        )
        settlement.flush(self.scripts, *extra)

    def meter(
        self, job: CompletionJob, context: JobContext, settlement: Settlement | None = None
    ) -> Meter:
        """The job's ledger of admissions and charges."""
        return Meter(
            spend=self.spend,
            limiter=self.limiter,
            user_id=job.user_id,
            request_id=job.request_id,
            record=context.log_fields,
            settlement=settlement,
        )

    def plan(self, job: CompletionJob) -> Plan:
        """Step 2: the providers to try, in order, each priced by the cost guard."""
        media.check_sizes(
            job.messages,
            max_image_bytes=self.settings.max_image_bytes,
            max_job_bytes=self.settings.max_job_media_bytes,
        )
        return Plan(
            job=job,
            candidates=self.candidates(job),
            temperature=self.settings.temperature if job.temperature is None else job.temperature,
            prompt_hash=job.prompt_hash(),
            on_truncation=job.on_truncation or self.settings.on_truncation,
            deadline=time.monotonic() + self.settings.job_deadline_seconds,
        )

    def call(
        self,
        plan: Plan,
        context: JobContext,
        meter: Meter,
        candidates: list[Candidate] | None = None,
        *,
        gate: Gate | None = None,
    ) -> Outcome:
        """Step 5: the provider chain with retries and the circuit breaker, every attempt logged."""
        job = plan.job
        # The job's tags go on its llm_job record and each llm_call: never to a provider.
        tags = {"metadata": job.metadata} if job.metadata else {}
        context.log_fields.update(tags)

        def record(attempt: Attempt) -> None:
            charge = attempt.charge
            usage = attempt.completion.usage if attempt.completion else None
            usage = charge.usage if charge else usage
            logs.log_call(
                request_id=job.request_id,
                task_id=context.task_id,
                user_id=job.user_id,
                provider=attempt.provider,
                model=attempt.model,
                attempt=attempt.number,
                input_tokens=usage.input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None,
                cost_usd=float(round(charge.cost_usd, 10)) if charge else 0.0,
                charged_as=charge.charged_as if charge else None,
                latency_ms=round(attempt.latency_ms, 3),
                queue_wait_ms=context.queue_wait_ms,
                finish_reason=attempt.completion.finish_reason if attempt.completion else None,
                cached=False,
                error=str(attempt.error) if attempt.error else None,
                error_kind=type(attempt.error).__name__ if attempt.error else None,
                wait_seconds=attempt.wait_seconds,
                probe=attempt.probe,
                prompt_hash=plan.prompt_hash,
                **tags,
            )

        targets = [
            Target(
                provider=get_provider(c.provider, self.settings),
                request=ProviderRequest(
                    messages=c.estimate.messages,
                    model=c.estimate.model,
                    max_tokens=c.estimate.max_output_tokens,
                    temperature=plan.temperature,
                    timeout=self.settings.timeout_seconds,
                    options=c.estimate.options,
                    reasoning=c.estimate.price.reasoning,
                    native_schema=c.estimate.price.structured_outputs,
                ),
                estimate=c.estimate,
            )
            for c in candidates or plan.candidates
        ]
        return call_chain(
            targets,
            on_attempt=record,
            policy=self.retry_policy,
            gate=gate or self.breaker,
            deadline=plan.deadline,
            meter=meter,
        )

    def enforce_truncation(
        self,
        plan: Plan,
        context: JobContext,
        outcome: Outcome,
        meter: Meter,
        *,
        gate: Gate | None = None,
    ) -> Outcome:
        """Step 5b: the job's policy for an answer cut off at max_tokens."""
        served = next(c for c in plan.candidates if c.provider == outcome.provider)
        return self.truncation.enforce(
            outcome,
            policy=plan.on_truncation,
            messages=plan.job.messages,
            estimate=served.estimate,
            # The larger call is admitted and charged like any other attempt.
            retry=lambda larger: self.call(
                plan,
                context,
                meter,
                [Candidate(provider=served.provider, estimate=larger)],
                gate=gate,
            ),
            request_id=plan.job.request_id,
            task_id=context.task_id,
            user_id=plan.job.user_id,
        )

    def enforce_schema(
        self,
        plan: Plan,
        context: JobContext,
        outcome: Outcome,
        meter: Meter,
        *,
        gate: Gate | None = None,
    ) -> Outcome:
        """Step 5c: a structured answer validated and parsed (worker/structured.py)."""
        served = next(c for c in plan.candidates if c.provider == outcome.provider)
        return SchemaEnforcer(self.guard).enforce(
            outcome,
            estimate=served.estimate,
            # The re-ask is admitted and charged like any other attempt.
            retry=lambda again: self.call(
                plan,
                context,
                meter,
                [Candidate(provider=served.provider, estimate=again)],
                gate=gate,
            ),
        )

    def result(
        self, plan: Plan, outcome: Outcome, meter: Meter, context: JobContext, started: float
    ) -> CompletionResult:
        """Step 7: the result, with everything the job was charged (discarded answers too)."""
        served = next(c for c in plan.candidates if c.provider == outcome.provider)
        usage = meter.usage
        return CompletionResult(
            request_id=plan.job.request_id,
            text=outcome.completion.text,
            provider=outcome.provider,
            model=outcome.model,
            finish_reason=outcome.completion.finish_reason,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_input_tokens=usage.cache_write_input_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            parsed=outcome.completion.parsed,
            refusal=outcome.completion.refusal,
            tool_calls=outcome.completion.tool_calls or None,
            cost_usd=float(round(meter.cost_usd, 10)),
            charged_as=meter.charged_as,
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
        meter: Meter,
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
            private["prompt"] = [m.wire() for m in job.messages]
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
            input_tokens=result.input_tokens if result else meter.usage.input_tokens,
            output_tokens=result.output_tokens if result else meter.usage.output_tokens,
            cached_input_tokens=(
                result.cached_input_tokens if result else meter.usage.cached_input_tokens
            ),
            # A failed job was still charged for every answer it received.
            cost_usd=0.0 if reused else float(round(meter.cost_usd, 10)),
            charged_as=meter.charged_as if meter.charges else None,
            charged_calls=len(meter.charges),
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
                    job.messages,
                    model=model,
                    max_tokens=max_tokens,
                    trim=job.trim,
                    options=RequestOptions.from_job(job),
                )
            except LLMQError as exc:
                if position == 0:
                    raise
                # A fallback that cannot take this job is skipped, not fatal.
                logs.logger.warning("fallback %s skipped: %s", provider, exc)
                continue
            candidates.append(Candidate(provider=provider, estimate=estimate))
        return candidates
