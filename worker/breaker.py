"""A circuit breaker per provider endpoint, shared by every worker through Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis

from worker import telemetry
from worker.errors import ProviderError, ProviderRequestError
from worker.keyspace import CIRCUIT, CIRCUITS, CircuitKeys
from worker.logs import logger
from worker.resilience import Admission
from worker.scripts import Part, Settlement, scripts_for
from worker.settings import GEMINI_OPENAI_BASE_URL, Settings

PREFIX = CIRCUIT
INDEX = CIRCUITS
# Circuits of endpoints nobody calls any more fade away.
KEY_TTL_SECONDS = 7 * 86_400

DEFAULT_HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """When a circuit opens, and for how long."""

    failures: int = 5
    failure_rate: float = 0.5
    min_calls: int = 20
    window_seconds: int = 60
    cooldown_seconds: float = 30.0
    # How long one probe may hold the half-open slot before another job may probe.
    probe_ttl_seconds: float = 35.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The configuration the settings describe."""
        return cls(
            failures=settings.breaker_failures,
            failure_rate=settings.breaker_failure_rate,
            min_calls=settings.breaker_min_calls,
            window_seconds=settings.breaker_window_seconds,
            cooldown_seconds=settings.breaker_cooldown_seconds,
            probe_ttl_seconds=settings.timeout_seconds + 5,
        )


def endpoint(provider: str, settings: Settings) -> str:
    """host[:port][/path] a provider calls: two deployments of one API are two circuits."""
    url = {
        "openai": settings.openai_base_url,
        "anthropic": settings.anthropic_base_url,
        "gemini": settings.gemini_base_url or GEMINI_OPENAI_BASE_URL,
    }.get(provider)
    if not url:
        return DEFAULT_HOSTS.get(provider, "local")
    parsed = urlparse(url)
    # Only host and path: credentials in a URL must never reach Redis or `llmq circuits`.
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{host}{port}{parsed.path.rstrip('/')}"


def counts_against(error: ProviderError | None) -> str:
    """success, failure, or neutral (the request's own fault says nothing of the provider)."""
    if error is None:
        return "success"
    return "neutral" if isinstance(error, ProviderRequestError) else "failure"


class CircuitBreaker:
    """Opens a provider's circuit after a run or a rate of failures, for every worker.

    Closed: calls go through. Open: calls are skipped until the cool-down ends.
    Then half-open: exactly one job wins the probe (SET NX with expiry); its success
    closes the circuit, its failure opens it for another cool-down.
    If Redis itself is unreachable the breaker lets calls through: it must never be
    the reason a job fails.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        config: BreakerConfig | None = None,
        endpoints: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.config = config or BreakerConfig()
        self.endpoints = dict(endpoints or {})
        self.clock = clock
        self.scripts = scripts_for(client)
        self._token = uuid.uuid4().hex

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> CircuitBreaker:
        """A breaker with the settings' thresholds and the chain's endpoints."""
        return cls(
            client,
            config=BreakerConfig.from_settings(settings),
            endpoints={name: endpoint(name, settings) for name in settings.chain},
        )

    def circuit(self, provider: str) -> str:
        """The circuit's name: provider@endpoint."""
        return f"{provider}@{self.endpoints.get(provider) or DEFAULT_HOSTS.get(provider, 'local')}"

    def admit(self, provider: str) -> Admission:
        """CLOSED (call), PROBE (call: you are the one half-open probe) or OPEN (skip)."""
        try:
            admission = self.admission(self.scripts.run(self.admit_part(provider)))
        except redis.RedisError as exc:
            logger.warning("circuit breaker unavailable, calling %s anyway: %s", provider, exc)
            return Admission.CLOSED
        observe_admission(provider, admission)
        return admission

    def admit_part(self, provider: str) -> Part:
        """The script part that asks the provider's circuit (and may take the probe)."""
        keys = CircuitKeys(name=self.circuit(provider))
        return Part(
            "breaker_admit",
            [keys.state, keys.probe],
            [self.clock(), int(self.config.probe_ttl_seconds * 1000), self._token],
        )

    @staticmethod
    def admission(reply: Any) -> Admission:
        """The reply of an `admit_part`."""
        return Admission(reply.decode() if isinstance(reply, bytes) else reply)

    def is_open(self, provider: str) -> bool:
        """Whether the circuit is open right now (cool-down not over)."""
        state = self.state(provider)
        return state is not None and state["state"] == "open"

    def abandon_probe(self, provider: str) -> None:
        """Free the half-open probe slot of a call that was never made (budget or limits)."""
        self.record(provider, error=None, probe=True, neutral=True)

    def record(
        self, provider: str, *, error: ProviderError | None, probe: bool, neutral: bool = False
    ) -> None:
        """Count one call's result; may open or close the circuit."""
        try:
            new_state = self.scripts.run(
                self.record_part(provider, error=error, probe=probe, neutral=neutral)
            )
        except redis.RedisError as exc:
            logger.warning("circuit breaker unavailable, %s not recorded: %s", provider, exc)
            return
        opened = new_state == "opened"
        new_state = "open" if opened else new_state
        if not neutral:
            # A probe's result always changes the state: half-open to closed or open.
            telemetry.on_breaker(provider, str(new_state), transition=opened or probe)
        if probe and not neutral:
            name = self.circuit(provider)
            logger.warning("circuit %s probe %s: now %s", name, counts_against(error), new_state)

    def record_part(
        self, provider: str, *, error: ProviderError | None, probe: bool, neutral: bool = False
    ) -> Part:
        """The script part that counts one call against the provider's circuit."""
        name = self.circuit(provider)
        now = self.clock()
        config = self.config
        keys = CircuitKeys(name=name)
        return Part(
            "breaker_record",
            [keys.state, keys.probe, keys.window(int(now // config.window_seconds)), INDEX],
            [
                now,
                "neutral" if neutral else counts_against(error),
                1 if probe else 0,
                config.failures,
                config.failure_rate,
                config.min_calls,
                config.window_seconds,
                config.cooldown_seconds,
                # Already free of secrets: every llmq error's message is scrubbed.
                str(error)[:300] if error else "",
                name,
                KEY_TTL_SECONDS,
            ],
        )

    def state(self, provider: str) -> dict[str, Any] | None:
        """The circuit's state as `open_circuits` shows it, or None if it never failed."""
        try:
            return describe(self.client, self.circuit(provider), now=self.clock())
        except redis.RedisError:
            return None


def describe(client: redis.Redis, name: str, *, now: float | None = None) -> dict[str, Any] | None:
    """One circuit: closed, open (cooling down) or half_open (waiting for its probe)."""
    raw: dict[str, str] = client.hgetall(PREFIX + name)  # type: ignore[assignment]
    if not raw:
        return None
    now = time.time() if now is None else now
    state = raw.get("state", "closed")
    open_until = float(raw.get("open_until", 0) or 0)
    if state == "open" and now >= open_until:
        state = "half_open"
    provider, _, where = name.partition("@")
    return {
        "circuit": name,
        "provider": provider,
        "endpoint": where,
        "state": "open" if state == "open" else state,
        "since": float(raw["since"]) if raw.get("since") else None,
        "open_until": open_until if raw.get("open_until") else None,
        "retry_in_seconds": round(max(0.0, open_until - now), 3) if state == "open" else 0.0,
        "opens": int(raw.get("opens", 0) or 0),
        "reason": raw.get("reason"),
        "consecutive_failures": int(raw.get("consecutive", 0) or 0),
        "last_error": raw.get("last_error") or None,
    }


def open_circuits(client: redis.Redis) -> list[dict[str, Any]]:
    """Every circuit that is open or half-open, for `llmq health` and `llmq circuits`."""
    names: set[str] = client.smembers(INDEX)  # type: ignore[assignment]
    found = []
    for name in sorted(names):
        described = describe(client, name)
        if described is None:
            client.srem(INDEX, name)
        elif described["state"] != "closed":
            found.append(described)
    return found


def observe_admission(provider: str, admission: Admission) -> None:
    """Tell telemetry what the circuit said; taking the probe moves it open to half-open."""
    state = {Admission.CLOSED: "closed", Admission.PROBE: "half_open"}.get(admission, "open")
    telemetry.on_breaker(provider, state, transition=admission is Admission.PROBE)


class DeferredGate:
    """The breaker as one job sees it: its first admission known, successes written last.

    The job's admission script already asked the first provider's circuit, and a
    success changes nothing that other workers must see at once, so it travels with
    the job's settlement; failures and probes are recorded when they happen.
    """

    def __init__(
        self, breaker: CircuitBreaker, settlement: Settlement, known: dict[str, Admission]
    ) -> None:
        self.breaker = breaker
        self.settlement = settlement
        self.known = dict(known)

    def admit(self, provider: str) -> Admission:
        """The admission the job's script found, once; then the breaker's own."""
        known = self.known.pop(provider, None)
        if known is None:
            return self.breaker.admit(provider)
        observe_admission(provider, known)
        return known

    def is_open(self, provider: str) -> bool:
        """Whether the provider's circuit is open now."""
        return self.breaker.is_open(provider)

    def record(self, provider: str, *, error: ProviderError | None, probe: bool) -> None:
        """Defer a plain success; record anything else now."""
        if error is None and not probe:
            self.settlement.defer(self.breaker.record_part(provider, error=None, probe=False))
        else:
            self.breaker.record(provider, error=error, probe=probe)

    def abandon_probe(self, provider: str) -> None:
        """Give back a half-open probe that was never sent."""
        self.breaker.abandon_probe(provider)
