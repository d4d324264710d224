"""The HTTP front (producer/web.py) through a real server and a real HTTP client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.fakes import FakeProvider, Fault
from tests.harness import ROOT, free_port, wait_for

PROMPT = "Web prompt QUOKKA-51 must never leave the queue."


@pytest.fixture
def web(isolated: Any, run_dir: Any) -> Iterator[str]:
    port = free_port()
    log = (run_dir / f"web-{port}.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "producer.web:app",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "warning",
        ],
        env={**isolated.env, "LLM_P95_ALERT_MS": "250"},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/docs", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_for(up, timeout=30, what="uvicorn")
    yield base
    server.terminate()
    server.wait(timeout=10)
    log.close()


def poll(base: str, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
        return body if body["state"] in ("SUCCESS", "FAILURE") else None

    result: dict[str, Any] = wait_for(done, timeout=60, what=f"job {job_id}", interval=0.05)
    return result


def test_enqueue_poll_and_health(
    web: str, isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(isolated=isolated, concurrency=4, LLM_P95_ALERT_MS="250")
    accepted = requests.post(
        f"{web}/v1/completions",
        json={
            "messages": [{"role": "user", "content": PROMPT}],
            "user_id": user_id,
            "max_tokens": 50,
        },
        timeout=5,
    )
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    assert accepted.json()["status_url"] == f"/v1/jobs/{job_id}"
    body = poll(web, job_id)
    assert body["state"] == "SUCCESS"
    assert body["result"]["text"] == fake.text and body["result"]["request_id"]
    assert requests.get(f"{web}/health", timeout=5).status_code == 200

    fake.set_always("openai", Fault(delay=0.4))
    ids = [
        requests.post(
            f"{web}/v1/completions",
            json={"messages": [{"role": "user", "content": PROMPT}], "user_id": user_id},
            timeout=5,
        ).json()["id"]
        for _ in range(3)
    ]
    for slow_id in ids:
        assert poll(web, slow_id)["state"] == "SUCCESS"
    degraded = requests.get(f"{web}/health", timeout=5)
    assert degraded.status_code == 503
    assert degraded.json()["status"] == "degraded"


def test_bad_input_is_rejected_before_enqueue(web: str, isolated: Any, user_id: str) -> None:
    answer = requests.post(
        f"{web}/v1/completions",
        json={"messages": [{"role": "wizard", "content": PROMPT}], "user_id": user_id},
        timeout=5,
    )
    assert answer.status_code == 422
    assert "role" in answer.text
    broker = isolated.app.connection_for_write().default_channel.client
    assert broker.llen("llm") == 0


def test_failed_job_reports_typed_error(
    web: str, isolated: Any, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(isolated=isolated, concurrency=2)
    job_id = requests.post(
        f"{web}/v1/completions",
        json={
            "messages": [{"role": "user", "content": PROMPT}],
            "user_id": user_id,
            "model": "gpt-4o",
            "max_tokens": 16000,
        },
        timeout=5,
    ).json()["id"]
    body = poll(web, job_id)
    assert body["state"] == "FAILURE"
    assert body["error"]["type"] == "BudgetExceededError"
    assert "LLM_MAX_COST_PER_REQUEST" in body["error"]["message"]
    assert fake.requests() == 0
