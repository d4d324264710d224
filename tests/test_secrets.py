"""No configured secret anywhere, even when a provider quotes the key back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.fakes import FakeProvider, Fault
from tests.harness import (
    ANTHROPIC_TEST_KEY,
    OPENAI_TEST_KEY,
    Flower,
    Isolated,
    serve_front,
    wait_for,
)
from worker import secrets
from worker.errors import ConfigurationError, ProviderError
from worker.settings import load_settings

LLMQ = str(Path(sys.executable).with_name("llmq"))


def echo(key: str, status: int) -> Fault:
    """An error body that quotes the key whole, as some proxies do."""
    body = {"error": {"message": f"Incorrect API key provided: {key}. Bearer {key}"}}
    return Fault(status=status, body=json.dumps(body))


def every_redis_value(isolated: Isolated) -> str:
    """Every key and value of the isolated database, as text."""
    import redis

    client = redis.Redis.from_url(isolated.url)
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value: Any = b""
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        found.append(f"{key!r} {value!r}")
    return "\n".join(found)


def test_an_echoed_key_appears_nowhere(
    isolated: Isolated,
    start_worker: Any,
    fake: FakeProvider,
    user_id: str,
    run_dir: Path,
) -> None:
    worker = start_worker(
        isolated=isolated,
        LLM_BREAKER_FAILURES="2",
        LLM_BREAKER_COOLDOWN_SECONDS="600",
        LLM_RETRY_ATTEMPTS="2",
        LLM_RETRY_INITIAL_WAIT_SECONDS="0.01",
    )
    flower = Flower({**isolated.env, "FLOWER_UNAUTHENTICATED_API": "true"}, run_dir)
    try:
        fake.set_always("openai", echo(OPENAI_TEST_KEY, 401))
        fake.set_always("anthropic", echo(ANTHROPIC_TEST_KEY, 500))

        def failed_job() -> Any:
            job = isolated.app.send_task(
                "llm.complete",
                kwargs={"messages": [{"role": "user", "content": "hi"}], "user_id": user_id},
                queue="llm",
            )
            with pytest.raises(Exception) as raised:
                job.get(timeout=30)
            return job, raised.value

        # Flower starts listening as it comes up: the first failure it sees is enough.
        job, error = wait_for(
            lambda: (found := failed_job()) and found[0].id in flower.tasks() and found,
            timeout=60,
            what="flower to see a failed job",
            interval=0.2,
        )
        assert isinstance(error, Exception) and "Incorrect API key" in str(error)

        surfaces = {
            "worker log": worker.output(),
            "exception": f"{error!r} {error}",
            "result meta": json.dumps(isolated.app.backend.get_task_meta(job.id), default=str),
            "flower tasks": json.dumps(flower.tasks()),
            "flower task page": requests.get(f"{flower.url}/task/{job.id}", timeout=5).text,
            "flower result": requests.get(f"{flower.url}/api/task/result/{job.id}", timeout=5).text,
            "redis": every_redis_value(isolated),
        }
        for command in (["health"], ["circuits"]):
            done = subprocess.run(
                [LLMQ, *command], env=isolated.env, capture_output=True, text=True, timeout=60
            )
            surfaces[f"llmq {command[0]}"] = done.stdout + done.stderr
        assert "open" in surfaces["llmq circuits"]  # the circuit, with its last error, shows

        # The front's full report and the job, as the job's owner reads them with a key.
        from producer.keys import KeyStore
        from producer.web import OWNER_PREFIX, _owner

        client = redis.Redis.from_url(isolated.url, decode_responses=True)
        token, _ = KeyStore(client).create(user_id)
        # Sent by a plain Celery producer: owned as if posted through the front.
        client.set(OWNER_PREFIX + job.id, _owner(user_id))
        with serve_front(isolated.env, run_dir) as (base, _):
            auth = {"Authorization": f"Bearer {token}"}
            health = requests.get(f"{base}/health", headers=auth, timeout=10)
            # The circuits with their last errors: the provider's echo, key masked.
            assert "Incorrect API key" in health.text and "***" in health.text
            surfaces["GET /health"] = health.text
            polled = requests.get(f"{base}/v1/jobs/{job.id}", headers=auth, timeout=10)
            assert polled.json()["state"] == "FAILURE" and polled.json()["error"]
            surfaces["GET /v1/jobs"] = polled.text
    finally:
        flower.stop()
    for surface, text in surfaces.items():
        for key in (OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY):
            assert key not in text, f"{key[:10]}... leaked into {surface}"
    assert "***" in surfaces["exception"]


def test_errors_and_completions_mask_configured_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdef123456")
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2-redis-pw@cache.internal:6379/0")
    secrets.reset()
    try:
        error = ProviderError("401: key sk-live-abcdef123456 and hunter2-redis-pw")
        assert "sk-live" not in str(error) and "hunter2" not in str(error)
        assert secrets.scrub("redis://user:other-pass@h:1/0") == "redis://user:***@h:1/0"
    finally:
        secrets.reset()


def test_redis_password_stays_out_of_configuration_errors() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(REDIS_URL="http://:s3cr3t-password@cache:6379/0")
    assert "s3cr3t-password" not in str(raised.value) and "REDIS_URL" in str(raised.value)
