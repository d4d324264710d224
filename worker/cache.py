"""The response cache: exact-match answers in Redis, keyed by everything that shapes them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import redis

from worker.keyspace import CACHE, CacheKeys
from worker.models import CompletionJob, CompletionResult
from worker.prices import PriceTable
from worker.scripts import Part, scripts_for
from worker.settings import CACHE_VERSION_PATTERN, Settings

PREFIX = CACHE

# Job fields that never change the answer; every other field is part of the key, so a
# sampling option added to CompletionJob later can only split the cache, never collide.
# `metadata` (log tags) and `user` (the end user, for the provider's abuse checks) do not
# change the answer either: users share answers as they share any other cached one.
NOT_IN_KEY = frozenset(
    {"user_id", "request_id", "cache", "messages", "model", "max_tokens", "metadata", "user"}
)


@dataclass(frozen=True, kw_only=True)
class CacheRequest:
    """A cacheable job reduced to what decides its answer, and the key derived from it."""

    provider: str
    model: str
    max_tokens: int
    temperature: float
    digest: str


def cache_request(
    job: CompletionJob, *, settings: Settings, prices: PriceTable
) -> CacheRequest | None:
    """The job's cache identity, or None when it must not be cached.

    Producers and workers both call this, so a producer-side lookup finds exactly the
    entry a worker stored: the model is the job's or the primary provider's default,
    max_tokens the job's or LLM_MAX_TOKENS capped by the model's maximum output.
    """
    temperature = float(settings.temperature if job.temperature is None else job.temperature)
    if not settings.cache_enabled or job.cache is False:
        return None
    if job.cache is None and temperature != 0.0:
        return None
    if job.tools and temperature != 0.0:
        # A tool call is an action, not a text: replayed only when it is deterministic.
        return None
    model = job.model or settings.model_for(settings.provider)
    price = prices.get(model)
    max_tokens = min(job.max_tokens or settings.max_tokens, price.max_output_tokens)
    fields: dict[str, Any] = {
        # The schema is in here (response_format): another schema is another answer.
        **job.options_dump(exclude=NOT_IN_KEY),
        "provider": price.provider,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "messages": [m.wire() for m in job.messages],
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return CacheRequest(
        provider=price.provider,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        digest=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    )


def storable(result: CompletionResult) -> bool:
    """Only a complete answer may be served again: finished with `stop` (or with tool
    calls, which only a temperature-0 job with the same tools can look up), not truncated."""
    if result.finish_reason == "tool_calls":
        return bool(result.tool_calls) and not result.truncated
    return result.finish_reason == "stop" and not result.truncated and bool(result.text)


def served_from_cache(
    stored: CompletionResult,
    *,
    request_id: str,
    latency_ms: float,
    queue_wait_ms: float | None = None,
) -> CompletionResult:
    """A stored answer as this request's result: `cached`, free, no provider attempts."""
    return stored.model_copy(
        update={
            "request_id": request_id,
            "cached": True,
            "cost_usd": 0.0,
            "latency_ms": round(latency_ms, 3),
            "queue_wait_ms": queue_wait_ms,
            "attempts": 0,
        }
    )


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    """What `llmq cache stats` reports for one cache version (or all of them)."""

    version: str | None
    entries: int
    bytes: int
    hits: int
    misses: int
    saved_usd: float

    @property
    def hit_rate(self) -> float:
        """Hits over lookups, 0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, hit rate included."""
        return {
            "version": self.version,
            "entries": self.entries,
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hit_rate, 6),
            "saved_usd": round(self.saved_usd, 10),
        }


class ResponseCache:
    """Complete answers under `llmq:cache:<version>:entry:<sha256>`, with hit statistics."""

    def __init__(self, client: redis.Redis | None = None, *, version: str, ttl: int) -> None:
        self._client = client
        self.version = version
        self.ttl = ttl
        self.keys = CacheKeys(version=version)

    @property
    def redis(self) -> redis.Redis:
        """The client for reads and writes outside the pipeline's scripts."""
        if self._client is None:
            raise RuntimeError("this ResponseCache has no Redis client; build it with one")
        return self._client

    @classmethod
    def from_settings(cls, settings: Settings) -> ResponseCache:
        """The cache of LLM_CACHE_VERSION on REDIS_URL."""
        from worker.connections import redis_client

        return cls(redis_client(settings), version=settings.cache_version, ttl=settings.cache_ttl)

    def entry_key(self, request: CacheRequest) -> str:
        """The Redis key of the answer to `request`."""
        return self.keys.entry(request.digest)

    def lock_key(self, request: CacheRequest) -> str:
        """The single-flight lease of `request`."""
        return self.keys.lease(request.digest)

    @property
    def stats_key(self) -> str:
        """Hits, misses and saved USD of this version."""
        return self.keys.stats

    def _stats_key(self, version: str) -> str:
        return CacheKeys(version=version).stats

    def storable_for(self, request: CacheRequest, result: CompletionResult) -> bool:
        """Whether `result` may answer `request` again: complete, and from the model it names."""
        return storable(result) and (result.provider, result.model) == (
            request.provider,
            request.model,
        )

    def get(self, request: CacheRequest) -> CompletionResult | None:
        """The stored answer, or None; does not count as a hit or miss."""
        raw = self.redis.get(self.entry_key(request))
        return CompletionResult.model_validate_json(raw) if isinstance(raw, str) else None

    def lookup(self, request: CacheRequest) -> CompletionResult | None:
        """The stored answer, counted as a hit, in one round trip; None (uncounted) if absent."""
        reply = scripts_for(self.redis).run(
            Part("cache_lookup", [self.entry_key(request), self.stats_key])
        )
        return CompletionResult.model_validate_json(reply[0]) if reply else None

    def put(self, request: CacheRequest, result: CompletionResult) -> bool:
        """Store `result` if it is complete and came from the model the key names (no fallback)."""
        if not self.storable_for(request, result):
            return False
        self.redis.set(self.entry_key(request), result.model_dump_json(), ex=self.ttl)
        return True

    def record_hit(self, saved_usd: float) -> None:
        """Count a lookup answered from the cache and the provider cost it avoided."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.stats_key, "hits", 1)
            pipe.hincrbyfloat(self.stats_key, "saved_usd", saved_usd)
            pipe.execute()

    def record_miss(self) -> None:
        """Count a lookup that had to call the provider."""
        self.redis.hincrby(self.stats_key, "misses", 1)

    def stats(self, version: str | None = None) -> CacheStats:
        """Entries, bytes and counters of `version`, or of every version when None."""
        entries = size = 0
        pattern = f"{PREFIX}:{_scan_version(version)}:entry:*"
        for batch in _batches(self.redis.scan_iter(match=pattern, count=500)):
            with self.redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.strlen(key)
                lengths = pipe.execute()
            entries += sum(1 for n in lengths if n)
            size += sum(int(n) for n in lengths)
        hits = misses = 0
        saved = 0.0
        for key in self.redis.scan_iter(match=self._stats_key(_scan_version(version)), count=500):
            counters = self.redis.hgetall(key)
            hits += int(counters.get("hits", 0))
            misses += int(counters.get("misses", 0))
            saved += float(counters.get("saved_usd", 0.0))
        return CacheStats(
            version=version, entries=entries, bytes=size, hits=hits, misses=misses, saved_usd=saved
        )

    def clear(self, version: str | None = None) -> int:
        """Delete the entries and counters of `version` (every version when None)."""
        deleted = 0
        for kind in ("entry", "stats"):
            pattern = f"{PREFIX}:{_scan_version(version)}:{kind}" + (
                ":*" if kind == "entry" else ""
            )
            # SCAN in batches, never KEYS: the cache may hold millions of entries.
            for batch in _batches(self.redis.scan_iter(match=pattern, count=500)):
                removed = self.redis.unlink(*batch)
                deleted += int(removed) if kind == "entry" else 0
        return deleted


def _scan_version(version: str | None) -> str:
    """`version` in a SCAN pattern: '*' for every version; never a glob of a caller's."""
    if version is None:
        return "*"
    if re.fullmatch(CACHE_VERSION_PATTERN, version) is None:
        raise ValueError(f"not a cache version (must match {CACHE_VERSION_PATTERN}): {version!r}")
    return version


def _batches(keys: Any, size: int = 500) -> Any:
    batch: list[str] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
