"""The HTTP front a web app puts before the queue: enqueue, poll, health.

Run it with `uvicorn producer.web:app`. It imports no provider SDK.
"""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult
from fastapi import FastAPI, Response, status
from pydantic import BaseModel

from producer import app as celery_app
from producer import submit
from worker.models import CompletionJob
from worker.settings import get_settings

app = FastAPI(title="llmq", summary="LLM completion jobs on Celery.")


class Accepted(BaseModel):
    """A job was enqueued."""

    id: str
    status_url: str


class JobStatus(BaseModel):
    """A job's state, and its result or error once it has one."""

    id: str
    state: str
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None


@app.post("/v1/completions", status_code=status.HTTP_202_ACCEPTED)
def create_completion(job: CompletionJob) -> Accepted:
    """Validate and enqueue a completion job; poll `status_url` for the result."""
    options = job.model_dump(exclude={"messages", "user_id"}, exclude_none=True)
    messages = [m.model_dump() for m in job.messages]
    handle = submit(messages, job.user_id, **options)
    return Accepted(id=handle.id, status_url=f"/v1/jobs/{handle.id}")


@app.get("/v1/jobs/{job_id}")
def get_job(job_id: str) -> JobStatus:
    """The job's state (PENDING also covers unknown ids) and its result or error."""
    handle = AsyncResult(job_id, app=celery_app)
    state = handle.state
    if state == "SUCCESS":
        return JobStatus(id=job_id, state=state, result=handle.result)
    if state == "FAILURE":
        error = handle.result
        return JobStatus(
            id=job_id, state=state, error={"type": type(error).__name__, "message": str(error)}
        )
    return JobStatus(id=job_id, state=state)


@app.get("/health")
def health(response: Response) -> dict[str, Any]:
    """The same report as `llmq health`: 200 when ok, 503 when degraded."""
    from worker.health import report

    data = report(get_settings())
    if data["status"] != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return data
