"""Idempotent jobs: each finished job's result kept under its request_id."""

from __future__ import annotations

import hashlib
import json

import redis

from worker.models import CompletionJob, CompletionResult

PREFIX = "llmq:job"


class IdempotencyStore:
    """Results by (user_id, request_id), so a job that runs again is not paid for again."""

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def _base(self, job: CompletionJob) -> str:
        # Scoped by user: a request_id guessed by another user returns nothing of theirs.
        identity = json.dumps([job.user_id, job.request_id], ensure_ascii=False)
        return f"{PREFIX}:{hashlib.sha256(identity.encode('utf-8')).hexdigest()}"

    def result_key(self, job: CompletionJob) -> str:
        """Where the job's result is kept."""
        return f"{self._base(job)}:result"

    def lock_key(self, job: CompletionJob) -> str:
        """The in-flight marker held while the job runs."""
        return f"{self._base(job)}:running"

    def get(self, job: CompletionJob) -> CompletionResult | None:
        """The result of an earlier run of this request_id, or None."""
        raw = self.redis.get(self.result_key(job))
        return CompletionResult.model_validate_json(raw) if isinstance(raw, str) else None

    def put(self, job: CompletionJob, result: CompletionResult) -> None:
        """Keep `result` for as long as the result backend keeps results."""
        self.redis.set(self.result_key(job), result.model_dump_json(), ex=self.ttl)
