"""`llmq health`: fleet percentiles, queues and status, exit code for alerting."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.fakes import FakeProvider, Fault
from tests.harness import ROOT

LLMQ = str(Path(ROOT) / ".venv" / "bin" / "llmq")
JOB = {"messages": [{"role": "user", "content": "Is the fleet healthy?"}]}


def health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([LLMQ, "health"], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def test_health_ok_then_degraded_when_p95_is_over_threshold(
    isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    env = {**isolated.env, "LLM_P95_ALERT_MS": "250"}
    start_worker(isolated=isolated, concurrency=4, LLM_P95_ALERT_MS="250")
    for handle in [
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id})
        for _ in range(10)
    ]:
        handle.get(timeout=60)
    code, report = health(env)
    assert code == 0 and report["status"] == "ok"
    total = report["latency_ms"]["total_latency_ms"]
    assert total["count"] == 10 and total["p95"] < 250
    assert set(report["latency_ms"]) == {"queue_wait_ms", "provider_latency_ms", "total_latency_ms"}
    assert report["queues"] == {"llm": 0, "batch": 0, "llm.deferred": 0}

    fake.set_always("openai", Fault(delay=0.4))
    for handle in [
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id}) for _ in range(4)
    ]:
        handle.get(timeout=60)
    code, report = health(env)
    assert code == 1 and report["status"] == "degraded"
    assert report["latency_ms"]["total_latency_ms"]["p95"] > 250
    assert "LLM_P95_ALERT_MS" in report["reasons"][0]


def test_health_counts_waiting_jobs(isolated: Any, user_id: str) -> None:
    for _ in range(3):
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id})
    isolated.app.send_task("llm.batch.probe", kwargs={}, queue="batch")
    _, report = health(isolated.env)
    assert report["queues"] == {"llm": 3, "batch": 1, "llm.deferred": 0}


def test_open_circuit_degrades_health(isolated: Any) -> None:
    from worker.breaker import CircuitBreaker
    from worker.connections import connect
    from worker.errors import ProviderUnavailableError
    from worker.settings import load_settings

    settings = load_settings(REDIS_URL=isolated.url, LLM_PROVIDER="openai", OPENAI_API_KEY="k")
    breaker = CircuitBreaker.from_settings(connect(isolated.url), settings)
    code, report = health(isolated.env)
    assert code == 0 and report["open_circuits"] == []
    for _ in range(settings.breaker_failures):
        failure = ProviderUnavailableError("fake 503", provider="openai", status=503)
        breaker.record("openai", error=failure, probe=False)
    code, report = health(isolated.env)
    assert code == 1 and report["status"] == "degraded"
    assert [c["provider"] for c in report["open_circuits"]] == ["openai"]
    assert any(reason.startswith("circuit open") for reason in report["reasons"])
