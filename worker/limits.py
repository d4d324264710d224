"""Global rate limits in Redis (per user, per provider, per model), atomic across all workers.

Each limit is a sliding-window log on Redis server time: a sorted set of
reservation ids scored by the time they were made, and a hash of each one's
amount plus the running total. One Lua script checks every limit of a job and
reserves in all of them, or in none: a rejected attempt leaves no trace in any
window. Reservations are made from the pre-flight estimate and settled to the
real usage (or released) when the job ends; an entry whose worker died simply
ages out of its window, and settling or releasing it afterwards is a no-op.

Celery's `rate_limit` on `llm.complete` (LLM_TASK_RATE_LIMIT) is a different,
per-worker ceiling; these limits hold for any number of workers and threads.

Written here rather than taken from the `limits` package: its Redis moving window
stores one list entry per unit (a 100,000-token budget would be 100,000 entries),
stamps entries with the worker's clock, checks one limit per call (so a job
refused by its second limit would already count in its first), and cannot settle
a reservation to the usage a job really had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from worker.connections import redis_client
from worker.errors import RateLimitedError
from worker.keyspace import limit_keys
from worker.scripts import Part, Scripts, scripts_for
from worker.settings import PROVIDERS, Settings

Unit = Literal["tokens", "requests"]

_US = 1_000_000


@dataclass(frozen=True, kw_only=True)
class Limit:
    """One limit: at most `limit` units per rolling `window` seconds."""

    name: str
    # LLM_RATE_LIMIT_PREFIX, and what it counts: "user:<id>:tokens", "provider:openai:requests"
    prefix: str
    scope: str
    limit: int
    window: float
    unit: Unit
    setting: str

    @property
    def redis_keys(self) -> tuple[str, str]:
        """The reservation log (sorted set) and the amounts (hash)."""
        return limit_keys(self.prefix, self.scope)


@dataclass(frozen=True, kw_only=True)
class LimitCheck:
    """One limit as a decision saw it: usage before the job, what the job asked for."""

    limit: Limit
    usage: int
    requested: int
    seq: int


@dataclass(frozen=True, kw_only=True)
class LimitDecision:
    """The outcome of one atomic check-and-reserve across all of a job's limits."""

    admitted: bool
    checks: list[LimitCheck]
    binding: LimitCheck | None
    retry_after: float | None
    redis_time: float

    def log_fields(self) -> dict[str, Any]:
        """The decision for the job's `llm_job` record."""
        fields: dict[str, Any] = {
            "admitted": self.admitted,
            "redis_time": self.redis_time,
            "limits": {
                c.limit.name: {
                    "usage": c.usage,
                    "requested": c.requested,
                    "limit": c.limit.limit,
                    "window_s": c.limit.window,
                    "seq": c.seq,
                }
                for c in self.checks
            },
        }
        if self.binding is not None:
            fields["limit"] = self.binding.limit.name
            # JSON has no infinity: a job that can never fit says so instead.
            never = self.retry_after is not None and math.isinf(self.retry_after)
            fields["retry_after"] = None if never else self.retry_after
            fields["never_fits"] = never
        return fields

    def error(self, *, user_id: str) -> RateLimitedError:
        """The RateLimitedError for a rejected decision, with every number in its message."""
        if self.binding is None or self.retry_after is None:
            raise ValueError("an admitted decision has no error")
        check, limit = self.binding, self.binding.limit
        retry = "never" if math.isinf(self.retry_after) else f"{self.retry_after:.3f}s"
        if math.isinf(self.retry_after):
            when = (
                f"this job alone needs {check.requested} {limit.unit}, more than the limit "
                f"allows, so it can never run. Fix: lower max_tokens or shorten the prompt, "
                f"or raise {limit.setting}."
            )
        else:
            when = (
                f"it could run in {self.retry_after:.1f}s. Fix: retry after that, submit with "
                f"on_limit='defer', or raise {limit.setting}."
            )
        return RateLimitedError(
            f"Rate limit {limit.name} hit for user {user_id!r}: {check.usage} {limit.unit} "
            f"used in the last {limit.window:g}s + {check.requested} for this job > limit "
            f"{limit.limit} ({limit.setting}); {when} "
            f"[limit={limit.name} usage={check.usage} requested={check.requested} "
            f"limit_value={limit.limit} retry_after={retry}]"
        )


@dataclass(frozen=True, kw_only=True)
class LimitUsage:
    """A limit's current usage, for `llmq limits`."""

    limit: Limit
    usage: int
    resets_in: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "limit": self.limit.name,
            "usage": self.usage,
            "limit_value": self.limit.limit,
            "remaining": max(0, self.limit.limit - self.usage),
            "unit": self.limit.unit,
            "window_seconds": self.limit.window,
            "oldest_leaves_in_seconds": round(self.resets_in, 3),
            "setting": self.limit.setting,
        }


class RateLimiter:
    """Checks and reserves a job's user, provider and model limits in one Redis script."""

    def __init__(self, settings: Settings, *, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> redis.Redis:
        """The Redis client, connected on first use."""
        if self._client is None:
            self._client = redis_client(self.settings)
        return self._client

    @property
    def scripts(self) -> Scripts:
        """The Lua scripts on this limiter's Redis."""
        return scripts_for(self.client)

    def user_limits(self, user_id: str) -> list[Limit]:
        """The per-user limits in force for `user_id` (LLM_USER_LIMITS overrides first)."""
        s = self.settings
        override = s.user_limits.get(user_id)
        tokens = s.user_tokens_per_hour
        requests = s.user_requests_per_minute
        if override is not None:
            tokens = tokens if override.tokens_per_hour is None else override.tokens_per_hour
            if override.requests_per_minute is not None:
                requests = override.requests_per_minute
        setting = "LLM_USER_LIMITS" if override is not None else None
        base = f"user:{user_id}"
        found: list[Limit] = []
        if tokens:
            found.append(
                Limit(
                    name="user_tokens",
                    prefix=s.rate_limit_prefix,
                    scope=f"{base}:tokens",
                    limit=tokens,
                    window=s.user_token_window_seconds,
                    unit="tokens",
                    setting=setting or "LLM_USER_TOKENS_PER_HOUR",
                )
            )
        if requests:
            found.append(
                Limit(
                    name="user_requests",
                    prefix=s.rate_limit_prefix,
                    scope=f"{base}:requests",
                    limit=requests,
                    window=s.user_request_window_seconds,
                    unit="requests",
                    setting=setting or "LLM_USER_REQUESTS_PER_MINUTE",
                )
            )
        return found

    def shared_limits(
        self, *, provider: str | None = None, model: str | None = None
    ) -> list[Limit]:
        """The provider and model limits every user shares (all configured ones if None)."""
        s = self.settings
        found: list[Limit] = []
        for target, configured in s.provider_limits.items():
            kind = "provider" if target in PROVIDERS else "model"
            if (provider, model) != (None, None) and target not in (provider, model):
                continue
            per_unit: tuple[tuple[Unit, int | None], ...] = (
                ("requests", configured.rpm),
                ("tokens", configured.tpm),
            )
            for unit, value in per_unit:
                if value:
                    found.append(
                        Limit(
                            name=f"{kind}_{'rpm' if unit == 'requests' else 'tpm'}:{target}",
                            prefix=s.rate_limit_prefix,
                            scope=f"{kind}:{target}:{unit}",
                            limit=value,
                            window=s.provider_window_seconds,
                            unit=unit,
                            setting="LLM_PROVIDER_LIMITS",
                        )
                    )
        return found

    def limits(self, *, user_id: str, provider: str, model: str) -> list[Limit]:
        """Every limit a job of `user_id` on `provider`/`model` must pass."""
        return [*self.user_limits(user_id), *self.shared_limits(provider=provider, model=model)]

    def check(self, limits: Sequence[Limit], *, tokens: int, reservation_id: str) -> LimitDecision:
        """Atomically: admit and reserve in every limit, or in none; never counts a rejection."""
        if not limits:
            return LimitDecision(
                admitted=True, checks=[], binding=None, retry_after=None, redis_time=0.0
            )
        part = self.reserve_part(limits, tokens=tokens, reservation_id=reservation_id)
        return self.decision(self.scripts.run(part), limits, tokens=tokens)

    def reserve_part(self, limits: Sequence[Limit], *, tokens: int, reservation_id: str) -> Part:
        """The script part that checks and reserves `tokens` and one request in every limit."""
        keys: list[str] = []
        args: list[Any] = [reservation_id]
        for limit in limits:
            keys.extend(limit.redis_keys)
            amount = tokens if limit.unit == "tokens" else 1
            args.extend([limit.limit, math.ceil(limit.window * _US), amount])
        return Part("limits_reserve", keys, args)

    def decision(self, raw: Any, limits: Sequence[Limit], *, tokens: int) -> LimitDecision:
        """The reply of a `reserve_part` as a LimitDecision."""
        reply = [int(v) for v in raw]
        admitted, now_us, binding, wait_us = reply[:4]
        n = len(limits)
        amounts = [tokens if limit.unit == "tokens" else 1 for limit in limits]
        checks = [
            LimitCheck(limit=limit, usage=used, requested=amount, seq=seq)
            for limit, amount, used, seq in zip(
                limits, amounts, reply[4 : 4 + n], reply[4 + n :], strict=True
            )
        ]
        return LimitDecision(
            admitted=bool(admitted),
            checks=checks,
            binding=checks[binding - 1] if binding else None,
            retry_after=None if admitted else (math.inf if wait_us < 0 else wait_us / _US),
            redis_time=now_us / _US,
        )

    def attempt_limits(
        self, *, user_id: str, provider: str, model: str, first: bool, metered: bool = True
    ) -> list[Limit]:
        """The limits one provider attempt must pass.

        The provider's and model's limits count every attempt (a retry is a request);
        the user's requests-per-minute counts jobs, so only their first attempt; the
        user's token allowance guards spend, so only calls that cost money (`metered`).
        """
        found = []
        for limit in self.user_limits(user_id):
            if limit.unit == "requests" and not first:
                continue
            if limit.unit == "tokens" and not metered:
                continue
            found.append(limit)
        return [*found, *self.shared_limits(provider=provider, model=model)]

    def reserve(
        self,
        limits: Sequence[Limit],
        *,
        tokens: int,
        reservation_id: str,
        user_id: str,
        record: dict[str, Any] | None = None,
    ) -> LimitReservation | None:
        """Reserve `tokens` and one request in every limit, or raise RateLimitedError."""
        if not limits:
            return None
        decision = self.check(limits, tokens=tokens, reservation_id=reservation_id)
        if record is not None:
            record["rate_limit"] = decision.log_fields()
        if not decision.admitted:
            raise decision.error(user_id=user_id)
        return LimitReservation(self, limits, reservation_id=reservation_id)

    def adjust(self, limits: Sequence[Limit], reservation_id: str, amounts: list[str]) -> None:
        """Set (or with 'x' remove, with '' keep) a reservation's amount in each limit."""
        if limits:
            self.scripts.run(self.adjust_part(limits, reservation_id, amounts))

    def adjust_part(self, limits: Sequence[Limit], reservation_id: str, amounts: list[str]) -> Part:
        """The script part that sets a reservation's amount in each limit."""
        keys = [key for limit in limits for key in limit.redis_keys]
        return Part("limits_adjust", keys, [reservation_id, *amounts])

    def usage(self, limits: Sequence[Limit]) -> list[LimitUsage]:
        """Each limit's usage in its window now, on Redis time."""
        if not limits:
            return []
        keys = [key for limit in limits for key in limit.redis_keys]
        windows = [math.ceil(limit.window * _US) for limit in limits]
        reply = [int(v) for v in self.scripts.run(Part("limits_usage", keys, windows))]
        return [
            LimitUsage(limit=limit, usage=reply[1 + 2 * i], resets_in=reply[2 + 2 * i] / _US)
            for i, limit in enumerate(limits)
        ]


class LimitReservation:
    """One attempt's reservation in its limits: settled to what it used, or released."""

    def __init__(
        self, limiter: RateLimiter, limits: Sequence[Limit], *, reservation_id: str
    ) -> None:
        self.limiter = limiter
        self.limits = list(limits)
        self.reservation_id = reservation_id

    def settle(self, *, tokens: int) -> None:
        """The attempt was answered: its tokens become what it used; requests stay counted."""
        self.limiter.scripts.run(self.settle_part(tokens=tokens))

    def settle_part(self, *, tokens: int) -> Part:
        """The script part of `settle`."""
        return self.limiter.adjust_part(
            self.limits,
            self.reservation_id,
            ["" if limit.unit == "requests" else str(tokens) for limit in self.limits],
        )

    def keep_requests_only(self) -> None:
        """The provider saw the request but billed nothing: free the tokens, keep the request."""
        self.settle(tokens=0)

    def release(self) -> None:
        """The request never left: give back its tokens and its request slots."""
        self.limiter.adjust(self.limits, self.reservation_id, ["x"] * len(self.limits))


def user_usage(settings: Settings, user_id: str) -> list[LimitUsage]:
    """`llmq limits USER`: the user's limits and every shared limit, with current usage."""
    limiter = RateLimiter(settings)
    return limiter.usage([*limiter.user_limits(user_id), *limiter.shared_limits()])
