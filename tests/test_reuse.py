"""Reuse end to end: cache hits, single-flight and idempotent request_ids on real workers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from producer import submit
from tests.accounting import Charges, charges, user_counters
from tests.conftest import MakePipeline
from tests.fakes import FakeProvider, Fault
from tests.harness import ROOT, Worker, free_port, wait_for
from worker.cache import ResponseCache, cache_request
from worker.errors import StateUnavailableError
from worker.models import CompletionJob
from worker.pipeline import JobContext
from worker.prices import load_prices
from worker.settings import load_settings


def question() -> list[dict[str, str]]:
    """A prompt no other test (or earlier run against the same Redis) has cached."""
    return [{"role": "user", "content": f"Define idempotency. [{uuid.uuid4().hex}]"}]


def llm_jobs(worker: Worker, request_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in worker.records("llm_job")
        if request_id in (r.get("request_id"), r.get("task_id"))
    ]


def one_llm_job(worker: Worker, request_id: str) -> dict[str, Any]:
    found = wait_for(lambda: llm_jobs(worker, request_id), timeout=10, what="the llm_job record")
    assert len(found) == 1
    record: dict[str, Any] = found[0]
    return record


def is_cached(messages: list[dict[str, str]], user_id: str, **options: Any) -> bool:
    """Whether an entry exists for this job, as a worker of the test environment keys it."""
    settings = load_settings(provider="openai")
    job = CompletionJob.model_validate({"messages": messages, "user_id": user_id, **options})
    request = cache_request(job, settings=settings, prices=load_prices())
    assert request is not None
    cache = ResponseCache.from_settings(settings)
    return cache.get(request) is not None


def test_second_identical_job_is_a_cache_hit(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    messages = question()
    fake.usage = {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 0}
    # check_cache=False: this test is about the worker's lookup, not the producer's.
    first = submit(messages, user_id, temperature=0, check_cache=False).get(timeout=30)
    charged = charges(user_id)
    assert charged == Charges.of([first])
    other_user = f"{user_id}-other"
    second_job = submit(messages, other_user, temperature=0, check_cache=False)
    second = second_job.get(timeout=30)
    # A hit for the user who paid is free too.
    again = submit(messages, user_id, temperature=0, check_cache=False).get(timeout=30)

    assert fake.requests() == 1
    assert again["cached"] is True and again["cost_usd"] == 0
    # Hits settle nothing and reserve no tokens: no one is charged for them.
    assert charges(user_id) == charged
    assert charges(other_user) == Charges.of([])
    assert first["cached"] is False and first["cost_usd"] > 0
    assert second["cached"] is True and second["cost_usd"] == 0
    assert second["text"] == first["text"] and second["attempts"] == 0
    assert second["request_id"] != first["request_id"]
    record = one_llm_job(worker, second_job.id)
    assert record["cached"] is True and record["cost_usd"] == 0
    assert record["cost_saved_usd"] == pytest.approx(first["cost_usd"])
    assert record["reused"] == "cache"


def test_nondeterministic_and_opted_out_jobs_are_not_stored(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    warm, opted_out = question(), question()
    for _ in range(2):
        assert submit(warm, user_id, temperature=0.5).get(timeout=30)["cached"] is False
        result = submit(opted_out, user_id, temperature=0, cache=False, check_cache=False)
        assert result.get(timeout=30)["cached"] is False
    assert fake.requests() == 4
    assert not is_cached(warm, user_id, temperature=0.5, cache=True)
    assert not is_cached(opted_out, user_id, temperature=0)


def test_truncated_answer_is_not_stored(worker: Worker, fake: FakeProvider, user_id: str) -> None:
    messages = question()
    fake.script("openai", Fault(finish_reason="length"))
    first = submit(messages, user_id, temperature=0, check_cache=False, on_truncation="accept").get(
        timeout=30
    )
    assert first["finish_reason"] == "length" and first["truncated"] is True
    assert not is_cached(messages, user_id, temperature=0)
    second = submit(messages, user_id, temperature=0, check_cache=False).get(timeout=30)
    assert fake.requests() == 2
    assert second["cached"] is False and second["finish_reason"] == "stop"
    assert is_cached(messages, user_id, temperature=0)


def test_bumping_cache_version_misses(
    worker: Worker, fake: FakeProvider, user_id: str, start_worker: Callable[..., Worker]
) -> None:
    messages = question()
    submit(messages, user_id, temperature=0, check_cache=False).get(timeout=30)
    queue = f"v2-{uuid.uuid4().hex[:6]}"
    start_worker(concurrency=2, queues=queue, LLM_CACHE_VERSION="2")

    on_v2 = submit(messages, user_id, temperature=0, queue=queue, check_cache=False)
    assert on_v2.get(timeout=30)["cached"] is False
    assert fake.requests() == 2
    again = submit(messages, user_id, temperature=0, queue=queue, check_cache=False)
    assert again.get(timeout=30)["cached"] is True
    assert fake.requests() == 2


def test_fifty_identical_jobs_make_one_provider_request(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    messages = question()
    # Slow enough that the worker's 8 threads are all inside the same flight at once.
    fake.set_always("openai", Fault(delay=1.0))
    jobs = [submit(messages, user_id, temperature=0, check_cache=False) for _ in range(50)]
    results = [job.get(timeout=60) for job in jobs]

    assert fake.requests() == 1
    assert sorted(r["cached"] for r in results) == [False] + [True] * 49
    assert {r["text"] for r in results} == {fake.text}


def test_same_request_id_twice_makes_one_provider_request(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    messages = question()
    # check_cache=False: the worker's replay, not the producer's (see test_cached.py).
    options: dict[str, Any] = {"request_id": request_id, "temperature": 0.7, "check_cache": False}
    first = submit(messages, user_id, **options).get(timeout=30)
    again = submit(messages, user_id, **options).get(timeout=30)

    assert fake.requests() == 1
    assert again == first  # the same result, cost included: it is the same request
    records = wait_for(
        lambda: (found := llm_jobs(worker, request_id)) and len(found) == 2 and found,
        timeout=10,
        what="two llm_job records",
    )
    assert records[0]["cost_usd"] == first["cost_usd"] > 0
    assert records[1]["reused"] == "replay" and records[1]["cost_usd"] == 0
    assert records[1]["cost_saved_usd"] == pytest.approx(first["cost_usd"])
    # One charge: the replay settled no spend and holds no tokens or budget.
    assert charges(user_id) == Charges.of([first])
    assert user_counters(user_id)["reserved_units"] == 0


def test_concurrent_deliveries_of_one_request_id_make_one_provider_request(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    messages = question()
    fake.set_always("openai", Fault(delay=1.0))
    jobs = [
        submit(messages, user_id, request_id=request_id, temperature=0.7, check_cache=False)
        for _ in range(2)
    ]
    results = [job.get(timeout=30) for job in jobs]
    wait_for(lambda: len(llm_jobs(worker, request_id)) == 2, timeout=10, what="both deliveries")

    assert fake.requests() == 1
    assert results[0] == results[1]
    assert sorted(str(r.get("reused")) for r in llm_jobs(worker, request_id)) == ["None", "replay"]


def test_worker_killed_before_ack_does_not_call_again(
    app: Any,
    fake: FakeProvider,
    user_id: str,
    worker_env: dict[str, str],
    run_dir: Path,
    start_worker: Callable[..., Worker],
) -> None:
    queue = f"kill-{uuid.uuid4().hex[:6]}"
    env = {
        **worker_env,
        "LLM_VISIBILITY_TIMEOUT": "8",
        "LLM_JOB_DEADLINE_SECONDS": "2",
        "LLMQ_TEST_KILL_AFTER_RUN": "1",
        "PYTHONPATH": str(ROOT),
    }
    doomed = Worker(
        env, run_dir, concurrency=2, queues=queue, extra=["--include", "tests.kill_hook"]
    )
    try:
        doomed.wait_ready(app)
        job = submit(question(), user_id, temperature=0.7, queue=queue)
        wait_for(lambda: doomed.process.poll() is not None, timeout=30, what="the worker to die")
        assert fake.requests("openai") == 1
        first = one_llm_job(doomed, job.id)
    finally:
        doomed.stop()
    # Forget what the dead worker stored, so the result we read next is the redelivery's.
    app.backend.forget(job.id)

    survivor = start_worker(
        concurrency=2, queues=queue, LLM_VISIBILITY_TIMEOUT="8", LLM_JOB_DEADLINE_SECONDS="2"
    )
    result = AsyncResult(job.id, app=app).get(timeout=90)

    assert fake.requests() == 1
    assert result["cost_usd"] == first["cost_usd"] and result["text"] == fake.text
    replay = one_llm_job(survivor, job.id)
    assert replay["reused"] == "replay" and replay["cost_usd"] == 0
    # The dead worker settled before it died; the redelivery charged nothing more.
    assert charges(user_id) == Charges.of([result])
    assert user_counters(user_id)["reserved_units"] == 0


def test_job_sent_without_request_id_is_keyed_by_its_task_id(
    worker: Worker, fake: FakeProvider, user_id: str, app: Any
) -> None:
    sent = app.send_task("llm.complete", kwargs={"messages": question(), "user_id": user_id})
    assert sent.get(timeout=30)["request_id"] == sent.id


def test_an_unreachable_redis_fails_closed_and_typed(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    pipeline = make_pipeline(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    job = {"messages": question(), "user_id": user_id, "temperature": 0}
    with pytest.raises(StateUnavailableError) as raised:
        pipeline.complete(job, context=JobContext())
    assert "no provider was called" in str(raised.value)
    assert fake.requests() == 0
