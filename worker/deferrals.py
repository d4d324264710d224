"""Deferred jobs, as their sender sees them: which limit each waits on and when it frees.

A deferred job sits in the deferred queue under a countdown, invisible to the result
backend (Celery stores nothing until it runs again). The worker notes every deferral in a
per-user hash, so `llmq summarize` can say what it is waiting for instead of a frozen bar.
Only deferrals write here: the hot path of a job that is not limited never touches it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis

from worker import keyspace

# A deferral older than this is of no interest to anyone watching a run.
RETENTION_SECONDS = 24 * 3600


@dataclass(frozen=True, kw_only=True)
class Deferral:
    """One job's latest deferral."""

    task_id: str
    request_id: str
    limit: str
    # Redis time (epoch seconds) of the first deferral, and when the job runs again.
    since: float
    frees_at: float
    count: int

    @property
    def waited_s(self) -> float:
        """How long the job will have waited when it runs again."""
        return max(0.0, self.frees_at - self.since)


class DeferralLog:
    """Read and write one Redis's deferral notes, by user."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def record(self, user_id: str, deferral: Deferral) -> None:
        """Note a deferral (the job's earlier note is replaced)."""
        key = keyspace.deferrals(user_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, deferral.task_id, json.dumps(asdict(deferral)))
            pipe.expire(key, RETENTION_SECONDS)
            pipe.execute()

    def of(self, user_id: str, *, since: float = 0.0) -> list[Deferral]:
        """The user's deferrals first made at or after `since` (epoch seconds)."""
        raw = self.client.hgetall(keyspace.deferrals(user_id))
        found: list[Deferral] = []
        for value in raw.values():
            try:
                deferral = Deferral(**json.loads(value))
            except (TypeError, ValueError):
                continue  # a note from another version: not worth failing a progress bar
            if deferral.since >= since:
                found.append(deferral)
        return found


@dataclass(frozen=True, kw_only=True)
class Waiting:
    """What a set of jobs is waiting on right now."""

    jobs: int
    limit: str
    frees_in_s: float

    def describe(self) -> str:
        """E.g. `waiting: 3 on user_tokens, frees in 57m`."""
        return f"waiting: {self.jobs} on {self.limit}, frees in {format_duration(self.frees_in_s)}"


def waiting(deferrals: list[Deferral], *, now: float | None = None) -> Waiting | None:
    """The jobs still deferred at `now`, the limit most of them wait on, and when it frees."""
    now = time.time() if now is None else now
    pending = [d for d in deferrals if d.frees_at > now]
    if not pending:
        return None
    limits: dict[str, list[Deferral]] = {}
    for deferral in pending:
        limits.setdefault(deferral.limit, []).append(deferral)
    limit, jobs = max(limits.items(), key=lambda item: len(item[1]))
    return Waiting(jobs=len(pending), limit=limit, frees_in_s=min(d.frees_at for d in jobs) - now)


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m 20s, 57m, 1h 05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 10:
        return f"{minutes}m {secs:02d}s"
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
