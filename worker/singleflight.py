"""Single-flight: of many identical requests, one does the work while the rest wait for it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import LockError

T = TypeVar("T")


class RenewedLock:
    """A Redis lock that its holder keeps alive; it expires `ttl` seconds after a crash."""

    def __init__(self, client: redis.Redis, name: str, *, ttl: float) -> None:
        # thread_local=False: the renewal thread must see the token the job thread set.
        self._lock = client.lock(name, timeout=ttl, thread_local=False)
        self._ttl = ttl
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock without blocking; renew it in the background until released."""
        if not self._lock.acquire(blocking=False):
            return False
        self._renewer = threading.Thread(target=self._renew, name="llmq-lock-renewer", daemon=True)
        self._renewer.start()
        return True

    def release(self) -> None:
        """Stop renewing and release; a lock that already expired is not an error."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self._ttl)
        with contextlib.suppress(LockError, redis.RedisError):
            self._lock.release()

    def _renew(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self._lock.reacquire()
            except (LockError, redis.RedisError):
                return


def lead_or_follow(
    lock: RenewedLock, poll: Callable[[], T | None], *, wait: float
) -> tuple[T | None, bool]:
    """Return `(value, False)` once `poll` finds the leader's value, or `(None, True)` if we
    took `lock` and must do the work, or `(None, False)` when `wait` seconds passed first.
    """
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        value = poll()
        if value is not None:
            return value, False
        if lock.acquire():
            # The previous holder may have stored its value between our poll and acquire.
            try:
                value = poll()
            except BaseException:
                lock.release()
                raise
            if value is not None:
                lock.release()
                return value, False
            return None, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, False
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.25)
