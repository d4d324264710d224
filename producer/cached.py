"""Producer-side cache hits: an answer already in the cache, returned without enqueueing."""

from __future__ import annotations

import time
from typing import Any

import redis

from worker.cache import ResponseCache, cache_request, served_from_cache
from worker.connections import redis_client
from worker.errors import LLMQError
from worker.idempotency import IdempotencyStore
from worker.models import CompletionJob
from worker.prices import load_prices
from worker.settings import Settings, get_settings


class CachedResult:
    """A job answered from the cache, with the interface of Celery's `AsyncResult`."""

    state = status = "SUCCESS"
    traceback = None

    def __init__(self, task_id: str, result: dict[str, Any]) -> None:
        self.id = self.task_id = task_id
        self.result = self.info = result

    def get(self, timeout: float | None = None, propagate: bool = True, **_: Any) -> Any:
        """The result, at once."""
        return self.result

    wait = get

    def ready(self) -> bool:
        """Always True: nothing is pending."""
        return True

    def successful(self) -> bool:
        """Always True: only complete answers are cached."""
        return True

    def failed(self) -> bool:
        """Always False."""
        return False

    def forget(self) -> None:
        """Nothing to forget: no message was sent."""

    def __repr__(self) -> str:
        return f"<CachedResult: {self.id}>"


def lookup(
    job: CompletionJob,
    *,
    task_id: str,
    replay: bool = False,
    settings: Settings | None = None,
) -> CachedResult | None:
    """The stored result of this very request (when `replay`), or the cached answer to
    `job`; None means: enqueue it.
    """
    started = time.perf_counter()
    settings = settings or get_settings()
    try:
        request = cache_request(job, settings=settings, prices=load_prices(settings.prices_file))
    except LLMQError:
        return None  # the worker rejects it with a message saying what to fix
    client = redis_client(settings)
    try:
        if replay and (stored := IdempotencyStore(client).get(job)) is not None:
            return CachedResult(task_id, stored.model_dump())
        if request is None:
            return None
        # One round trip: the entry, counted as a hit when found.
        stored = ResponseCache.from_settings(settings).lookup(request)
        if stored is None:
            return None  # the worker's own lookup counts the miss
    except redis.RedisError:
        return None
    result = served_from_cache(
        stored, request_id=job.request_id, latency_ms=(time.perf_counter() - started) * 1000
    )
    return CachedResult(task_id, result.model_dump())
