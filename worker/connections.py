"""Redis connections for llmq's own keys (limits, cache, spend, metrics)."""

from __future__ import annotations

import threading
from typing import Any, cast
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker.settings import Settings

CLIENT_NAME = "llmq"
_clients: dict[tuple[str, str], redis.Redis] = {}
_lock = threading.Lock()


def redis_client(settings: Settings) -> redis.Redis:
    """The process-wide client for REDIS_URL (redis://, rediss://, unix:// or sentinel://)."""
    key = (settings.redis_url, settings.sentinel_master)
    with _lock:
        if key not in _clients:
            _clients[key] = connect(
                settings.redis_url,
                sentinel_master=settings.sentinel_master,
                max_connections=pool_size(settings),
            )
        return _clients[key]


def pool_size(settings: Settings) -> int:
    """Connections one process may open: every worker thread can hold one, with room to spare."""
    # redis-py 8 caps a pool at 100 by default and raises MaxConnectionsError past it,
    # which 200 busy threads reach (the benchmark found it).
    return max(100, 2 * settings.worker_concurrency + 16)


def connect(
    url: str,
    *,
    sentinel_master: str = "mymaster",
    max_connections: int = 100,
    timeout: float | None = None,
) -> redis.Redis:
    """A new client for `url`; sentinel URLs list hosts separated by ';' as kombu does."""
    options: dict[str, Any] = {
        "health_check_interval": 10,
        "socket_keepalive": True,
        "retry_on_timeout": True,
        "max_connections": max_connections,
        # CLIENT LIST (and the round-trip test) tell llmq's connections from Celery's.
        "client_name": CLIENT_NAME,
    }
    if timeout is not None:
        # A one-off check (the start-up checks) must not hang on an unreachable server:
        # bound connecting and each reply, and retry once instead of redis-py's three times.
        options.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, decode_responses=True, **options)
    hosts: list[tuple[str, int]] = []
    password = None
    db = 0
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        hosts.append((parsed.hostname or "localhost", parsed.port or 26379))
        password = unquote(parsed.password) if parsed.password else password
        if parsed.path.strip("/").isdigit():
            db = int(parsed.path.strip("/"))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts, socket_timeout=timeout or 5, password=password
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call]
        sentinel_master, db=db, password=password, decode_responses=True, **options
    )
    return cast(redis.Redis, master)
