"""`llmq health`: fleet percentiles, queues and status, exit code for alerting."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.fakes import FakeProvider, Fault
from tests.harness import ROOT, wait_for

LLMQ = str(Path(ROOT) / ".venv" / "bin" / "llmq")
JOB = {"messages": [{"role": "user", "content": "Is the fleet healthy?"}]}


def health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([LLMQ, "health"], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def test_health_ok_then_degraded_when_p95_is_over_threshold(
    isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    env = {**isolated.env, "LLM_P95_ALERT_MS": "1000"}
    start_worker(isolated=isolated, concurrency=4, LLM_P95_ALERT_MS="1000")
    for handle in [
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id})
        for _ in range(10)
    ]:
        handle.get(timeout=60)
    code, report = health(env)
    assert code == 0 and report["status"] == "ok"
    total = report["latency_ms"]["total_latency_ms"]
    assert total["count"] == 10 and total["p95"] < 1000
    assert set(report["latency_ms"]) == {"queue_wait_ms", "provider_latency_ms", "total_latency_ms"}
    assert report["queues"] == {"llm": 0, "batch": 0, "llm.deferred": 0}

    fake.set_always("openai", Fault(delay=1.2))
    for handle in [
        isolated.app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id}) for _ in range(4)
    ]:
        handle.get(timeout=60)
    code, report = health(env)
    assert code == 1 and report["status"] == "degraded"
    assert report["latency_ms"]["total_latency_ms"]["p95"] > 1000
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


def _prices(path: Path, input_usd: float) -> str:
    """A prices file repricing gpt-4o-mini's input."""
    path.write_text(
        json.dumps(
            {
                "models": {
                    "gpt-4o-mini": {
                        "provider": "openai",
                        "input": input_usd,
                        "output": 0.60,
                        "context_window": 128_000,
                        "max_output_tokens": 16_384,
                    }
                }
            }
        )
    )
    return str(path)


FAST_HEARTBEAT = {"LLM_FLEET_HEARTBEAT_SECONDS": "0.5"}


def test_workers_with_different_prices_are_a_mixed_fleet(
    isolated: Any, start_worker: Any, tmp_path: Path
) -> None:
    cheap = start_worker(
        isolated=isolated, concurrency=1, LLM_PRICES_FILE=_prices(tmp_path / "a.json", 0.15)
    )
    dear = start_worker(
        isolated=isolated,
        concurrency=1,
        LLM_PRICES_FILE=_prices(tmp_path / "b.json", 15.0),  # 100x: a stale or wrong file
        **FAST_HEARTBEAT,
    )
    code, report = health(isolated.env)
    assert code == 1 and report["status"] == "degraded"
    fleet = report["fleet"]
    assert set(fleet["workers"]) == {cheap.name, dear.name} and fleet["mixed"] is True
    assert fleet["differing"] == ["prices"]
    assert sorted(fleet["fingerprints"].values()) == sorted([[cheap.name], [dear.name]])
    [reason] = [r for r in report["reasons"] if r.startswith("mixed fleet")]
    assert cheap.name in reason and dear.name in reason and "differing in prices" in reason
    assert "LLM_PRICES_FILE" in reason

    # A killed worker stops beating and drops out: the fleet is whole again.
    dear.kill()
    code, report = wait_for(
        lambda: (found := health(isolated.env))[0] == 0 and found,
        timeout=10,
        what="the killed worker to drop out",
        interval=0.2,
    )
    assert report["status"] == "ok" and list(report["fleet"]["workers"]) == [cheap.name]
    # A worker that stops cleanly leaves at once.
    cheap.stop()
    assert health(isolated.env)[1]["fleet"]["workers"] == {}


def test_workers_with_the_same_prices_are_one_fleet(
    isolated: Any, start_worker: Any, tmp_path: Path
) -> None:
    prices = _prices(tmp_path / "prices.json", 0.15)
    as_toml = tmp_path / "prices.toml"  # the same prices, written differently
    as_toml.write_text(
        '[models."gpt-4o-mini"]\nprovider = "openai"\ninput = 0.150\noutput = 0.6\n'
        "context_window = 128000\nmax_output_tokens = 16384\n"
    )
    first = start_worker(isolated=isolated, concurrency=1, LLM_PRICES_FILE=prices)
    second = start_worker(isolated=isolated, concurrency=1, LLM_PRICES_FILE=str(as_toml))
    code, report = health(isolated.env)
    assert code == 0 and report["status"] == "ok", report["reasons"]
    fleet = report["fleet"]
    assert fleet["mixed"] is False and fleet["differing"] == []
    assert list(fleet["fingerprints"].values()) == [sorted([first.name, second.name])]
    assert fleet["workers"][first.name]["queues"] == ["batch", "llm", "llm.deferred"]
