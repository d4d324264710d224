"""Fixtures: a private Redis, the fake provider, and real Celery workers."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeProvider
from tests.harness import (
    ANTHROPIC_TEST_KEY,
    GOOGLE_TEST_KEY,
    OPENAI_TEST_KEY,
    Isolated,
    RedisServer,
    Worker,
)

_state: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Start the private Redis before any test module imports the Celery app."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the controller of `pytest -n N` runs no test; each of its workers has its own
    base = Path(tempfile.mkdtemp(prefix="llmq-test-"))
    server = RedisServer(base / "redis")
    _state.update(base=base, redis=server)
    os.environ["REDIS_URL"] = server.url
    os.environ["LLMQ_ENV_FILE"] = os.devnull
    os.environ["TIKTOKEN_CACHE_DIR"] = str(base / "tiktoken")
    for name in [n for n in os.environ if n.startswith("LLM_") or n.startswith("CELERY_")]:
        del os.environ[name]


@pytest.fixture(scope="session", autouse=True)
def no_key_in_any_log() -> Iterator[None]:
    """Fail the run if any test key reached any log a worker or server wrote."""
    yield
    base = _state.get("base")
    if base is None:
        return
    leaks = [
        f"{path.name}: {key[:12]}..."
        for path in (base / "run").glob("*.log")
        for key in (OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY, GOOGLE_TEST_KEY)
        if key in path.read_text(errors="replace")
    ]
    if leaks:
        pytest.fail("API KEYS LEAKED INTO LOGS:\n  " + "\n  ".join(leaks))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the private Redis."""
    server = _state.get("redis")
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """The session's private redis-server."""
    server: RedisServer = _state["redis"]
    return server


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """A directory for this run's worker logs and scratch files."""
    path: Path = _state["base"] / "run"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated corpus (tests/corpus.py) written as files, one per document."""
    from tests import corpus

    return corpus.write(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeProvider]:
    """The fake provider for the whole session."""
    server = FakeProvider()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server: FakeProvider, redis_server: RedisServer) -> FakeProvider:
    """The fake provider, reset: no faults, zero counts, and no cached answers.

    Every test gets the fake's same canned answer, so an answer cached by an earlier
    test would hide this test's provider calls.
    """
    fake_server.reset()
    client = redis_server.client()
    stale = list(client.scan_iter("llmq:cache:*", count=1000))
    if stale:
        client.unlink(*stale)
    return fake_server


@pytest.fixture(scope="session")
def app() -> Any:
    """The Celery app, configured for the private Redis."""
    from worker.app import app as celery_app

    return celery_app


_next_db = iter(range(1, 256))


def next_db() -> int:
    """A database of the session's Redis that no other test uses (0 is the shared one)."""
    return next(_next_db)


@pytest.fixture
def isolated(worker_env: dict[str, str], redis_server: RedisServer) -> Iterator[Isolated]:
    """Broker, backend and llmq keys in a fresh database, unseen by other tests."""
    from celery import Celery

    from worker.app import configure
    from worker.settings import load_settings

    url = f"redis://127.0.0.1:{redis_server.port}/{next_db()}"
    celery_app = Celery("llmq-isolated", set_as_current=False)
    configure(celery_app, load_settings(REDIS_URL=url))
    yield Isolated(env={**worker_env, "REDIS_URL": url}, app=celery_app, url=url)
    celery_app.close()


@pytest.fixture(scope="session")
def worker_env(
    fake_server: FakeProvider, redis_server: RedisServer, run_dir: Path
) -> dict[str, str]:
    """Environment of a worker using the fake provider: openai first, anthropic fallback."""
    return {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "LLM_PROVIDER": "openai",
        "LLM_FALLBACKS": "anthropic",
        "OPENAI_API_KEY": OPENAI_TEST_KEY,
        "ANTHROPIC_API_KEY": ANTHROPIC_TEST_KEY,
        "GOOGLE_API_KEY": GOOGLE_TEST_KEY,
        "OPENAI_BASE_URL": f"{fake_server.url}/v1",
        "ANTHROPIC_BASE_URL": fake_server.url,
        "GEMINI_BASE_URL": f"{fake_server.url}/gemini/v1beta/openai/",
        "LLM_TIMEOUT_SECONDS": "5",
        "LLM_VISIBILITY_TIMEOUT": "30",
        # Must stay below the visibility timeout (checked at start-up).
        "LLM_JOB_DEADLINE_SECONDS": "20",
        # This worker serves every test: a circuit opened by one test's injected faults
        # would send the tests after it to the fallback. Breaker tests start their own.
        "LLM_BREAKER_FAILURES": "10000",
        "LLM_BREAKER_MIN_CALLS": "1000000",
    }


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(app: Any, worker_env: dict[str, str], run_dir: Path) -> Iterator[StartWorker]:
    """Start workers with extra environment; all are stopped after the test."""
    started: list[Worker] = []

    def start(
        concurrency: int = 8,
        queues: str = "llm,batch",
        *,
        isolated: Isolated | None = None,
        **env: str,
    ) -> Worker:
        base = isolated.env if isolated else worker_env
        worker = Worker({**base, **env}, run_dir, concurrency=concurrency, queues=queues)
        started.append(worker)
        return worker.wait_ready(isolated.app if isolated else app)

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def worker(app: Any, worker_env: dict[str, str], run_dir: Path) -> Iterator[Worker]:
    """One worker with the default test environment, shared by the session."""
    process = Worker(worker_env, run_dir, name=f"main-{uuid.uuid4().hex[:6]}@test")
    process.wait_ready(app)
    yield process
    process.stop()


@pytest.fixture
def user_id() -> str:
    """A user id no other test uses, so Redis counters never collide."""
    return f"user-{uuid.uuid4().hex[:10]}"


MakePipeline = Callable[..., Any]


@pytest.fixture
def make_pipeline(fake: FakeProvider) -> MakePipeline:
    """Build an in-process Pipeline against the fake: openai first, anthropic fallback.

    Each pipeline gets its own endpoint path on the fake, so its circuits in the shared
    Redis are its own. Keyword arguments are environment variable names.
    """
    from worker.pipeline import Pipeline
    from worker.settings import load_settings

    def make(**env: object) -> Pipeline:
        path = uuid.uuid4().hex[:10]
        settings = load_settings(
            **{
                "LLM_PROVIDER": "openai",
                "LLM_FALLBACKS": "anthropic",
                "OPENAI_API_KEY": OPENAI_TEST_KEY,
                "ANTHROPIC_API_KEY": ANTHROPIC_TEST_KEY,
                "OPENAI_BASE_URL": f"{fake.url}/{path}/v1",
                "ANTHROPIC_BASE_URL": f"{fake.url}/{path}",
                "LLM_TIMEOUT_SECONDS": 5,
                "LLM_RETRY_INITIAL_WAIT_SECONDS": 0.05,
                **env,
            }
        )
        return Pipeline(settings)

    return make
