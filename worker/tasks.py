"""Celery tasks: thin wrappers that hand each job to the pipeline."""

from __future__ import annotations

import ast
import math
import threading
import time
from typing import Any

import celery.app.trace
from celery import Task
from celery.exceptions import Retry
from celery.worker.request import Request

from worker import limits, logs
from worker.app import SENT_AT_HEADER, app
from worker.errors import LLMQError, RateLimitedError
from worker.mapreduce import Summarizer
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


class RedactedRequest(Request):  # type: ignore[misc]
    """Keeps completion text out of task events, which Flower shows and stores."""

    def send_event(self, type: str, **fields: Any) -> None:
        """Replace a success event's result by its fields minus the text."""
        if type == "task-succeeded" and not get_settings().log_prompts:
            fields["result"] = redact_result(fields.get("result"))
        super().send_event(type, **fields)


def redact_result(result: object) -> str:
    """The repr Celery made of a result, without the completion text."""
    try:
        value = ast.literal_eval(result) if isinstance(result, str) else result
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, dict):
        return repr({k: v for k, v in value.items() if k != "text"})
    return "<result hidden>"


@app.task(  # type: ignore[untyped-decorator]
    name="llm.complete",
    bind=True,
    throws=(LLMQError,),
    Request=RedactedRequest,
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
    # The task id survives redelivery, so a job sent without a request_id stays idempotent.
    if self.request.id:
        job.setdefault("request_id", self.request.id)
    try:
        return pipeline().complete(job, context=context).model_dump()
    except RateLimitedError as exc:
        raise defer_or_fail(self, job, exc, context) from None


def _summarizer(task: Task) -> Summarizer:
    """The map-reduce steps, calling the pipeline with this task's queue context."""
    sent_at = getattr(task.request, SENT_AT_HEADER, None)
    wait = round((time.time() - float(sent_at)) * 1000, 3) if sent_at else None
    context = JobContext(task_id=task.request.id, queue_wait_ms=wait)

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
@app.task(name="llm.batch.summarize", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def summarize_document(self: Task, **document: Any) -> dict[str, Any]:
    """Summarize one document, or start its chord; errors come back as values."""
    return _summarizer(self).document(document)


@app.task(name="llm.batch.part", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def summarize_part(self: Task, **part: Any) -> dict[str, Any]:
    """Summarize one part of a long document; errors come back as values."""
    return _summarizer(self).part(part)


@app.task(name="llm.batch.reduce", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def reduce_parts(self: Task, parts: list[Any], *, state: dict[str, Any]) -> dict[str, Any]:
    """Combine a chord's part summaries into the document's summary (or go a level up)."""
    return _summarizer(self).reduce(parts, state)


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
