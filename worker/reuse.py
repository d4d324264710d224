"""Pipeline step 4: reuse an answer already paid for, or be the one job that pays for it.

In order: the stored result of this request_id (a redelivery or a client retry), then the
response cache; identical jobs running at the same time wait for the one that calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import redis

from worker import logs
from worker.cache import CacheRequest, ResponseCache, cache_request, served_from_cache
from worker.connections import redis_client
from worker.errors import JobInProgressError
from worker.idempotency import IdempotencyStore
from worker.models import CompletionJob, CompletionResult
from worker.prices import PriceTable
from worker.settings import Settings
from worker.singleflight import RenewedLock, lead_or_follow


@dataclass(frozen=True, kw_only=True)
class Reused:
    """A result served without a provider call, and the cost that call had."""

    result: CompletionResult
    kind: Literal["cache", "replay"]
    cost_saved_usd: float


class Flight:
    """One job's pass through the step: what it reused, or the locks it holds while it calls."""

    def __init__(
        self,
        *,
        job: CompletionJob,
        request: CacheRequest | None,
        reuse: ResultReuse,
        task_id: str | None = None,
    ) -> None:
        self.job = job
        self.task_id = task_id
        self.request = request
        self.reused: Reused | None = None
        self.locks: list[RenewedLock] = []
        self._reuse = reuse

    def record(self, result: CompletionResult) -> None:
        """Keep a fresh answer: under the request_id always, in the cache when it may be."""
        try:
            self._reuse.idempotency.put(self.job, result)
            if self.request is not None:
                self._reuse.cache.put(self.request, result)
        except redis.RedisError as exc:
            # The answer is paid for: return it even if it cannot be kept.
            logs.logger.warning("result not kept for reuse, Redis error: %s", exc)


class ResultReuse:
    """Idempotent replays, cache hits and single-flight, in front of the provider call."""

    def __init__(
        self, settings: Settings, prices: PriceTable, *, client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        self.prices = prices
        self.redis = client or redis_client(settings)
        self.cache = ResponseCache(
            self.redis, version=settings.cache_version, ttl=settings.cache_ttl
        )
        self.idempotency = IdempotencyStore(self.redis, ttl=settings.result_expires)

    @contextmanager
    def flight(
        self, job: CompletionJob, *, queue_wait_ms: float | None, task_id: str | None = None
    ) -> Iterator[Flight]:
        """Find a reusable result, or hold the locks that make identical jobs wait for ours."""
        started = time.perf_counter()
        request = cache_request(job, settings=self.settings, prices=self.prices)
        flight = Flight(job=job, request=request, reuse=self, task_id=task_id)
        try:
            try:
                flight.reused = self._replay(flight) or self._cached(flight, started, queue_wait_ms)
            except redis.RedisError as exc:
                # Availability over savings: a Redis hiccup must not fail a job it can run.
                logs.logger.warning("reuse skipped, Redis error: %s", exc)
            yield flight
        finally:
            while flight.locks:
                flight.locks.pop().release()

    def _lock(self, name: str) -> RenewedLock:
        return RenewedLock(self.redis, name, ttl=self.settings.cache_lock_ttl)

    def _replay(self, flight: Flight) -> Reused | None:
        job = flight.job
        # IdempotencyConflictError / TaskIdConflictError: no call, nothing reserved.
        self.idempotency.bind(job, task_id=flight.task_id)
        lock = self._lock(self.idempotency.lock_key(job))
        wait = self.settings.cache_wait_seconds
        stored, leading = lead_or_follow(lock, lambda: self.idempotency.get(job), wait=wait)
        if stored is not None:
            return Reused(result=stored, kind="replay", cost_saved_usd=stored.cost_usd)
        if not leading:
            # Never advise a new request_id: that would pay for the same answer twice.
            raise JobInProgressError(
                f"request_id {job.request_id!r} is still running on another worker after "
                f"{wait:g}s (LLM_CACHE_WAIT_SECONDS); it stores its result under the same id. "
                "Fix: wait and poll the same job id, or submit again with the same request_id "
                "later to get the stored result."
            )
        flight.locks.append(lock)
        return None

    def _cached(self, flight: Flight, started: float, queue_wait_ms: float | None) -> Reused | None:
        request = flight.request
        if request is None:
            return None
        lock = self._lock(self.cache.lock_key(request))
        stored, leading = lead_or_follow(
            lock, lambda: self.cache.get(request), wait=self.settings.cache_wait_seconds
        )
        if leading:
            flight.locks.append(lock)  # first, so it is released whatever fails next
        if stored is None:
            # Leading, or the leader outlived our wait: call the provider either way.
            self.cache.record_miss()
            return None
        self.cache.record_hit(stored.cost_usd)
        result = served_from_cache(
            stored,
            request_id=flight.job.request_id,
            latency_ms=(time.perf_counter() - started) * 1000,
            queue_wait_ms=queue_wait_ms,
        )
        self.idempotency.put(flight.job, result)
        return Reused(result=result, kind="cache", cost_saved_usd=stored.cost_usd)
