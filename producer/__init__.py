"""The producer side: enqueue completion jobs without importing any provider SDK."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, overload

from celery.result import AsyncResult
from pydantic import BaseModel, ValidationError

from producer.cached import CachedResult, lookup
from producer.messages import job_messages
from producer.structured import ParsedResult, response_format_for, strict_schema
from worker.app import app
from worker.constants import COMPLETE_TASK, QUEUE
from worker.idempotency import task_id_for
from worker.models import CompletionJob, ReasoningEffort, Thinking

__all__ = ["CachedResult", "ParsedResult", "app", "strict_schema", "submit"]

M = TypeVar("M", bound=BaseModel)


@overload
def submit(
    messages: Sequence[Any],
    user_id: str,
    *,
    response_model: type[M],
    queue: str = ...,
    countdown: float | None = ...,
    check_cache: bool = ...,
    model: str | None = ...,
    temperature: float | None = ...,
    max_tokens: int | None = ...,
    request_id: str | None = ...,
    cache: bool | None = ...,
    trim: bool = ...,
    on_truncation: Literal["fail", "retry_larger", "accept"] | None = ...,
    on_limit: Literal["fail", "defer"] | None = ...,
    stop: str | list[str] | None = ...,
    seed: int | None = ...,
    top_p: float | None = ...,
    presence_penalty: float | None = ...,
    frequency_penalty: float | None = ...,
    reasoning_effort: ReasoningEffort | None = ...,
    thinking: Thinking | dict[str, int] | None = ...,
    response_format: None = ...,
    user: str | None = ...,
    metadata: dict[str, str] | None = ...,
    tools: list[dict[str, Any]] | None = ...,
    tool_choice: str | dict[str, Any] | None = ...,
    parallel_tool_calls: bool | None = ...,
) -> ParsedResult[M]: ...


@overload
def submit(
    messages: Sequence[Any],
    user_id: str,
    *,
    response_model: None = ...,
    queue: str = ...,
    countdown: float | None = ...,
    check_cache: bool = ...,
    model: str | None = ...,
    temperature: float | None = ...,
    max_tokens: int | None = ...,
    request_id: str | None = ...,
    cache: bool | None = ...,
    trim: bool = ...,
    on_truncation: Literal["fail", "retry_larger", "accept"] | None = ...,
    on_limit: Literal["fail", "defer"] | None = ...,
    stop: str | list[str] | None = ...,
    seed: int | None = ...,
    top_p: float | None = ...,
    presence_penalty: float | None = ...,
    frequency_penalty: float | None = ...,
    reasoning_effort: ReasoningEffort | None = ...,
    thinking: Thinking | dict[str, int] | None = ...,
    response_format: dict[str, Any] | None = ...,
    user: str | None = ...,
    metadata: dict[str, str] | None = ...,
    tools: list[dict[str, Any]] | None = ...,
    tool_choice: str | dict[str, Any] | None = ...,
    parallel_tool_calls: bool | None = ...,
) -> AsyncResult | CachedResult: ...


def submit(
    messages: Sequence[Any],
    user_id: str,
    *,
    response_model: type[M] | None = None,
    queue: str = QUEUE,
    countdown: float | None = None,
    check_cache: bool = True,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    request_id: str | None = None,
    cache: bool | None = None,
    trim: bool = False,
    on_truncation: Literal["fail", "retry_larger", "accept"] | None = None,
    on_limit: Literal["fail", "defer"] | None = None,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    top_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    reasoning_effort: ReasoningEffort | None = None,
    thinking: Thinking | dict[str, int] | None = None,
    response_format: dict[str, Any] | None = None,
    user: str | None = None,
    metadata: dict[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> ParsedResult[M] | AsyncResult | CachedResult:
    """Enqueue an `llm.complete` job; every option is the job field of the same name
    (README, "Job reference"), sent only when given.

    `response_model` (a Pydantic model) asks for answers in its strict JSON schema and
    returns a `ParsedResult`, whose `get_parsed()` gives an instance of it.

    Unless `check_cache=False`, a job whose answer is already known comes back resolved
    and is not sent: a cacheable job found in the response cache, or a re-submitted
    request_id whose result is stored (for the same user and the same request).
    """
    if response_model is not None:
        response_format = response_format_for(response_model)
    fields: dict[str, Any] = {
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "cache": cache,
        "trim": trim or None,
        "on_truncation": on_truncation,
        "on_limit": on_limit,
        "stop": stop,
        "seed": seed,
        "top_p": top_p,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "reasoning_effort": reasoning_effort,
        "thinking": thinking.model_dump() if isinstance(thinking, Thinking) else thinking,
        "response_format": response_format,
        "user": user,
        "metadata": metadata,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel_tool_calls,
    }
    # What was not given is not sent: the worker's defaults apply, as for any producer.
    options = {name: value for name, value in fields.items() if value is not None}
    # A caller's own request_id may be a retry of an earlier submission.
    replay = request_id is not None
    options["request_id"] = request_id if request_id is not None else uuid.uuid4().hex
    kwargs = {"messages": job_messages(messages), "user_id": user_id, **options}
    handle = _send(kwargs, queue=queue, countdown=countdown, check_cache=check_cache, replay=replay)
    return handle if response_model is None else ParsedResult(handle, response_model)


def _send(
    kwargs: dict[str, Any], *, queue: str, countdown: float | None, check_cache: bool, replay: bool
) -> AsyncResult | CachedResult:
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
