"""Pipeline step 4: reuse an answer already paid for, or be the one job that pays for it.

In order: the request_id's binding (IdempotencyConflictError for another request), the
stored result of this request_id (a redelivery or a client retry), then the response
cache; identical jobs running at the same time wait for the one that calls. The step
contributes one part to the job's admission script (`admit_part`) and one to its
settlement (`store_part`); the leases it takes expire with the job deadline, so no
thread keeps them alive and a crashed worker blocks nobody for longer than that.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from worker.cache import CacheRequest, ResponseCache, cache_request
from worker.errors import JobInProgressError, TaskIdConflictError
from worker.idempotency import conflict
from worker.keyspace import job_keys, task_owner
from worker.models import CompletionJob, CompletionResult
from worker.prices import PriceTable
from worker.scripts import Part
from worker.settings import Settings

# Beyond the job deadline, time for the pipeline's own steps around the provider calls.
LEASE_MARGIN_SECONDS = 5.0

Verdict = Literal["lead", "replay", "cached", "follow_job", "follow_cache"]


@dataclass(frozen=True, kw_only=True)
class Reused:
    """A result served without a provider call, and the cost that call had."""

    result: CompletionResult
    kind: Literal["cache", "replay"]
    cost_saved_usd: float


class Flight:
    """One job's pass through the step: the keys it checks and the leases it holds."""

    def __init__(
        self,
        *,
        job: CompletionJob,
        request: CacheRequest | None,
        reuse: ResultReuse,
        task_id: str | None,
    ) -> None:
        self.job = job
        self.request = request
        self.task_id = task_id
        self.keys = job_keys(job.user_id, job.request_id)
        self.token = uuid.uuid4().hex
        # False once the wait for an identical job ran out: call without its lease.
        self.take_cache_lease = True
        self._reuse = reuse

    def admit_part(self) -> Part:
        """The script part: bind the id, find a stored or cached answer, or take the leases."""
        reuse, job = self._reuse, self.job
        cache = reuse.cache
        request = self.request
        return Part(
            "reuse_admit",
            [
                self.keys.binding,
                self.keys.result,
                self.keys.lease,
                task_owner(self.task_id) if self.task_id else "",
                cache.entry_key(request) if request else "",
                cache.lock_key(request) if request else "",
                cache.stats_key if request else "",
            ],
            [
                job.fingerprint(),
                hashlib.sha256(job.user_id.encode("utf-8")).hexdigest(),
                reuse.settings.result_expires,
                self.token,
                int(reuse.lease_seconds * 1000),
                1 if self.take_cache_lease else 0,
                job.request_id,
            ],
        )

    def verdict(
        self, reply: Any, *, started: float, queue_wait_ms: float | None
    ) -> Reused | Verdict:
        """What the admission found: a reusable result, or lead / follow; raises on conflicts."""
        kind = str(reply[1])
        if kind == "conflict":
            raise conflict(self.job)
        if kind == "task_conflict":
            raise TaskIdConflictError(
                f"task id {self.task_id!r} was first used by another user; this job was not "
                "run and that user's result is untouched. Fix: give every job its own task "
                "id (llmq's submit() derives one from user_id and request_id)."
            )
        if kind == "replay":
            stored = CompletionResult.model_validate_json(reply[2])
            return Reused(result=stored, kind="replay", cost_saved_usd=stored.cost_usd)
        if kind == "cached":
            served = CompletionResult.model_validate_json(reply[2]).model_copy(
                update={
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                    "queue_wait_ms": queue_wait_ms,
                }
            )
            return Reused(result=served, kind="cache", cost_saved_usd=float(reply[3]))
        if kind in ("lead", "follow_job", "follow_cache"):
            return kind  # type: ignore[return-value]
        raise ValueError(f"unknown admission reply {kind!r}")

    def in_progress(self) -> JobInProgressError:
        """The error for a job whose other delivery outlived our wait."""
        wait = self._reuse.settings.cache_wait_seconds
        # Never advise a new request_id: that would pay for the same answer twice.
        return JobInProgressError(
            f"request_id {self.job.request_id!r} is still running on another worker after "
            f"{wait:g}s (LLM_CACHE_WAIT_SECONDS); it stores its result under the same id. "
            "Fix: wait and poll the same job id, or submit again with the same request_id "
            "later to get the stored result."
        )

    def store_part(self, result: CompletionResult) -> Part:
        """The script part that keeps the answer and releases the leases."""
        reuse, request = self._reuse, self.request
        cached = request is not None and reuse.cache.storable_for(request, result)
        return Part(
            "reuse_store",
            [
                self.keys.result,
                self.keys.lease,
                reuse.cache.entry_key(request) if request else "",
                reuse.cache.lock_key(request) if request and self.take_cache_lease else "",
            ],
            [
                result.model_dump_json(),
                reuse.settings.result_expires,
                self.token,
                result.model_dump_json() if cached else "",
                reuse.cache.ttl,
            ],
        )

    def release_part(self) -> Part:
        """The script part that releases the leases of a job that ended without an answer."""
        keys = [self.keys.lease]
        if self.request is not None and self.take_cache_lease:
            keys.append(self._reuse.cache.lock_key(self.request))
        return Part("reuse_release", keys, [self.token])


class ResultReuse:
    """Idempotent replays, cache hits and single-flight, in front of the provider call."""

    def __init__(self, settings: Settings, prices: PriceTable) -> None:
        self.settings = settings
        self.prices = prices
        self.cache = ResponseCache(version=settings.cache_version, ttl=settings.cache_ttl)
        # The lease covers the whole job: no renewal, and it lapses soon after a crash.
        self.lease_seconds = settings.job_deadline_seconds + LEASE_MARGIN_SECONDS

    def flight(self, job: CompletionJob, *, task_id: str | None = None) -> Flight:
        """The job's flight: its cache identity and the leases it may take."""
        request = cache_request(job, settings=self.settings, prices=self.prices)
        return Flight(job=job, request=request, reuse=self, task_id=task_id)
