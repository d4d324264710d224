"""Fleet-wide latency percentiles in Redis."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.fakes import FakeProvider
from tests.harness import RedisServer
from worker.connections import connect
from worker.metrics import METRICS, PREFIX, LatencyRecorder, percentile, summarize

JOB = {"messages": [{"role": "user", "content": "How fast is this?"}]}


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert percentile([], 50) is None
    assert summarize([3.0, 1.0, 2.0]).as_dict() == {
        "count": 3,
        "p50": 2.0,
        "p95": 3.0,
        "p99": 3.0,
        "max": 3.0,
    }


def test_recorder_keeps_equal_samples_and_concurrent_writers(redis_server: RedisServer) -> None:
    client = connect(f"redis://127.0.0.1:{redis_server.port}/14")
    client.delete(*(PREFIX + m for m in METRICS))
    recorder = LatencyRecorder(client, window_seconds=60)

    def write() -> None:
        for _ in range(50):
            recorder.record(total_latency_ms=7.0, queue_wait_ms=None)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = recorder.summary()
    assert summary["total_latency_ms"].count == 200
    assert summary["total_latency_ms"].p99 == 7.0
    assert summary["queue_wait_ms"].count == 0


def test_window_drops_old_samples(redis_server: RedisServer) -> None:
    client = connect(f"redis://127.0.0.1:{redis_server.port}/14")
    client.delete(PREFIX + "total_latency_ms")
    seconds, _ = client.time()
    client.zadd(PREFIX + "total_latency_ms", {"999.000:old": float(seconds) - 120})
    recorder = LatencyRecorder(client, window_seconds=60)
    recorder.record(total_latency_ms=5.0)
    assert recorder.values("total_latency_ms") == [5.0]
    assert client.zcard(PREFIX + "total_latency_ms") == 1  # trimmed on write


def test_two_workers_feed_one_set_of_percentiles(
    isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    first = start_worker(isolated=isolated, concurrency=2)
    second = start_worker(isolated=isolated, concurrency=2)
    handles = [
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id})
        for _ in range(40)
    ]
    results = [h.get(timeout=60) for h in handles]

    jobs_per_worker = [w.output().count('"message": "llm_job"') for w in (first, second)]
    assert sum(jobs_per_worker) == 40 and min(jobs_per_worker) > 0

    recorder = LatencyRecorder(connect(isolated.url), window_seconds=300)
    measured = sorted(r["provider_latency_ms"] for r in results)
    assert sorted(recorder.values("provider_latency_ms")) == pytest.approx(measured, abs=1e-3)
    waits = sorted(r["queue_wait_ms"] for r in results)
    assert sorted(recorder.values("queue_wait_ms")) == pytest.approx(waits, abs=1e-3)
    summary = recorder.summary()["provider_latency_ms"]
    assert summary.count == 40
    assert summary.p95 == pytest.approx(percentile(measured, 95), abs=1e-3)
    assert summary.max == pytest.approx(measured[-1], abs=1e-3)
    totals = recorder.values("total_latency_ms")
    assert len(totals) == 40
    # Recorded just after the result was built, so never below the job's own figure.
    assert sorted(totals)[0] >= sorted(r["latency_ms"] for r in results)[0] - 1e-3
