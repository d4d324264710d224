"""Celery tasks: thin wrappers that hand each job to the pipeline."""

from __future__ import annotations

import ast
import threading
import time
from typing import Any

import celery.app.trace
from celery import Task
from celery.worker.request import Request

from worker.app import SENT_AT_HEADER, app
from worker.errors import LLMQError
from worker.mapreduce import Summarizer
from worker.pipeline import JobContext, Pipeline
from worker.settings import get_settings

# Celery logs each task's return value on success; ours holds completion text.
celery.app.trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

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
    rate_limit=get_settings().task_rate_limit,
)
def complete(self: Task, **job: Any) -> dict[str, Any]:
    """Run one completion job; returns the CompletionResult as a dict."""
    sent_at = getattr(self.request, SENT_AT_HEADER, None)
    wait = round((time.time() - float(sent_at)) * 1000, 3) if sent_at else None
    context = JobContext(task_id=self.request.id, queue_wait_ms=wait)
    # The task id survives redelivery, so a job sent without a request_id stays idempotent.
    if self.request.id:
        job.setdefault("request_id", self.request.id)
    return pipeline().complete(job, context=context).model_dump()


def _summarizer(task: Task) -> Summarizer:
    """The map-reduce steps, calling the pipeline with this task's queue context."""
    sent_at = getattr(task.request, SENT_AT_HEADER, None)
    wait = round((time.time() - float(sent_at)) * 1000, 3) if sent_at else None
    context = JobContext(task_id=task.request.id, queue_wait_ms=wait)
    return Summarizer(pipeline(), lambda job: pipeline().complete(job, context=context))


@app.task(name="llm.batch.summarize", bind=True)  # type: ignore[untyped-decorator]
def summarize_document(self: Task, **document: Any) -> dict[str, Any]:
    """Summarize one document, or start its chord; errors come back as values."""
    return _summarizer(self).document(document)


@app.task(name="llm.batch.part", bind=True)  # type: ignore[untyped-decorator]
def summarize_part(self: Task, **part: Any) -> dict[str, Any]:
    """Summarize one part of a long document; errors come back as values."""
    return _summarizer(self).part(part)


@app.task(name="llm.batch.reduce", bind=True)  # type: ignore[untyped-decorator]
def reduce_parts(self: Task, parts: list[Any], *, state: dict[str, Any]) -> dict[str, Any]:
    """Combine a chord's part summaries into the document's summary (or go a level up)."""
    return _summarizer(self).reduce(parts, state)
