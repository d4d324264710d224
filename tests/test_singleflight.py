"""Single-flight locks: renewed while held, recoverable when the holder dies."""

from __future__ import annotations

import uuid

from tests.harness import RedisServer, wait_for
from worker.singleflight import RenewedLock, lead_or_follow


def test_holder_renews_its_lock(redis_server: RedisServer) -> None:
    client = redis_server.client()
    name = f"test:lock:{uuid.uuid4().hex}"
    lock = RenewedLock(client, name, ttl=1.0)
    assert lock.acquire()
    try:
        lowest = [client.pttl(name)]

        def renewed() -> bool:
            # The TTL only ever goes up again if the holder reset it.
            ttl = client.pttl(name)
            assert ttl > 0, "the lock expired while its holder was alive"
            renewed = ttl > lowest[0] + 100
            lowest[0] = min(lowest[0], ttl)
            return renewed

        wait_for(renewed, timeout=10, what="the holder to renew its lock")
        assert not RenewedLock(client, name, ttl=1.0).acquire()
    finally:
        lock.release()
    assert client.exists(name) == 0


def test_a_dead_holder_blocks_others_only_until_its_lock_expires(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    name = f"test:lock:{uuid.uuid4().hex}"
    holder = RenewedLock(client, name, ttl=1.0)
    assert holder.acquire()
    holder._stop.set()  # the holder "crashes": no more renewals, no release

    follower = RenewedLock(client, name, ttl=1.0)
    value, leading = lead_or_follow(follower, lambda: None, wait=15)
    assert (value, leading) == (None, True)
    follower.release()


def test_followers_get_the_leaders_value(redis_server: RedisServer) -> None:
    client = redis_server.client()
    name = f"test:lock:{uuid.uuid4().hex}"
    leader = RenewedLock(client, name, ttl=5.0)
    assert leader.acquire()
    polls = []

    def poll() -> str | None:
        polls.append(1)
        if len(polls) == 3:
            client.set(f"{name}:value", "answer")
        return client.get(f"{name}:value")

    value, leading = lead_or_follow(RenewedLock(client, name, ttl=5.0), poll, wait=15)
    assert (value, leading) == ("answer", False)
    leader.release()


def test_follower_gives_up_after_its_wait(redis_server: RedisServer) -> None:
    client = redis_server.client()
    name = f"test:lock:{uuid.uuid4().hex}"
    leader = RenewedLock(client, name, ttl=5.0)
    assert leader.acquire()
    try:
        assert lead_or_follow(RenewedLock(client, name, ttl=5.0), lambda: None, wait=0.2) == (
            None,
            False,
        )
    finally:
        leader.release()
