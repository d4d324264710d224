"""Celery tasks: thin wrappers that hand each job to the pipeline, and defer it when limited."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry

from worker import logs, telemetry
from worker.app import app
from worker.connections import redis_client
from worker.constants import BATCH_QUEUE, COMPLETE_TASK, DEFERRED_SINCE_HEADER, SENT_AT_HEADER
from worker.deferrals import Deferral, DeferralLog
from worker.errors import LLMQError, RateLimitedError, TaskIdConflictError
from worker.mapreduce import Summarizer
from worker.pipeline import JobContext, Pipeline
from worker.privacy import PrivateRequest
from worker.settings import DEFER_MARGIN_SECONDS, OnLimit, Settings, get_settings

_pipeline: Pipeline | None = None
_pipeline_lock = threading.Lock()


def pipeline() -> Pipeline:
    """The process-wide pipeline, built on first use."""
    global _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            _pipeline = Pipeline(get_settings())
        return _pipeline


class LLMTask(Task):  # type: ignore[misc]
    """Every llm.* task: its reprs, events and logs never carry prompt or completion text."""

    Request = PrivateRequest
    # Deferral re-schedules are bounded by LLM_DEFER_MAX_WAIT_SECONDS, not by a count.
    max_retries = None


def context_of(task: Task) -> JobContext:
    """What the queue knows about the job: its task id and how long it waited."""
    sent_at = getattr(task.request, SENT_AT_HEADER, None)
    wait = round((time.time() - float(sent_at)) * 1000, 3) if sent_at else None
    return JobContext(task_id=task.request.id, queue_wait_ms=wait)


@app.task(  # type: ignore[untyped-decorator]
    name=COMPLETE_TASK,
    bind=True,
    base=LLMTask,
    throws=(LLMQError,),
    # Celery's rate_limit is per worker instance (N workers admit N times it); the
    # global per-user and per-provider limits are enforced in Redis by worker/limits.py.
    rate_limit=get_settings().task_rate_limit,
)
def complete(self: Task, **job: Any) -> dict[str, Any]:
    """Run one completion job; returns the CompletionResult as a dict."""
    context = context_of(self)
    # The task id survives redelivery, so a job sent without a request_id stays idempotent.
    if self.request.id:
        job.setdefault("request_id", self.request.id)
    try:
        return pipeline().complete(job, context=context).model_dump()
    except RateLimitedError as exc:
        raise defer_or_fail(self, job, exc, context) from None
    except TaskIdConflictError:
        # Storing anything under this task id would overwrite another user's result.
        raise Ignore() from None


def _summarizer(task: Task) -> Summarizer:
    """The map-reduce steps, calling the pipeline with this task's queue context."""
    context = context_of(task)

    def on_limited(exc: RateLimitedError, job: dict[str, Any]) -> None:
        outcome = defer_or_fail(task, job, exc, context)
        if isinstance(outcome, Retry):
            raise outcome

    return Summarizer(
        pipeline(), lambda job: pipeline().complete(job, context=context), on_limited=on_limited
    )


# Batch steps defer like llm.complete when rate-limited; the wait is bounded by
# LLM_DEFER_MAX_WAIT_SECONDS, not by a retry count (deferred steps wake together and
# may lose the race several times under a binding limit).
@app.task(name="llm.batch.summarize", bind=True, base=LLMTask)  # type: ignore[untyped-decorator]
def summarize_document(self: Task, **document: Any) -> dict[str, Any]:
    """Summarize one document, or start its chord; errors come back as values."""
    return _summarizer(self).document(document)


@app.task(name="llm.batch.part", bind=True, base=LLMTask)  # type: ignore[untyped-decorator]
def summarize_part(self: Task, **part: Any) -> dict[str, Any]:
    """Summarize one part of a long document; errors come back as values."""
    return _summarizer(self).part(part)


@app.task(name="llm.batch.reduce", bind=True, base=LLMTask)  # type: ignore[untyped-decorator]
def reduce_parts(self: Task, parts: list[Any], *, state: dict[str, Any]) -> dict[str, Any]:
    """Combine a chord's part summaries into the document's summary (or go a level up)."""
    return _summarizer(self).reduce(parts, state)


def on_limit_policy(
    *, requested: OnLimit | None, deferred_before: bool, queue: str | None, settings: Settings
) -> OnLimit:
    """The job's own choice; else defer if it was already deferred; else the queue's default."""
    if requested is not None:
        return requested
    if deferred_before:
        return "defer"
    return settings.batch_on_limit if queue == BATCH_QUEUE else settings.on_limit


def max_countdown(settings: Settings) -> float:
    """The longest a deferred job may wait, so that waiting plus running fits the visibility.

    kombu hands a message out again once a worker has held it unacknowledged for the
    visibility timeout; a deferred job is held for its countdown and then runs for up
    to the job deadline, so both together must stay below it.
    """
    return settings.visibility_timeout - settings.job_deadline_seconds - DEFER_MARGIN_SECONDS


def defer_countdown(error: RateLimitedError, *, waited: float, settings: Settings) -> float | None:
    """Seconds to wait before trying again, or None when the job must fail now."""
    retry_after = error.retry_after
    remaining = settings.defer_max_wait_seconds - waited
    if retry_after is None or math.isinf(retry_after) or remaining < 0.05:
        return None
    # A little past the moment capacity returns, so the window has surely slid.
    return max(0.05, min(retry_after + 0.05, max_countdown(settings), remaining))


def defer_or_fail(
    self: Task, job: dict[str, Any], exc: RateLimitedError, context: JobContext
) -> Exception:
    """A rate-limited job: re-scheduled on the deferred queue, or the error to fail with."""
    settings = get_settings()
    since = getattr(self.request, DEFERRED_SINCE_HEADER, None)
    delivery = self.request.delivery_info or {}
    policy = on_limit_policy(
        requested=job.get("on_limit"),
        deferred_before=since is not None,
        queue=delivery.get("routing_key"),
        settings=settings,
    )
    if policy == "fail":
        return exc
    now = float(context.log_fields.get("rate_limit", {}).get("redis_time", time.time()))
    first = float(since) if since is not None else now
    countdown = defer_countdown(exc, waited=now - first, settings=settings)
    if countdown is None:
        if exc.retry_after is None or math.isinf(exc.retry_after):
            return exc  # it can never fit: waiting would not help
        return type(exc)(
            f"{exc} Gave up after deferring {now - first:.1f}s "
            f"(LLM_DEFER_MAX_WAIT_SECONDS={settings.defer_max_wait_seconds:g})."
        )
    telemetry.on_deferred(exc.limit_name)
    logs.job_logger.info(
        "llm_deferred",
        extra={
            "event": "llm_deferred",
            "request_id": job.get("request_id"),
            "task_id": self.request.id,
            "user_id": job.get("user_id"),
            "limit": exc.limit_name,
            "retry_after": exc.retry_after,
            "countdown": round(countdown, 3),
            "waited_s": round(now - first, 3),
            "redis_time": now,
        },
    )
    _note_deferral(job, exc, task=self, since=first, frees_at=now + countdown, settings=settings)
    # Same task id and arguments (so the same request_id); the queue keeps it away
    # from fresh work, and the countdown keeps wait plus run within the visibility timeout.
    headers = {**(self.request.headers or {}), DEFERRED_SINCE_HEADER: first}
    return self.retry(  # type: ignore[no-any-return]
        countdown=countdown,
        queue=settings.deferred_queue,
        headers=headers,
        throw=False,
    )


def _note_deferral(
    job: dict[str, Any],
    exc: RateLimitedError,
    *,
    task: Task,
    since: float,
    frees_at: float,
    settings: Settings,
) -> None:
    """Tell the job's sender what it waits on; a Redis error must not stop the deferral."""
    deferral = Deferral(
        task_id=str(task.request.id),
        request_id=str(job.get("request_id") or task.request.id),
        limit=exc.limit_name or "unknown",
        since=since,
        frees_at=round(frees_at, 3),
        count=int(task.request.retries or 0) + 1,
    )
    try:
        DeferralLog(redis_client(settings)).record(str(job.get("user_id")), deferral)
    except redis.RedisError:
        logs.job_logger.warning("llm_deferral_not_noted", extra={"event": "llm_deferral_not_noted"})


# The Batch API mode's tasks (issue 16) register on import, after the names they use.
import worker.batchapi.tasks  # noqa: E402, F401
