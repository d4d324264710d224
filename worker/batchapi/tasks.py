"""The batch-API tasks: start a run, submit a round, poll a batch, cancel one.

Polls are Celery tasks sent with a countdown, so no process stays up for the 24 h a
provider may take; each is idempotent (a lock per batch, and a token that retires an
older chain of polls), so a redelivered one does no harm.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task

from worker.app import app
from worker.batchapi.runner import BatchRunner, RunOptions
from worker.constants import BATCH_QUEUE
from worker.errors import LLMQError
from worker.tasks import LLMTask, pipeline

_runner: BatchRunner | None = None
_lock = threading.Lock()


def _send(name: str, kwargs: dict[str, Any], countdown: float) -> None:
    app.send_task(name, kwargs=kwargs, countdown=countdown, queue=BATCH_QUEUE)


def runner() -> BatchRunner:
    """The process-wide runner, built on first use."""
    global _runner
    with _lock:
        if _runner is None:
            _runner = BatchRunner(pipeline(), send=_send)
        return _runner


@app.task(name="llm.batchapi.start", bind=True, base=LLMTask, throws=(LLMQError,))  # type: ignore[untyped-decorator]
def start(
    self: Task, *, documents: list[dict[str, str]], options: dict[str, Any]
) -> dict[str, Any]:
    """Claim the documents, plan and submit the run's first round; returns who owns what."""
    # The task id survives redelivery: a re-delivered start resumes the same run.
    return runner().start(str(self.request.id), documents, RunOptions(**options))


@app.task(name="llm.batchapi.submit", bind=True, base=LLMTask, throws=(LLMQError,))  # type: ignore[untyped-decorator]
def submit(self: Task, *, run: str, round: int) -> None:
    """Create a round's provider batches that do not exist yet."""
    runner().submit(run, round)


@app.task(name="llm.batchapi.poll", bind=True, base=LLMTask, throws=(LLMQError,))  # type: ignore[untyped-decorator]
def poll(self: Task, *, batch: str, token: str | None = None) -> None:
    """Poll one provider batch (and schedule the next poll)."""
    runner().poll(batch, token)


@app.task(name="llm.batchapi.cancel", bind=True, base=LLMTask, throws=(LLMQError,))  # type: ignore[untyped-decorator]
def cancel(self: Task, *, batch: str) -> dict[str, Any]:
    """Cancel one provider batch; its results so far are still collected."""
    return runner().cancel(batch)
