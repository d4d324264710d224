"""The pipeline's hot path: how many round trips of llmq's own one job costs on a real worker."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fakes import FakeProvider
from tests.harness import RedisServer, Worker, wait_for
from worker.connections import CLIENT_NAME

HAPPY_PATH_ROUND_TRIPS = 3


class Monitor:
    """Every command the server runs, as MONITOR reports them, until stopped."""

    def __init__(self, server: RedisServer) -> None:
        # (client "host:port", or "lua" for a script's own commands; command name)
        self.seen: list[tuple[str, str]] = []
        self._client = redis.Redis(port=server.port)
        self._monitor = self._client.monitor().__enter__()  # MONITOR is on once this returns
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._monitor.listen():
                client = (
                    "lua"
                    if event.get("client_type") == "lua"
                    else f"{event['client_address']}:{event['client_port']}"
                )
                self.seen.append((client, str(event["command"]).split(" ", 1)[0]))
        except (redis.ConnectionError, ValueError, AttributeError, OSError):
            return

    def stop(self) -> None:
        self._client.connection_pool.disconnect()
        self._thread.join(5)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def round_trips(seen: list[tuple[str, str]], clients: dict[str, str]) -> Counter[str]:
    """Top-level commands per connection name (scripts' inner commands excluded)."""
    return Counter(clients.get(client, "other") for client, _ in seen if client != "lua")


def test_one_job_costs_at_most_three_round_trips_of_llmqs_own(
    private_redis: RedisServer,
    worker_env: dict[str, str],
    run_dir: Path,
    fake: FakeProvider,
    app: Any,
) -> None:
    from celery import Celery

    from worker.app import configure
    from worker.settings import load_settings

    url = private_redis.url
    producer = Celery("rt-test", set_as_current=False)
    configure(producer, load_settings(REDIS_URL=url))
    env = {
        **worker_env,
        "REDIS_URL": url,
        "LLM_FLEET_HEARTBEAT_SECONDS": "300",  # no heartbeat inside the measured window
        "LLM_USER_DAILY_BUDGET_USD": "5",  # every step on: budget, limits, cache, circuit
        "LLM_PROVIDER_LIMITS": '{"openai": {"rpm": 100000, "tpm": 100000000}}',
    }
    worker = Worker(env, run_dir, concurrency=2, name=f"rt-{uuid.uuid4().hex[:6]}@test")
    try:
        worker.wait_ready(producer)

        def job(marker: str) -> dict[str, Any]:
            messages = [{"role": "user", "content": f"Count round trips {marker}"}]
            kwargs = {"messages": messages, "user_id": "rt-user", "temperature": 0}
            result: dict[str, Any] = producer.send_task(
                "llm.complete", kwargs=kwargs, queue="llm"
            ).get(timeout=30)
            return result

        job("warm-up")  # connects the pool and loads the scripts
        monitor = Monitor(private_redis)
        try:
            result = job(uuid.uuid4().hex)
            wait_for(
                lambda: any(
                    r.get("request_id") == result["request_id"] for r in worker.records("llm_job")
                ),
                timeout=10,
                what="the job's record",
            )
            seen = list(monitor.seen)
        finally:
            monitor.stop()
        names = {
            entry["addr"]: entry["name"] or "other"
            for entry in redis.Redis(port=private_redis.port).client_list()
        }
    finally:
        worker.stop()
    assert result["cached"] is False and result["cost_usd"] > 0
    counted = round_trips(seen, names)
    ours = [command for client, command in seen if names.get(client) == CLIENT_NAME]
    # llmq's own: the admission script and the settlement script.
    assert 1 <= counted[CLIENT_NAME] <= HAPPY_PATH_ROUND_TRIPS, (counted, ours)
    assert counted["other"] > 0  # Celery's own traffic was seen, and told apart
