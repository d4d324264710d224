"""The batch-API tasks: start a run, submit a round, poll a batch, cancel one.

Polls are Celery tasks sent with a countdown, so no process stays up for the 24 h a
provider may take; each is idempotent (a lock per batch, and a token that retires an
older chain of polls), so a redelivered one does no harm.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.app import app
from worker.batchapi.runner import BatchRunner, RunOptions
from worker.constants import BATCH_QUEUE
from worker.errors import InvalidJobError, LLMQError
from worker.tasks import LLMTask, pipeline

_runner: BatchRunner | None = None
_lock = threading.Lock()


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(min_length=1, max_length=200)
    id: str = Field(min_length=1, max_length=2000)
    text: str


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str = Field(min_length=1, max_length=200)
    words: int = Field(ge=5, le=5000)
    model: str | None = Field(None, min_length=1, max_length=200)
    chunk_tokens: int | None = Field(None, ge=64, le=2_000_000)


class _Start(BaseModel):
    """`llm.batchapi.start` kwargs, checked strictly before anything is claimed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    documents: list[_Document] = Field(min_length=1, max_length=1_000_000)
    options: _Options


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
def start(self: Task, **raw: Any) -> dict[str, Any]:
    """Claim the documents, plan and submit the run's first round; returns who owns what."""
    try:
        job = _Start.model_validate(raw)
    except ValidationError as exc:
        # pydantic's own text quotes the input, which may be document text.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidJobError(f"invalid llm.batchapi.start job: {problems}") from None
    # The task id survives redelivery: a re-delivered start resumes the same run.
    return runner().start(
        str(self.request.id),
        [d.model_dump() for d in job.documents],
        RunOptions(**job.options.model_dump()),
    )


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
