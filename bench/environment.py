"""The services a benchmark run needs: a private Redis, the async fake, workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness import ROOT, RedisServer, Worker, free_port, wait_for

BENCH_KEY = "sk-bench-not-a-real-key"


class Environment:
    """Starts Redis and the fake provider; starts and stops workers on demand."""

    def __init__(self, base: Path, *, quick: bool) -> None:
        self.base = base
        self.quick = quick
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []

    def __enter__(self) -> Environment:
        self.redis = RedisServer(self.base / "redis")
        os.environ["REDIS_URL"] = self.redis.url
        self.fake_port = free_port()
        self.fake_url = f"http://127.0.0.1:{self.fake_port}"
        self._fake_log = (self.logs / "fake.log").open("wb")
        self.fake = subprocess.Popen(
            [sys.executable, "-m", "bench.fakeserver", "--port", str(self.fake_port)],
            cwd=ROOT,
            stdout=self._fake_log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._fake_up, timeout=30, what="the benchmark's fake provider")
        self.worker_env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": BENCH_KEY,
            "OPENAI_BASE_URL": f"{self.fake_url}/v1",
            "LLM_TIMEOUT_SECONDS": "30",
            # On, so every job still checks it, but too high for thousands of jobs to hit.
            "LLM_USER_TOKENS_PER_HOUR": str(10**12),
        }
        from worker.app import app

        self.app = app
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for worker in self.workers:
            worker.stop()
        self.fake.terminate()
        self.fake.wait(timeout=10)
        self._fake_log.close()
        self.redis.stop()

    def control(self, **change: Any) -> dict[str, Any]:
        """Read (and with arguments, change) the fake's delay and counters."""
        data = json.dumps(change).encode() if change else None
        request = urllib.request.Request(
            f"{self.fake_url}/_control",
            data=data,
            method="POST" if change else "GET",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            state: dict[str, Any] = json.loads(answer.read())
        return state

    def start_worker(self, *, concurrency: int, queues: str = "llm", **env: str) -> Worker:
        """A worker that also runs the baseline tasks in bench/tasks.py."""
        worker = Worker(
            {**self.worker_env, **env},
            self.logs,
            concurrency=concurrency,
            queues=queues,
            extra=["-I", "bench.tasks"],
        )
        self.workers.append(worker)
        return worker.wait_ready(self.app)

    def stop_worker(self, worker: Worker) -> None:
        """Stop one worker now."""
        worker.stop()
        self.workers.remove(worker)

    def _fake_up(self) -> bool:
        try:
            self.control()
            return True
        except OSError:
            return False
