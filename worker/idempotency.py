"""Idempotent jobs: a request_id is bound to its first request, and its result kept under it.

Like a payment API's idempotency key: the first job with a (user_id, request_id) binds
that id to the job's fingerprint (everything that decides the answer). The same id with
the same request gets the stored result; with a different request it gets
IdempotencyConflictError and no provider is called. Ids are scoped by user: another
user's request_id finds nothing of theirs. The worker checks and binds in its admission
script (worker/reuse.py); this module names the rules and serves producer-side replays.
"""

from __future__ import annotations

import uuid

import redis

from worker.errors import IdempotencyConflictError
from worker.keyspace import digest, job_keys
from worker.models import CompletionJob, CompletionResult


def task_id_for(job: CompletionJob) -> str:
    """The Celery task id of a job: one per (user, request_id, request), never shared.

    A caller's request_id is not a task id: two users may pick the same one, and a task
    id names a result anyone holding it can read or overwrite.
    """
    return str(uuid.UUID(digest(job.user_id, job.request_id, job.fingerprint())[:32]))


def conflict(job: CompletionJob) -> IdempotencyConflictError:
    """The error for a request_id re-used with a different request."""
    return IdempotencyConflictError(
        f"request_id {job.request_id!r} of user {job.user_id!r} was first used for a different "
        "request (other messages, model or options); an idempotency key stays bound to the "
        "request it was first used with, so nothing was called. Fix: send a new request_id "
        "for a new request, or resend the original request unchanged to get its result."
    )


class IdempotencyStore:
    """Stored results by (user_id, request_id), read the way a replay may read them."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, job: CompletionJob) -> CompletionResult | None:
        """The result of an earlier run of this very request, or None."""
        keys = job_keys(job.user_id, job.request_id)
        bound, raw = self.redis.mget(keys.binding, keys.result)
        if not isinstance(raw, str) or bound != job.fingerprint():
            return None
        return CompletionResult.model_validate_json(raw)
