"""Dead workers and Redis restarts: no job is lost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from producer import submit
from tests.accounting import Charges, charges, user_counters
from tests.conftest import StartWorker
from tests.fakes import FakeProvider, Fault
from tests.harness import RedisServer, Worker, wait_for
from worker.app import configure
from worker.settings import load_settings

MESSAGES = [{"role": "user", "content": "Tell me a fact about otters."}]
VISIBILITY_TIMEOUT = 10
RESTORE_INTERVAL = 5  # kombu's sweep for abandoned messages (worker/app.py)
# Short-lived workers: the deadline must stay below the visibility timeout.
FAST_REDELIVERY = {
    "LLM_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    "LLM_JOB_DEADLINE_SECONDS": "4",
}


def succeeded_in(worker: Worker, task_id: str) -> bool:
    return f"llm.complete[{task_id}] succeeded" in worker.output()


def llm_jobs(worker: Worker, user_id: str) -> list[dict[str, Any]]:
    """The worker's `llm_job` records of `user_id`."""
    return [r for r in worker.records("llm_job") if r.get("user_id") == user_id]


def test_sigkilled_worker_loses_no_job(
    start_worker: StartWorker, fake: FakeProvider, user_id: str
) -> None:
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    fake.set_always("openai", Fault(delay=3))
    doomed = start_worker(concurrency=20, queues=queue, **FAST_REDELIVERY)
    jobs = [submit(MESSAGES, user_id, queue=queue) for _ in range(20)]
    wait_for(lambda: fake.requests("openai") >= 20, timeout=30, what="20 jobs in flight")
    doomed.kill()
    killed_at = time.monotonic()
    fake.set_always("openai", None)
    rescuer = start_worker(concurrency=8, queues=queue, **FAST_REDELIVERY)

    # The bound: the visibility timeout, one restore sweep, and room for a loaded machine.
    bound = VISIBILITY_TIMEOUT + RESTORE_INTERVAL + 20
    results = [job.get(timeout=max(0.1, killed_at + bound - time.monotonic())) for job in jobs]

    assert len({r["request_id"] for r in results}) == len(jobs)
    assert {r["provider"] for r in results} == {"openai"}
    # Celery logs success just after storing the result.
    wait_for(
        lambda: all(succeeded_in(rescuer, job.id) for job in jobs),
        timeout=10,
        what="the second worker's success lines",
    )
    assert not any(succeeded_in(doomed, job.id) for job in jobs)
    # Each job ran once more, on the second worker: 20 cut short + 20 redone, none twice.
    assert fake.requests("openai") == 40
    # No duplicate charge: settled spend counts each of the 20 results once. The killed
    # attempts never settled: their budget reservations are held, not spent, until
    # LLM_BUDGET_RESERVATION_TTL frees them.
    charged, billed = charges(user_id), Charges.of(results)
    assert billed.cost_units > 0
    assert replace(charged, limit_tokens=0) == replace(billed, limit_tokens=0)
    assert user_counters(user_id)["reserved_units"] > 0
    # The rate-limit window counts each result once, at its actual tokens, next to the
    # killed attempts' reservations, which stay at their worst case until the window
    # slides past them (worker/limits.py): the provider did receive those requests.
    records = llm_jobs(rescuer, user_id)
    assert sorted(r["task_id"] for r in records) == sorted(job.id for job in jobs)
    (requested,) = {r["rate_limit"]["limits"]["user_tokens"]["requested"] for r in records}
    assert charged.limit_tokens == billed.limit_tokens + 20 * requested


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with AOF persistence (fsync always), as docker-compose runs it."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    yield server
    server.stop()


def test_redis_restart_loses_no_job(
    private_redis: RedisServer,
    worker_env: dict[str, str],
    run_dir: Path,
    fake: FakeProvider,
    user_id: str,
) -> None:
    producer = Celery("llmq-producer")
    configure(producer, load_settings(REDIS_URL=private_redis.url))
    env = {**worker_env, **FAST_REDELIVERY, "REDIS_URL": private_redis.url}
    worker = Worker(env, run_dir, concurrency=8)
    try:
        worker.wait_ready(producer)
        fake.set_always("openai", Fault(delay=0.05))

        def send() -> AsyncResult:
            request_id = str(uuid.uuid4())
            kwargs: dict[str, Any] = {
                "messages": MESSAGES,
                "user_id": user_id,
                "request_id": request_id,
            }
            return producer.send_task("llm.complete", kwargs=kwargs, task_id=request_id)

        # The first eight jobs (one per worker thread) are still running when Redis goes:
        # their results and acks come after it is back.
        fake.script("openai", *[Fault(delay=2.0) for _ in range(8)])
        jobs = [send() for _ in range(50)]
        wait_for(lambda: fake.requests("openai") >= 8, timeout=30, what="eight jobs running")
        # A restart as `docker compose restart redis` does it (SIGTERM), in mid-run, with
        # every worker thread busy. (Redis going down just as a worker pops a message can
        # still lose that one message: see worker/redis_transport.py.)
        private_redis.stop()
        restart = threading.Timer(1.0, private_redis.start)
        restart.start()
        # Sent while Redis is down: the producer retries until it is back.
        jobs += [send() for _ in range(50)]
        restart.join()
        results = [job.get(timeout=90) for job in jobs]
        # The worker reconnected rather than exiting on kombu's errors.
        assert worker.process.poll() is None
        assert "Unrecoverable error" not in worker.output()
    finally:
        worker.stop()

    assert len({r["request_id"] for r in results}) == 100 == len(jobs)
    assert {r["provider"] for r in results} == {"openai"}
