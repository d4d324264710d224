"""The producer side: enqueue completion jobs without importing any provider SDK."""

from __future__ import annotations

import uuid
from typing import Any

from celery.result import AsyncResult

from worker.app import QUEUE, app

__all__ = ["app", "submit"]


def submit(
    messages: list[dict[str, str]],
    user_id: str,
    *,
    queue: str = QUEUE,
    countdown: float | None = None,
    **options: Any,
) -> AsyncResult:
    """Enqueue `llm.complete`; options: model, temperature, max_tokens, request_id, on_limit."""
    # The request id doubles as the task id, so logs, results and Flower line up.
    options.setdefault("request_id", str(uuid.uuid4()))
    kwargs = {"messages": messages, "user_id": user_id, **options}
    return app.send_task(
        "llm.complete",
        kwargs=kwargs,
        queue=queue,
        countdown=countdown,
        task_id=str(options["request_id"]),
    )
