"""What a worker checks in Redis at start-up: no eviction, persistence; then it joins the fleet.

A Redis that evicts keys silently drops queued jobs, results, budgets and rate-limit
windows, so a worker refuses to start on one (unless LLM_ALLOW_EVICTING_REDIS accepts
the risk). A Redis without persistence loses the same state on a restart; that is a
deployment choice, so it is a warning. The policy is read with `INFO memory`, which
managed Redis services allow where CONFIG is disabled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import redis

from worker.errors import ConfigurationError
from worker.settings import Settings

CHECK_TIMEOUT_SECONDS = 5.0
SAFE_POLICY = "noeviction"

logger = logging.getLogger("llmq.redis")

# What each use of Redis keeps there: what an evicting or restarted Redis loses.
BROKER_STATE = "queued and unacknowledged jobs"
BACKEND_STATE = "job results"
LLMQ_STATE = (
    "daily spend and budget reservations, rate-limit windows, circuit-breaker state, "
    "the response cache and idempotency records"
)


@dataclass
class Target:
    """One Redis server and what llmq keeps on it."""

    url: str
    where: str
    variables: list[str] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)

    @property
    def named(self) -> str:
        """The server with the variables that point at it, e.g. `127.0.0.1:6379 (REDIS_URL)`."""
        return f"Redis at {self.where} ({', '.join(self.variables)})"


@dataclass(frozen=True)
class Facts:
    """What a Redis server says about eviction and persistence; None where it would not say."""

    policy: str | None = None
    maxmemory: int | None = None
    aof_enabled: bool | None = None
    rdb_save: str | None = None
    policy_error: str | None = None
    persistence_error: str | None = None


@dataclass(frozen=True)
class Notice:
    """A start-up warning, logged once the worker's JSON logging is configured."""

    event: str
    message: str
    fields: dict[str, Any]


def where(url: str, *, sentinel_master: str = "mymaster") -> str:
    """The server a URL points at, never its credentials: host:port, a socket or the sentinels."""
    if url.startswith("sentinel://"):
        hosts = [urlparse(part.strip()) for part in url.split(";") if part.strip()]
        addresses = ",".join(f"{h.hostname}:{h.port or 26379}" for h in hosts)
        return f"sentinel master {sentinel_master!r} via {addresses}"
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return f"unix socket {parsed.path}"
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"


def targets(settings: Settings) -> list[Target]:
    """The Redis servers a worker uses (broker, result backend, llmq's state), each once."""
    uses = [
        (
            settings.broker,
            "CELERY_BROKER_URL" if settings.broker_url else "REDIS_URL",
            BROKER_STATE,
        ),
        (
            settings.backend,
            "CELERY_RESULT_BACKEND" if settings.result_backend else "REDIS_URL",
            BACKEND_STATE,
        ),
        (settings.redis_url, "REDIS_URL", LLMQ_STATE),
    ]
    found: dict[str, Target] = {}
    for url, variable, holds in uses:
        # Eviction and persistence are settings of the server, not of a database in it.
        server = where(url, sentinel_master=settings.sentinel_master)
        target = found.setdefault(server, Target(url=url, where=server))
        if variable not in target.variables:
            target.variables.append(variable)
        target.holds.append(holds)
    return list(found.values())


def _scrub(text: str, url: str) -> str:
    """`text` without any password the URL carries (redis errors may quote what they got)."""
    for part in url.split(";"):
        password = urlparse(part.strip()).password
        for secret in {password, unquote(password)} if password else set():
            text = text.replace(secret, "***")
    return text.strip()


def inspect(target: Target, settings: Settings) -> Facts:
    """Ask the server for its eviction policy and persistence, with a bounded wait."""
    from worker.connections import connect

    try:
        client = connect(
            target.url,
            sentinel_master=settings.sentinel_master,
            max_connections=2,
            timeout=CHECK_TIMEOUT_SECONDS,
        )
    except (redis.RedisError, OSError, ValueError) as exc:
        error = _scrub(f"{type(exc).__name__}: {exc}", target.url)
        return Facts(policy_error=error, persistence_error=error)
    try:
        try:
            memory: dict[str, Any] = client.info("memory")
            policy = memory.get("maxmemory_policy")
            maxmemory = memory.get("maxmemory")
            policy_error = None if policy else "INFO memory has no maxmemory_policy"
        except (redis.RedisError, OSError) as exc:
            policy, maxmemory = None, None
            policy_error = _scrub(f"{type(exc).__name__}: {exc}", target.url)
        aof: bool | None = None
        save: str | None = None
        persistence_error = None
        try:
            persistence: dict[str, Any] = client.info("persistence")
            aof = bool(int(persistence.get("aof_enabled", 0)))
            # CONFIG is often disabled on managed Redis: then RDB cannot be known.
            configured: dict[str, str] = client.config_get("save")  # type: ignore[assignment]
            save = configured.get("save", "").strip()
        except (redis.RedisError, OSError) as exc:
            persistence_error = _scrub(f"{type(exc).__name__}: {exc}", target.url)
        return Facts(
            policy=str(policy) if policy else None,
            maxmemory=int(maxmemory) if maxmemory is not None else None,
            aof_enabled=aof,
            rdb_save=save,
            policy_error=policy_error,
            persistence_error=persistence_error,
        )
    finally:
        client.close()


def _eviction_problem(target: Target, facts: Facts, *, accepted: bool) -> str:
    limit = (
        f"maxmemory {facts.maxmemory} bytes"
        if facts.maxmemory
        else "maxmemory 0: no limit now, but the policy applies as soon as one is set"
    )
    return (
        f"{target.named} has maxmemory-policy {facts.policy} ({limit}). A full Redis with "
        f"this policy deletes keys to make room, silently losing {'; '.join(target.holds)} "
        "(every policy but noeviction evicts: the volatile-* ones take the budget and "
        "rate-limit keys, which have TTLs). Fix: run `CONFIG SET maxmemory-policy noeviction` "
        "and put `maxmemory-policy noeviction` in redis.conf (on a managed Redis, in its "
        "parameter group)"
        + (
            ". LLM_ALLOW_EVICTING_REDIS=true accepts the risk: starting anyway."
            if accepted
            else ", or set LLM_ALLOW_EVICTING_REDIS=true to accept the risk."
        )
    )


def _fields(target: Target, facts: Facts) -> dict[str, Any]:
    return {
        "redis": target.where,
        "variables": target.variables,
        "maxmemory_policy": facts.policy,
        "aof_enabled": facts.aof_enabled,
        "rdb_save": facts.rdb_save,
    }


def _persistence_notice(target: Target, facts: Facts) -> Notice | None:
    lost = f"a restart of it loses {'; '.join(target.holds)}"
    fix = (
        "Fix: `CONFIG SET appendonly yes` and `appendonly yes` in redis.conf (or RDB "
        "snapshots with `save`, which lose what changed since the last one)."
    )
    if facts.aof_enabled or facts.rdb_save:
        return None
    if facts.aof_enabled is None or facts.rdb_save is None:
        why = facts.persistence_error or "unknown"
        state = "AOF is off" if facts.aof_enabled is False else "AOF could not be read"
        return Notice(
            event="redis_persistence_unknown",
            message=(
                f"{target.named}: persistence could not be determined ({state}; "
                f"{why}). If RDB snapshots are off too, {lost}. {fix}"
            ),
            fields={**_fields(target, facts), "error": why},
        )
    return Notice(
        event="redis_not_persistent",
        message=(
            f'{target.named} has no persistence (appendonly no, save ""): {lost}; users '
            f"can spend their daily budget again and rate limits start afresh. {fix}"
        ),
        fields=_fields(target, facts),
    )


def check(settings: Settings) -> list[Notice]:
    """Refuse an evicting Redis (ConfigurationError); return the warnings to log."""
    notices: list[Notice] = []
    refusals: list[str] = []
    for target in targets(settings):
        facts = inspect(target, settings)
        if facts.policy is None:
            notices.append(
                Notice(
                    event="redis_policy_unknown",
                    message=(
                        f"{target.named}: maxmemory-policy could not be read "
                        f"({facts.policy_error}); starting anyway. llmq needs "
                        "maxmemory-policy noeviction: an evicting Redis silently loses "
                        f"{'; '.join(target.holds)}."
                    ),
                    fields={**_fields(target, facts), "error": facts.policy_error},
                )
            )
        elif facts.policy != SAFE_POLICY:
            if settings.allow_evicting_redis:
                notices.append(
                    Notice(
                        event="redis_eviction_accepted",
                        message=_eviction_problem(target, facts, accepted=True),
                        fields=_fields(target, facts),
                    )
                )
            else:
                refusals.append(_eviction_problem(target, facts, accepted=False))
        notice = _persistence_notice(target, facts)
        if notice is not None:
            notices.append(notice)
    if refusals:
        raise ConfigurationError("Redis would evict llmq's keys:\n  " + "\n  ".join(refusals))
    return notices


def prepare_worker(settings: Settings) -> None:
    """At worker_init: check Redis; once the worker is ready, warn and join the fleet."""
    from celery import signals

    from worker import fleet
    from worker.connections import redis_client

    notices = check(settings)
    heartbeat = fleet.Heartbeat(
        client=redis_client(settings),
        fingerprint=fleet.Fingerprint.of(settings),
        interval=settings.fleet_heartbeat_seconds,
    )

    # worker_init comes before Celery's setup_logging: records logged now would not be
    # JSON, so they wait for worker_ready.
    def ready(sender: Any = None, **_: Any) -> None:
        for notice in notices:
            logger.warning(notice.message, extra={"event": notice.event, **notice.fields})
        queues = list(sender.app.amqp.queues.consume_from) if sender is not None else []
        heartbeat.start(name=str(getattr(sender, "hostname", "") or "worker"), queues=queues)

    def shutdown(**_: Any) -> None:
        heartbeat.stop()

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
