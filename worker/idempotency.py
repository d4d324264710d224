"""Idempotent jobs: a request_id is bound to its first request, and its result kept under it.

Like a payment API's idempotency key: the first job with a (user_id, request_id) binds
that id to the job's fingerprint (everything that decides the answer). The same id with
the same request gets the stored result; with a different request it gets
IdempotencyConflictError and no provider is called. Ids are scoped by user: another
user's request_id finds nothing of theirs.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import redis

from worker.errors import IdempotencyConflictError, TaskIdConflictError
from worker.models import CompletionJob, CompletionResult

PREFIX = "llmq:job"
TASK_PREFIX = "llmq:task"


def task_id_for(job: CompletionJob) -> str:
    """The Celery task id of a job: one per (user, request_id, request), never shared.

    A caller's request_id is not a task id: two users may pick the same one, and a task
    id names a result anyone holding it can read or overwrite.
    """
    identity = json.dumps([job.user_id, job.request_id, job.fingerprint()], ensure_ascii=True)
    return str(uuid.UUID(hashlib.sha256(identity.encode("ascii")).hexdigest()[:32]))


def _owner(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


class IdempotencyStore:
    """Bindings and results by (user_id, request_id), so a job that runs again is not paid twice."""

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def _base(self, job: CompletionJob) -> str:
        # Scoped by user: a request_id guessed by another user returns nothing of theirs.
        identity = json.dumps([job.user_id, job.request_id], ensure_ascii=True)
        return f"{PREFIX}:{hashlib.sha256(identity.encode('ascii')).hexdigest()}"

    def binding_key(self, job: CompletionJob) -> str:
        """The fingerprint the request_id is bound to."""
        return f"{self._base(job)}:request"

    def result_key(self, job: CompletionJob) -> str:
        """Where the job's result is kept."""
        return f"{self._base(job)}:result"

    def lock_key(self, job: CompletionJob) -> str:
        """The in-flight marker held while the job runs."""
        return f"{self._base(job)}:running"

    def bind(self, job: CompletionJob, *, task_id: str | None = None) -> None:
        """Bind the request_id to this request (and the task id to this user), or raise.

        A sender that picks its own task ids could reuse another user's: that user's
        stored result must not be overwritten, so the task id's first user owns it.
        """
        fingerprint = job.fingerprint()
        owner_key = f"{TASK_PREFIX}:{task_id}:owner"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.binding_key(job), fingerprint, nx=True, ex=self.ttl)
            pipe.get(self.binding_key(job))
            if task_id:
                pipe.set(owner_key, _owner(job.user_id), nx=True, ex=self.ttl)
                pipe.get(owner_key)
            replies = pipe.execute()
        if task_id and replies[3] is not None and replies[3] != _owner(job.user_id):
            raise TaskIdConflictError(
                f"task id {task_id!r} was first used by another user; this job was not run "
                "and that user's result is untouched. Fix: give every job its own task id "
                "(llmq's submit() derives one from user_id and request_id)."
            )
        if replies[1] is not None and replies[1] != fingerprint:
            raise conflict(job)

    def get(self, job: CompletionJob) -> CompletionResult | None:
        """The result of an earlier run of this very request, or None."""
        bound, raw = self.redis.mget(self.binding_key(job), self.result_key(job))
        if not isinstance(raw, str) or bound != job.fingerprint():
            return None
        return CompletionResult.model_validate_json(raw)

    def put(self, job: CompletionJob, result: CompletionResult) -> None:
        """Keep `result` (and the binding) for as long as the result backend keeps results."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.binding_key(job), job.fingerprint(), ex=self.ttl)
            pipe.set(self.result_key(job), result.model_dump_json(), ex=self.ttl)
            pipe.execute()


def conflict(job: CompletionJob) -> IdempotencyConflictError:
    """The error for a request_id re-used with a different request."""
    return IdempotencyConflictError(
        f"request_id {job.request_id!r} of user {job.user_id!r} was first used for a different "
        "request (other messages, model or options); an idempotency key stays bound to the "
        "request it was first used with, so nothing was called. Fix: send a new request_id "
        "for a new request, or resend the original request unchanged to get its result."
    )
