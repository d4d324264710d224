"""Celery tasks: thin wrappers that hand each job to the pipeline."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import celery.app.trace
from celery import Task

from worker import limits, logs
from worker.app import SENT_AT_HEADER, app
from worker.errors import LLMQError, RateLimitedError
from worker.pipeline import JobContext, Pipeline
from worker.settings import get_settings

# Celery logs each task's return value on success; ours holds completion text.
celery.app.trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

# Redis time (seconds) of a deferred job's first deferral, carried across re-schedules.
DEFERRED_SINCE_HEADER = "llmq_deferred_since"

_pipeline: Pipeline | None = None
_pipeline_lock = threading.Lock()


def pipeline() -> Pipeline:
    """The process-wide pipeline, built on first use."""
    global _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            _pipeline = Pipeline(get_settings())
        return _pipeline


@app.task(  # type: ignore[untyped-decorator]
    name="llm.complete",
    bind=True,
    throws=(LLMQError,),
    # Celery's rate_limit is per worker instance (N workers admit N times it); the
    # global per-user and per-provider limits are enforced in Redis by worker/limits.py.
    rate_limit=get_settings().task_rate_limit,
    # Deferral re-schedules are bounded by LLM_DEFER_MAX_WAIT_SECONDS, not a count.
    max_retries=None,
)
def complete(self: Task, **job: Any) -> dict[str, Any]:
    """Run one completion job; returns the CompletionResult as a dict."""
    sent_at = getattr(self.request, SENT_AT_HEADER, None)
    wait = round((time.time() - float(sent_at)) * 1000, 3) if sent_at else None
    context = JobContext(task_id=self.request.id, queue_wait_ms=wait)
    try:
        return pipeline().complete(job, context=context).model_dump()
    except RateLimitedError as exc:
        raise defer_or_fail(self, job, exc, context) from None


def defer_or_fail(
    self: Task, job: dict[str, Any], exc: RateLimitedError, context: JobContext
) -> Exception:
    """A rate-limited job: re-scheduled on the deferred queue, or the error to fail with."""
    settings = get_settings()
    since = getattr(self.request, DEFERRED_SINCE_HEADER, None)
    delivery = self.request.delivery_info or {}
    policy = limits.on_limit_policy(
        requested=job.get("on_limit"),
        deferred_before=since is not None,
        queue=delivery.get("routing_key"),
        settings=settings,
    )
    if policy == "fail":
        return exc
    now = float(context.log_fields.get("rate_limit", {}).get("redis_time", time.time()))
    first = float(since) if since is not None else now
    countdown = limits.defer_countdown(exc, waited=now - first, settings=settings)
    if countdown is None:
        if exc.retry_after is None or math.isinf(exc.retry_after):
            return exc  # it can never fit: waiting would not help
        return type(exc)(
            f"{exc} Gave up after deferring {now - first:.1f}s "
            f"(LLM_DEFER_MAX_WAIT_SECONDS={settings.defer_max_wait_seconds:g})."
        )
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
    # Same task id and arguments (so the same request_id); the queue keeps it away
    # from fresh work, and the countdown stays under the visibility timeout.
    headers = {**(self.request.headers or {}), DEFERRED_SINCE_HEADER: first}
    return self.retry(  # type: ignore[no-any-return]
        countdown=countdown,
        queue=settings.deferred_queue,
        headers=headers,
        throw=False,
    )
