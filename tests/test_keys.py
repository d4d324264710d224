"""API keys: created once, stored only as a sha256, listed without secrets, revoked at once."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.keys import PREFIX, KeyStore, digest
from tests.harness import CELERY, RedisServer

LLMQ = str(Path(CELERY).with_name("llmq"))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    # Its own server: listing keys must see only this test's keys.
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def llmq(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": server.url}
    return subprocess.run([LLMQ, *args], env=env, capture_output=True, text=True, timeout=60)


def every_value(server: RedisServer) -> str:
    client = server.client()
    values = []
    for name in client.scan_iter(count=1000):
        values.append(name)
        values.extend(f"{k}={v}" for k, v in client.hgetall(name).items())
    return "\n".join(values)


def test_a_key_authenticates_its_user_until_revoked(private_redis: RedisServer) -> None:
    store = KeyStore(private_redis.client())
    token, key = store.create("alice", "web app")
    assert token.startswith(f"llmq_{key.id}_") and len(token) > 50
    assert store.authenticate(token) == key
    assert key.user_id == "alice" and key.name == "web app" and key.created

    other, _ = store.create("alice")
    assert other != token  # every key is fresh randomness, even for the same user
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for wrong in (tampered, "", "Bearer " + token, token + "x", f"llmq_{key.id}_", "x" * 80):
        assert store.authenticate(wrong) is None, wrong

    assert store.revoke(key.id) is True
    assert store.authenticate(token) is None
    assert store.authenticate(other) is not None  # only the revoked key stops working
    assert store.revoke(key.id) is False
    assert store.revoke("*") is False  # an id is exact, never a pattern


def test_only_a_hash_is_stored(private_redis: RedisServer) -> None:
    store = KeyStore(private_redis.client())
    token, key = store.create("bob")
    stored = every_value(private_redis)
    assert token not in stored
    secret = token.rsplit("_", 1)[1]
    assert secret not in stored
    assert private_redis.client().hget(PREFIX + key.id, "digest") == digest(token)


@pytest.mark.parametrize("user", ["", "   ", "tab\there", "x" * 201])
def test_a_user_no_job_could_carry_is_refused(private_redis: RedisServer, user: str) -> None:
    with pytest.raises(ValueError, match="not a valid user id"):
        KeyStore(private_redis.client()).create(user)
    assert every_value(private_redis) == ""


def test_cli_create_list_revoke(private_redis: RedisServer) -> None:
    created = llmq(private_redis, "keys", "create", "carol", "--name", "billing")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert "\n" not in token  # the key alone on stdout: KEY=$(llmq keys create carol)
    assert "shown only this once" in created.stderr and token not in created.stderr
    key = KeyStore(private_redis.client()).authenticate(token)
    assert key is not None and (key.user_id, key.name) == ("carol", "billing")
    second = json.loads(llmq(private_redis, "keys", "create", "dave", "--json").stdout)
    assert second["user_id"] == "dave" and second["key"].startswith("llmq_")

    listed = llmq(private_redis, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["user_id"], r["name"]) for r in rows] == [
        (key.id, "carol", "billing"),
        (second["id"], "dave", ""),
    ]
    assert all(set(row) == {"id", "user_id", "name", "created"} for row in rows)
    text = llmq(private_redis, "keys", "list")
    for secret in (token, second["key"], digest(token), digest(second["key"])):
        assert secret not in listed.stdout and secret not in text.stdout
    assert key.id in text.stdout and "'carol'" in text.stdout

    revoked = llmq(private_redis, "keys", "revoke", key.id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert KeyStore(private_redis.client()).authenticate(token) is None
    again = llmq(private_redis, "keys", "revoke", key.id)
    assert again.returncode == 1 and "no key with id" in again.stderr
    assert [r["id"] for r in json.loads(llmq(private_redis, "keys", "list", "--json").stdout)] == [
        second["id"]
    ]


def test_cli_refuses_a_bad_user(private_redis: RedisServer) -> None:
    done = llmq(private_redis, "keys", "create", " ")
    assert done.returncode == 2 and "not a valid user id" in done.stderr
    assert done.stdout == ""
