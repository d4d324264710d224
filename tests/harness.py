"""Real services for tests: a private redis-server and Celery workers in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))

OPENAI_TEST_KEY = "sk-test-llmq-openai-6c1f0b9a"
ANTHROPIC_TEST_KEY = "sk-ant-test-llmq-3d7e22f1"
GOOGLE_TEST_KEY = "AIza-test-llmq-9b4c01de"
TEST_KEYS = (OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY, GOOGLE_TEST_KEY)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, or fail saying `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Isolated:
    """A Redis of its own: env for workers and a Celery app for producing."""

    env: dict[str, str]
    app: Any
    url: str


class RedisServer:
    """A private redis-server on a free port, which tests may kill and restart."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        args: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        # Extra redis-server options, after the defaults so they win: e.g.
        # ("--maxmemory", "5mb", "--maxmemory-policy", "allkeys-lru").
        self.args = [*args, *(["--requirepass", password] if password else [])]
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.binary = binary
        self.start()

    @property
    def url(self) -> str:
        """redis:// URL of database 0 (with the password, if the server has one)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port and directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                # Tests that need a Redis of their own each take a database of it.
                "--databases",
                "256",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password)
        wait_for(lambda: _pings(client), timeout=10, what=f"redis-server on {self.port}")

    def stop(self, *, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL to simulate a crash)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        """A fresh client with str responses."""
        return redis.Redis(port=self.port, password=self.password, decode_responses=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Worker:
    """`celery -A worker worker` in a subprocess, with its output in a file."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 8,
        queues: str | None = "llm,batch",
        name: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.name = name or f"w{uuid.uuid4().hex[:8]}@test"
        self.log_path = log_dir / f"{self.name.split('@')[0]}.log"
        self.env = env
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                "worker",
                "worker",
                "-P",
                "threads",
                "-c",
                str(concurrency),
                # None: as `celery -A worker worker` starts, consuming the default queues.
                *(["-Q", queues] if queues is not None else []),
                "-n",
                self.name,
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
                *(extra or []),
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, app: Any, timeout: float = 60) -> Worker:
        """Block until the worker answers a ping (or fail with its log)."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited at start-up:\n{self.output()}")
            return bool(app.control.ping(destination=[self.name], timeout=0.3))

        wait_for(ready, timeout=timeout, what=f"worker {self.name}", interval=0.1)
        return self

    def output(self) -> str:
        """Everything the worker has written so far (also after it stopped)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def records(self, *events: str) -> list[dict[str, Any]]:
        """The worker's JSON log records, of the given events only if any are named."""
        found = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue  # Celery's start-up banner is plain text
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (not events or record.get("event") in events):
                found.append(record)
        return found

    def kill(self) -> None:
        """SIGKILL the worker and its threads at once, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL if it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class Flower:
    """`celery -A worker flower` as the README starts it (flowerconfig.py read from ROOT)."""

    def __init__(self, env: dict[str, str], log_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"flower-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                "worker",
                "flower",
                "--address=127.0.0.1",
                f"--port={self.port}",
                *extra,
            ],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, timeout=30, what="flower")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited:\n{self.log_path.read_text(errors='replace')}")
        try:
            return requests.get(f"{self.url}/healthcheck", timeout=1).ok
        except requests.ConnectionError:
            return False

    def tasks(self) -> dict[str, Any]:
        """Flower's /api/tasks: every task it has seen, by id."""
        found: dict[str, Any] = requests.get(f"{self.url}/api/tasks", timeout=5).json()
        return found

    def stop(self) -> None:
        """Stop Flower."""
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()


class Monitor:
    """Every command the server runs, as MONITOR reports them, until stopped."""

    def __init__(self, server: RedisServer) -> None:
        # (client "host:port", or "lua" for a script's own commands; command name)
        self.seen: list[tuple[str, str]] = []
        self._port = server.port
        self._client = redis.Redis(port=server.port)
        # MONITOR is on once this returns.
        self._monitor = self._client.monitor().__enter__()  # type: ignore[no-untyped-call]
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

    def names(self) -> dict[str, str]:
        """Client address -> connection name, for the clients connected now."""
        return {
            entry["addr"]: entry["name"] or "other"
            for entry in redis.Redis(port=self._port).client_list()
        }

    @staticmethod
    def round_trips(seen: list[tuple[str, str]], clients: dict[str, str]) -> Counter[str]:
        """Top-level commands per connection name (scripts' inner commands excluded)."""
        return Counter(clients.get(client, "other") for client, _ in seen if client != "lua")

    def stop(self) -> None:
        """Stop monitoring."""
        self._client.connection_pool.disconnect()
        self._thread.join(5)


@contextmanager
def serve_front(env: dict[str, str], run_dir: Path) -> Iterator[tuple[str, Path]]:
    """`uvicorn producer.web:app` on a free port; yields its base URL and its log."""
    from worker.settings import API_KEY_ENV

    port = free_port()
    log_path = run_dir / f"web-{port}.log"
    with log_path.open("wb") as log:
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
            # The front never needs a provider key: it is given none.
            env={k: v for k, v in env.items() if k not in API_KEY_ENV.values()},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{log_path.read_text()}")
            try:
                return requests.get(f"{base}/docs", timeout=1).ok
            except requests.ConnectionError:
                return False

        try:
            wait_for(up, timeout=30, what="uvicorn")
            yield base, log_path
        finally:
            server.terminate()
            server.wait(timeout=10)
