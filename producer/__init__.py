"""The producer side: enqueue completion jobs without importing any provider SDK."""

from __future__ import annotations

import uuid
from typing import Any

from celery.result import AsyncResult

from producer.cached import CachedResult, lookup
from worker.app import QUEUE, app

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
    request_id, cache, trim,
    on_limit.

    Unless `check_cache=False`, a job whose answer is already known comes back resolved
    and is not sent: a cacheable job found in the response cache, or a re-submitted
    request_id whose result is stored.
    """
    # A caller's own request_id may be a retry of an earlier submission.
    replay = "request_id" in options
    # The request id doubles as the task id, so logs, results and Flower line up.
    options.setdefault("request_id", str(uuid.uuid4()))
    kwargs = {"messages": messages, "user_id": user_id, **options}
    if check_cache:
        hit = lookup(kwargs, replay=replay)
        if hit is not None:
            # Also in the result backend, so AsyncResult(job.id) elsewhere finds it.
            app.backend.store_result(hit.id, hit.result, "SUCCESS")
            return hit
    return app.send_task(
        "llm.complete",
        kwargs=kwargs,
        queue=queue,
        countdown=countdown,
        task_id=str(options["request_id"]),
    )
