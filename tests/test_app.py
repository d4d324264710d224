"""The Celery app's configuration and the worker's start-up checks."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from tests.harness import CELERY, ROOT
from worker.app import configure, create_app, transport_options
from worker.settings import load_settings


def test_safe_celery_configuration(app: Any) -> None:
    conf = app.conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_pool == "threads"
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.result_expires == 86_400
    broker_vt = conf.broker_transport_options["visibility_timeout"]
    assert broker_vt == conf.result_backend_transport_options["visibility_timeout"]
    assert broker_vt <= 120
    assert conf.broker_transport_options["unacked_restore_throttle"] == 1
    # Producers and workers ride out a Redis restart (tests/test_faults.py shows it).
    assert conf.task_publish_retry and conf.task_publish_retry_policy["max_retries"] >= 5
    assert conf.broker_connection_retry and conf.broker_connection_max_retries is None
    assert conf.result_backend_always_retry
    import worker.tasks  # noqa: F401  (the worker imports it via `include`)

    assert app.tasks["llm.complete"].name == "llm.complete"


def test_sentinel_and_tls_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "sentinel://s1:26379;sentinel://s2:26379")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "primary")
    settings = load_settings()
    assert transport_options(settings)["master_name"] == "primary"
    sentinel_app = Celery("t")
    configure(sentinel_app, settings)
    assert sentinel_app.conf.result_backend_transport_options["master_name"] == "primary"
    assert type(sentinel_app.backend).__name__ == "SentinelBackend"

    monkeypatch.setenv("REDIS_URL", "rediss://secure:6380/0")
    tls_app = Celery("t")
    configure(tls_app, load_settings())
    assert tls_app.conf.broker_use_ssl["ssl_cert_reqs"] is not None
    assert tls_app.connection_for_write().transport_cls == "rediss"


def test_producer_does_not_import_provider_sdks() -> None:
    code = (
        "import sys, producer; "
        "print(sorted(m for m in ('openai', 'anthropic', 'sumy', 'worker.tasks') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLM_PROVIDER": "openai", "OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
        (
            {"LLM_PROVIDER": "extractive", "LLM_FALLBACKS": "gemini", "GOOGLE_API_KEY": ""},
            "GOOGLE_API_KEY",
        ),
        ({"LLM_PROVIDER": "openai", "LLM_MODEL": "gpt-99"}, "gpt-99"),
    ],
)
def test_worker_exits_at_startup_naming_the_problem(
    worker_env: dict[str, str], env: dict[str, str], named: str
) -> None:
    done = subprocess.run(
        [CELERY, "-A", "worker", "worker", "-P", "threads", "-c", "1", "--without-mingle"],
        env={**worker_env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert named in done.stderr
    assert "ready" not in done.stderr


def test_env_file_is_read(tmp_path: Any, worker_env: dict[str, str]) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LLM_MAX_TOKENS=321\nLLM_PROVIDER=extractive\n")
    env = {k: v for k, v in worker_env.items() if k not in ("LLM_PROVIDER",)}
    env.pop("LLMQ_ENV_FILE", None)
    code = "from worker.settings import get_settings as g; print(g().max_tokens, g().provider)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.stdout.split() == ["321", "extractive"], done.stderr
    assert os.environ["LLMQ_ENV_FILE"] == os.devnull


def test_queues_are_declared_each_with_its_own_route() -> None:
    # A worker started without -Q consumes every declared queue (./run demo relies on it),
    # Celery's default queue included; each queue has its own exchange and routing key,
    # so no message lands in two.
    app = create_app()
    queues = app.amqp.queues
    assert {name: (q.exchange.name, q.routing_key) for name, q in queues.items()} == {
        "llm": ("llm", "llm"),
        "batch": ("batch", "batch"),
        "celery": ("celery", "celery"),
    }
    router = app.amqp.router
    assert router.route({}, "llm.complete")["queue"].name == "llm"
    for name in ("llm.batch.summarize", "llm.batch.part", "llm.batch.reduce"):
        assert router.route({}, name)["queue"].name == "batch"
