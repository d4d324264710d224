"""Flower beside a real worker: task runtimes, Prometheus metrics, auth, a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from producer import submit
from tests.fakes import FakeProvider
from tests.harness import CELERY, ROOT, TEST_KEYS, free_port, wait_for

PROMPT = "Flower must never show this prompt: AXOLOTL-28."
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
BUCKETS = next(
    arg.split("=", 1)[1]
    for arg in COMPOSE["services"]["flower"]["command"]
    if arg.startswith("--task-runtime-metric-buckets=")
)
ARTIFACTS = ROOT / "artifacts"


class Flower:
    def __init__(self, env: dict[str, str], run_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = run_dir / f"flower-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                "worker",
                "flower",
                "--address=127.0.0.1",
                f"--port={self.port}",
                f"--task-runtime-metric-buckets={BUCKETS}",
                *extra,
            ],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, timeout=30, what="flower")

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthcheck", timeout=1).ok
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()


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
        assert "sha256:" in task["kwargs"]
        assert "'provider': 'openai'" in task["result"]

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
    assert any('le="300.0"' in line for line in runtime)  # the LLM-sized buckets

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
