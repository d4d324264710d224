"""The producer side: enqueue completion jobs without importing any provider SDK."""

from __future__ import annotations

import uuid
from typing import Any

from celery.result import AsyncResult
from pydantic import ValidationError

from producer.cached import CachedResult, lookup
from worker.app import app
from worker.constants import COMPLETE_TASK, QUEUE
from worker.idempotency import task_id_for
from worker.models import CompletionJob

__all__ = ["CachedResult", "app", "submit"]


def submit(
    messages: list[dict[str, str]],
    user_id: str,
    *,
    queue: str = QUEUE,
    countdown: float | None = None,
    check_cache: bool = True,
    **options: Any,
) -> AsyncResult | CachedResult:
    """Enqueue an `llm.complete` job; `options` are model, temperature, max_tokens,
    request_id, cache, trim, on_truncation, on_limit.

    Unless `check_cache=False`, a job whose answer is already known comes back resolved
    and is not sent: a cacheable job found in the response cache, or a re-submitted
    request_id whose result is stored (for the same user and the same request).
    """
    # A caller's own request_id may be a retry of an earlier submission.
    replay = "request_id" in options
    options.setdefault("request_id", uuid.uuid4().hex)
    kwargs = {"messages": messages, "user_id": user_id, **options}
    try:
        job: CompletionJob | None = CompletionJob.model_validate(kwargs)
    except ValidationError:
        job = None  # the worker rejects it with a message saying what to fix
    # Never the request_id itself: users pick those, and a task id names a result.
    task_id = task_id_for(job) if job is not None else str(uuid.uuid4())
    if check_cache and job is not None:
        hit = lookup(job, task_id=task_id, replay=replay)
        if hit is not None:
            # Also in the result backend, so AsyncResult(job.id) elsewhere finds it.
            app.backend.store_result(hit.id, hit.result, "SUCCESS")
            return hit
    return app.send_task(
        COMPLETE_TASK, kwargs=kwargs, queue=queue, countdown=countdown, task_id=task_id
    )
