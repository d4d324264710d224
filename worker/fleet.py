"""The fleet's money fingerprints: a worker charging by other prices or rules shows up.

Each worker hashes what decides what a job is charged (its merged price table and the
money settings) and publishes the hash in one Redis hash, `llmq:fleet`, refreshed
every LLM_FLEET_HEARTBEAT_SECONDS. Entries carry the Redis time they were written,
so a reader on any machine tells live workers from dead ones without trusting its
own clock; a worker that stops cleanly removes its entry, a killed one drops out
after three missed heartbeats. `llmq health` reports a mixed fleet when the live
workers disagree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis

from worker.settings import Settings

KEY = "llmq:fleet"
# A worker is gone once this many heartbeats in a row are missing.
MISSED_HEARTBEATS = 3
DIGEST_CHARS = 12

logger = logging.getLogger("llmq.fleet")

# KEYS: the fleet hash. ARGV: worker name, its entry (JSON), seconds it stays live.
# Each value is "<redis time> <live seconds> <entry>": the time is the server's, so
# every reader judges staleness by one clock. Entries no longer live are dropped.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', now) .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local longest = tonumber(ARGV[3])
for i = 1, #all, 2 do
  local seen, live = string.match(all[i + 1], '^(%S+) (%S+) ')
  if seen == nil or tonumber(seen) + tonumber(live) < now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif tonumber(live) > longest then
    longest = tonumber(live)
  end
end
redis.call('EXPIRE', KEYS[1], math.ceil(longest))
return 1
"""


def _canonical(value: Any) -> Any:
    """JSON-ready and formatting-blind: 0.150 and 0.15 are the same price."""
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, float):
        return format(Decimal(str(value)).normalize(), "f")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _digest(value: Any) -> str:
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def money_inputs(settings: Settings) -> dict[str, Any]:
    """Everything that decides what a worker charges a job, by component."""
    from worker.guard import NON_OPENAI_MARGIN
    from worker.prices import load_prices

    prices = load_prices(settings.prices_file, unknown=settings.unknown_model_pricing)
    return {
        # The merged table as data, not the file's bytes: a reformatted file is the same.
        "prices": {name: price.model_dump() for name, price in prices.models.items()},
        "max_cost_per_request": settings.max_cost_per_request,
        "user_daily_budget_usd": settings.user_daily_budget_usd,
        "unknown_model_pricing": settings.unknown_model_pricing,
        "spend_namespace": settings.spend_namespace,
        # A job that names no model is charged at its worker's default for the provider.
        "default_models": {name: settings.model_for(name) for name in settings.chain},
        # retry_larger pays for a second, larger answer.
        "truncation": {
            "policy": settings.on_truncation,
            "retry_factor": settings.truncation_retry_factor,
        },
        "estimate_margin": NON_OPENAI_MARGIN,
    }


@dataclass(frozen=True)
class Fingerprint:
    """A worker's money fingerprint: one sha256, and one per component to tell what differs."""

    digest: str
    components: dict[str, str]
    prices_as_of: str
    prices_sources: list[str]

    @classmethod
    def of(cls, settings: Settings) -> Fingerprint:
        """The fingerprint of `settings` and the price files they name."""
        from worker.prices import load_prices

        inputs = money_inputs(settings)
        prices = load_prices(settings.prices_file, unknown=settings.unknown_model_pricing)
        return cls(
            digest=_digest(inputs),
            components={name: _digest(value)[:DIGEST_CHARS] for name, value in inputs.items()},
            prices_as_of=prices.as_of,
            prices_sources=list(prices.sources),
        )


@dataclass
class Heartbeat:
    """Publishes one worker's fingerprint while it runs; removes it when the worker stops."""

    client: redis.Redis
    fingerprint: Fingerprint
    interval: float
    name: str = ""
    queues: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _failing: bool = field(default=False, init=False)

    @property
    def live_seconds(self) -> float:
        """How long an entry counts as live without a refresh."""
        return self.interval * MISSED_HEARTBEATS

    def entry(self) -> dict[str, Any]:
        """What this worker publishes about itself."""
        return {
            "fingerprint": self.fingerprint.digest,
            "components": self.fingerprint.components,
            "prices_as_of": self.fingerprint.prices_as_of,
            "prices_sources": self.fingerprint.prices_sources,
            "queues": sorted(self.queues),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat_seconds": self.interval,
        }

    def beat(self) -> None:
        """Publish the entry now, with Redis's time."""
        self.client.eval(
            _BEAT, 1, KEY, self.name, json.dumps(self.entry()), f"{self.live_seconds:.3f}"
        )

    def start(self, *, name: str, queues: list[str]) -> None:
        """Publish at once, then refresh every `interval` seconds from a daemon thread."""
        if self._thread is not None:
            return
        self.name, self.queues = name, queues
        self._safe_beat()
        self._thread = threading.Thread(target=self._run, name="llmq-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and remove the entry: a stopped worker is not part of the fleet."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.name:
            try:
                self.client.hdel(KEY, self.name)
            except redis.RedisError as exc:
                logger.warning("fleet entry of %s not removed (it expires): %s", self.name, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._safe_beat()

    def _safe_beat(self) -> None:
        # Redis away (a restart, a failover) must not stop the worker; say so once.
        try:
            self.beat()
        except redis.RedisError as exc:
            if not self._failing:
                logger.warning(
                    "fleet fingerprint not published: %s",
                    exc,
                    extra={"event": "fleet_heartbeat_failed", "worker": self.name},
                )
            self._failing = True
        else:
            self._failing = False


def live_workers(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """The entries of workers whose last heartbeat is recent, by worker name."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(KEY)
    (seconds, micros), entries = pipe.execute()
    now = seconds + micros / 1_000_000
    live: dict[str, dict[str, Any]] = {}
    for name, value in sorted(entries.items()):
        if isinstance(name, bytes):
            name, value = name.decode(), value.decode()
        seen, live_for, entry = value.split(" ", 2)
        if float(seen) + float(live_for) < now:
            continue
        record: dict[str, Any] = json.loads(entry)
        record["last_seen_seconds_ago"] = round(max(0.0, now - float(seen)), 3)
        live[name] = record
    return live


def report(client: redis.Redis) -> dict[str, Any]:
    """The live workers' fingerprints, and whether they disagree and on what."""
    workers = live_workers(client)
    by_digest: dict[str, list[str]] = {}
    for name, entry in workers.items():
        by_digest.setdefault(entry["fingerprint"], []).append(name)
    components = [entry.get("components", {}) for entry in workers.values()]
    differing = sorted(
        {name for c in components for name in c if len({d.get(name) for d in components}) > 1}
    )
    return {
        "workers": workers,
        "fingerprints": {digest[:DIGEST_CHARS]: names for digest, names in by_digest.items()},
        "mixed": len(by_digest) > 1,
        "differing": differing,
    }


def mixed_reason(fleet: dict[str, Any]) -> str:
    """The health reason for a fleet whose workers charge by different rules."""
    groups = "; ".join(
        f"{digest}: {', '.join(names)}" for digest, names in fleet["fingerprints"].items()
    )
    return (
        f"mixed fleet: {len(fleet['fingerprints'])} different money fingerprints among "
        f"{len(fleet['workers'])} live workers ({groups}), differing in "
        f"{', '.join(fleet['differing']) or 'unknown components'}: the same job is charged "
        "differently depending on which worker runs it. Fix: give every worker the same "
        "LLM_PRICES_FILE contents and money settings (README: Mixed fleets)."
    )
