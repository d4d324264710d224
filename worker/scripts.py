"""llmq's Lua, and the calls that run it: one part alone, or many parts in one round trip.

Each step (reuse, budget, limits, circuit, latency) contributes a `Part`: the function of
its library to run and that function's KEYS and ARGV. `run` executes one part (the slow
path: retries, fallbacks, failures); `admit` and `settle` execute a job's parts together,
so the happy path costs two round trips of llmq's own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import redis

LIBRARIES = ("reuse", "budget", "limits", "breaker", "latency")
logger = logging.getLogger("llmq")


@dataclass(frozen=True)
class Part:
    """One library function call: its name, KEYS and ARGV."""

    function: str
    keys: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)


@cache
def _read(name: str) -> str:
    return resources.files("worker").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


@cache
def source(main: str) -> str:
    """A whole script: the libraries, then `main` (a file name, or Lua code)."""
    body = _read(main) if main in ("admit", "settle") else main
    return "\n".join(["local llmq = {}", *(_read(lib) for lib in LIBRARIES), body])


class Scripts:
    """The scripts of one Redis client, registered on first use (EVALSHA, EVAL after a restart)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._registered: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _script(self, main: str) -> Any:
        with self._lock:
            if main not in self._registered:
                self._registered[main] = self.client.register_script(source(main))
            return self._registered[main]

    def run(self, part: Part) -> Any:
        """One part on its own."""
        call = self._script(f"return llmq.{part.function}(KEYS, ARGV)")
        return call(keys=part.keys, args=part.args)

    def admit(self, parts: list[Part]) -> list[Any]:
        """Parts in order until one refuses, atomically; the replies of those that ran."""
        return self._together("admit", parts)

    def settle(self, parts: list[Part]) -> list[Any]:
        """Every part, in order, atomically; their replies."""
        return self._together("settle", parts)

    def _together(self, main: str, parts: list[Part]) -> list[Any]:
        layout = json.dumps([[p.function, len(p.keys), len(p.args)] for p in parts])
        keys = [key for part in parts for key in part.keys]
        args: list[Any] = [layout, *(arg for part in parts for arg in part.args)]
        replies: list[Any] = self._script(main)(keys=keys, args=args)
        return replies


_by_client: dict[int, Scripts] = {}
_by_client_lock = threading.Lock()


def scripts_for(client: redis.Redis) -> Scripts:
    """The process-wide Scripts of `client`."""
    with _by_client_lock:
        found = _by_client.get(id(client))
        if found is None or found.client is not client:
            found = _by_client[id(client)] = Scripts(client)
        return found


After = Callable[[Any], None]


class Settlement:
    """Writes that wait for one job's settle script: paid answers, circuit successes.

    Steps `defer` their parts (with what to do with each reply) instead of writing at
    once; the pipeline sends them all in the job's one settle call, or `flush`es them
    on their own when the job ends another way.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[Part, After | None]] = []

    def defer(self, part: Part, after: After | None = None) -> None:
        """Send `part` with the job's settlement; `after` gets its reply."""
        self._parts.append((part, after))

    def take(self) -> list[tuple[Part, After | None]]:
        """The deferred parts, now owned by the caller."""
        parts, self._parts = self._parts, []
        return parts

    def send(self, scripts: Scripts, *extra: Part) -> list[Any]:
        """Every deferred part and `extra`, in one round trip; replies handed on, in order."""
        parts = self.take()
        replies = scripts.settle([part for part, _ in parts] + list(extra))
        for (_, after), reply in zip(parts, replies, strict=False):
            if after is not None:
                after(reply)
        return replies[len(parts) :]

    def flush(self, scripts: Scripts, *extra: Part) -> None:
        """`send` when the job ends without its normal settlement; a Redis error is logged."""
        try:
            if self._parts or extra:
                self.send(scripts, *extra)
        except redis.RedisError as exc:
            # Paid answers not recorded: their reservations expire on their own.
            logger.error("settlement not written (reservations expire): %s", exc)
