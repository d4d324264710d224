"""Flower beside a real worker: task runtimes, Prometheus metrics, auth, a screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from producer import submit
from tests.fakes import FakeProvider
from tests.harness import ROOT, TEST_KEYS, Flower, wait_for

PROMPT = "Flower must never show this prompt: AXOLOTL-28."
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture
def flower(worker_env: dict[str, str], run_dir: Path) -> Iterator[Flower]:
    # Deployments use basic auth (tested below); here the API is opened to the test.
    server = Flower({**worker_env, "FLOWER_UNAUTHENTICATED_API": "true"}, run_dir)
    yield server
    server.stop()


def seen_by_flower(flower: Flower, ids: set[str]) -> dict[str, Any]:
    tasks: dict[str, Any] = requests.get(f"{flower.url}/api/tasks", timeout=5).json()
    done = {i: tasks[i] for i in ids if tasks.get(i, {}).get("state") == "SUCCESS"}
    return done if len(done) == len(ids) else {}


def test_flower_shows_runtimes_and_metrics_without_prompts(
    flower: Flower, worker: Any, fake: FakeProvider, user_id: str
) -> None:
    # Flower subscribes to events as it starts: wait until it sees a job at all.
    def first_seen() -> bool:
        job = submit([{"role": "user", "content": PROMPT}], user_id)
        job.get(timeout=30)
        return bool(seen_by_flower(flower, {job.id}))

    wait_for(first_seen, timeout=30, what="flower to receive task events", interval=0.2)
    jobs = [submit([{"role": "user", "content": PROMPT}], user_id) for _ in range(5)]
    for job in jobs:
        job.get(timeout=30)
    tasks = wait_for(
        lambda: seen_by_flower(flower, {j.id for j in jobs}),
        timeout=30,
        what="flower to show the jobs",
    )
    for task in tasks.values():
        assert task["name"] == "llm.complete"
        assert isinstance(task["runtime"], float) and task["runtime"] > 0
        assert "messages=<1 messages>" in task["kwargs"]
        assert "provider='openai'" in task["result"] and "cost_usd=" in task["result"]

    api = requests.get(f"{flower.url}/api/tasks", timeout=5).text
    assert "AXOLOTL" not in api and fake.text not in api
    for key in TEST_KEYS:
        assert key not in api

    metrics = requests.get(f"{flower.url}/metrics", timeout=5).text
    runtime = [
        line
        for line in metrics.splitlines()
        if line.startswith("flower_task_runtime_seconds_bucket") and 'task="llm.complete"' in line
    ]
    assert runtime
    # The LLM-sized buckets, from flowerconfig.py: Flower was started without flags for them.
    assert any('le="300.0"' in line for line in runtime)

    # Results read from the backend through Flower's API carry no completion text either.
    shown = requests.get(f"{flower.url}/api/task/result/{jobs[0].id}", timeout=5).json()
    assert shown["state"] == "SUCCESS" and "provider='openai'" in shown["result"]
    assert fake.text not in json.dumps(shown)

    screenshot(flower)


def screenshot(flower: Flower) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by ./run test (Debian package chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "flower-tasks.png"
    target.unlink(missing_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={ARTIFACTS / '.chromium'}",
        "--window-size=1600,900",
        "--virtual-time-budget=8000",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", f"{flower.url}/tasks"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "llm.complete" in dom  # the tasks table rendered our jobs
    subprocess.run(
        [chromium, *flags, f"--screenshot={target}", f"{flower.url}/tasks"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 20_000
    shutil.rmtree(ARTIFACTS / ".chromium", ignore_errors=True)


def test_flower_basic_auth(worker_env: dict[str, str], run_dir: Path) -> None:
    server = Flower(worker_env, run_dir, "--basic-auth=ops:s3cret-pass")
    try:
        assert requests.get(f"{server.url}/api/tasks", timeout=5).status_code == 401
        authed = requests.get(f"{server.url}/api/tasks", auth=("ops", "s3cret-pass"), timeout=5)
        assert authed.status_code == 200
    finally:
        server.stop()
