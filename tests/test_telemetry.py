"""Telemetry through real parts: Debian's Prometheus scrapes a worker, OTLP traces collected."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from producer import submit
from tests.conftest import StartWorker
from tests.fakes import FakeProvider, Fault
from tests.harness import Isolated, RedisServer, Worker, free_port, serve_front, wait_for
from tests.otlp import Collector, Span
from tests.prometheus import PrometheusServer, scrape, value
from worker import telemetry
from worker.breaker import BreakerConfig, CircuitBreaker
from worker.errors import BudgetExceededError, ProviderUnavailableError, RateLimitedError
from worker.resilience import Admission
from worker.telemetry import Metrics

MARKER = "zebra-marker-5f1c"


def private(**env: str) -> dict[str, str]:
    """Worker environment with its own limit keys and deferred queue."""
    tag = uuid.uuid4().hex[:8]
    return {"LLM_RATE_LIMIT_PREFIX": f"tel-{tag}", "LLM_DEFERRED_QUEUE": f"deferred-{tag}", **env}


def ask(prompt: str, user: str, queue: str, **options: Any) -> Any:
    """Submit one deterministic (so cacheable) job."""
    messages = [{"role": "user", "content": f"{prompt} {MARKER}"}]
    return submit(messages, user, queue=queue, temperature=0.0, **options)


def outcome(job: Any) -> dict[str, Any] | RateLimitedError:
    """A job's result, or the RateLimitedError it failed with."""
    try:
        result: dict[str, Any] = job.get(timeout=60)
        return result
    except RateLimitedError as exc:
        return exc


def test_metrics_count_50_jobs_exactly_and_prometheus_sums_the_cost(
    start_worker: StartWorker, fake: FakeProvider, tmp_path: Path
) -> None:
    queue = f"tel-{uuid.uuid4().hex[:6]}"
    tag = uuid.uuid4().hex[:6]
    user, limited = f"user-{tag}", f"limited-{tag}"
    port = free_port()
    start_worker(
        4,
        queue,
        **private(
            LLM_METRICS_PORT=str(port),
            LLM_METRICS_HOST="127.0.0.1",
            LLM_RETRY_ATTEMPTS="1",
            LLM_USER_LIMITS=json.dumps({limited: {"requests_per_minute": 1}}),
        ),
    )
    prometheus = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
    try:
        prompts = [f"Question {tag}-{i}?" for i in range(39)]
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda p: ask(p, user, queue).get(timeout=60), prompts))
        # One fallback: openai answers 503 once (no retries), anthropic takes the job.
        fake.script("openai", Fault(status=503))
        done.append(ask(f"Fallback {tag}?", user, queue).get(timeout=60))
        assert done[-1]["provider"] == "anthropic"
        # Five repeats the worker answers from the response cache.
        hits = [ask(p, user, queue, check_cache=False).get(timeout=60) for p in prompts[:5]]
        assert all(h["cached"] and h["cost_usd"] == 0 for h in hits)
        # One request a minute for this user: one runs, four are rejected.
        capped = [
            outcome(ask(f"Capped {tag}-{i}?", limited, queue, on_limit="fail")) for i in range(5)
        ]
        rejected = [c for c in capped if isinstance(c, RateLimitedError)]
        assert len(rejected) == 4
        results = [*done, *hits, *(c for c in capped if isinstance(c, dict))]
        assert len(results) == 46

        samples = scrape(port)
        jobs = "llmq_jobs_total"
        assert value(samples, jobs, outcome="completed") == 41
        assert value(samples, jobs, outcome="cache_hit") == 5
        assert value(samples, jobs, outcome="RateLimitedError") == 4
        assert value(samples, jobs) == 50
        calls = "llmq_provider_calls_total"
        assert value(samples, calls, provider="openai", outcome="ok") == 40
        assert value(samples, calls, provider="openai") == 41  # the one 503
        assert value(samples, calls, provider="anthropic", outcome="ok") == 1
        paid = [r for r in results if not r["cached"]]
        for metric, field in (
            ("llmq_input_tokens_total", "input_tokens"),
            ("llmq_output_tokens_total", "output_tokens"),
            ("llmq_cached_input_tokens_total", "cached_input_tokens"),
            ("llmq_reasoning_tokens_total", "reasoning_tokens"),
        ):
            assert value(samples, metric) == sum(r[field] for r in paid), metric
        total_cost = sum(r["cost_usd"] for r in results)
        assert total_cost > 0
        assert value(samples, "llmq_cost_usd_total") == pytest.approx(total_cost, rel=1e-12)
        assert value(samples, "llmq_cache_hits_total") == 5
        # 41 answered by a provider and 4 rejected after looking: 45 lookups missed.
        assert value(samples, "llmq_cache_misses_total") == 45
        saved = sum(r["cost_usd"] for r in done[:5])
        assert value(samples, "llmq_cache_saved_usd_total") == pytest.approx(saved, rel=1e-12)
        limit = rejected[0].limit_name
        assert value(samples, "llmq_rate_limit_rejections_total", limit=str(limit)) == 4
        assert value(samples, "llmq_queue_wait_seconds_count") == 50
        assert value(samples, "llmq_job_latency_seconds_count") == 50
        assert value(samples, "llmq_provider_latency_seconds_count") == 42
        assert value(samples, "llmq_breaker_state", provider="openai") == 0
        assert not any(user in str(labels) or limited in str(labels) for _, labels in samples)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert MARKER not in text

        # The real server sees the same: wait for a scrape that has every job.
        wait_for(
            lambda: prometheus.scalar("sum(llmq_jobs_total)") == 50,
            timeout=30,
            what="a Prometheus scrape after the 50 jobs",
        )
        cost = prometheus.scalar("sum(llmq_cost_usd_total)")
        assert cost == pytest.approx(total_cost, rel=1e-12)
        by_outcome = {
            r["metric"]["outcome"]: float(r["value"][1])
            for r in prometheus.query("sum by (outcome) (llmq_jobs_total)")
        }
        assert by_outcome == {"completed": 41, "cache_hit": 5, "RateLimitedError": 4}
    finally:
        prometheus.stop()


def test_deferrals_and_budget_rejections_are_counted(
    start_worker: StartWorker, fake: FakeProvider
) -> None:
    queue = f"tel-{uuid.uuid4().hex[:6]}"
    user = f"defer-{uuid.uuid4().hex[:6]}"
    port = free_port()
    worker = start_worker(
        2,
        queue,
        **private(
            LLM_METRICS_PORT=str(port),
            LLM_METRICS_HOST="127.0.0.1",
            LLM_USER_REQUESTS_PER_MINUTE="1",
            LLM_USER_REQUEST_WINDOW_SECONDS="2",
        ),
    )
    # One request per 2 s window: the second job waits on the deferred queue, then runs.
    first, second = (ask(f"Defer {i}?", user, queue, on_limit="defer") for i in range(2))
    assert first.get(timeout=60)["cost_usd"] > 0 and second.get(timeout=60)["cost_usd"] > 0
    # Over LLM_MAX_COST_PER_REQUEST at once: the cost guard rejects it, no call.
    with pytest.raises(BudgetExceededError):
        ask("Too dear?", user, queue, model="gpt-4o", max_tokens=16000).get(timeout=60)
    deferred = worker.records("llm_deferred")
    assert deferred and {r["limit"] for r in deferred} == {"user_requests"}
    samples = scrape(port)
    deferrals = value(samples, "llmq_rate_limit_deferrals_total", limit="user_requests")
    assert deferrals == len(deferred)
    # Each deferral was a run that the limit rejected; the two jobs completed once each.
    assert value(samples, "llmq_rate_limit_rejections_total", limit="user_requests") == deferrals
    assert value(samples, "llmq_jobs_total", outcome="RateLimitedError") == deferrals
    assert value(samples, "llmq_jobs_total", outcome="completed") == 2
    assert value(samples, "llmq_budget_rejections_total", budget="request") == 1
    assert value(samples, "llmq_jobs_total", outcome="BudgetExceededError") == 1
    assert value(samples, "llmq_provider_calls_total") == 2


def test_a_taken_metrics_port_stops_the_worker_saying_so(
    worker_env: dict[str, str], run_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**worker_env, "LLM_METRICS_PORT": str(port), "LLM_METRICS_HOST": "127.0.0.1"}
        refused = Worker(env, run_dir, queues=f"taken-{uuid.uuid4().hex[:6]}")
        try:
            status = refused.process.wait(timeout=60)
        finally:
            refused.stop()
    assert status == 78
    assert f"Cannot serve /metrics on 127.0.0.1:{port}" in refused.output()
    assert "LLM_METRICS_PORT" in refused.output()


# --- OpenTelemetry ------------------------------------------------------------------

_memory: Any = None


@pytest.fixture(scope="module")
def producer_spans() -> Any:
    """The test process as an application using OpenTelemetry: its spans kept in memory."""
    global _memory
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if _memory is None:  # a process has one global tracer provider
        _memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_memory))
        trace.set_tracer_provider(provider)
    _memory.clear()
    return _memory


@pytest.fixture
def collector() -> Iterator[Collector]:
    """An OTLP/HTTP collector the worker exports to."""
    running = Collector()
    yield running
    running.stop()


def test_trace_runs_from_producer_to_worker_to_each_attempt(
    start_worker: StartWorker, fake: FakeProvider, producer_spans: Any, collector: Collector
) -> None:
    queue = f"otel-{uuid.uuid4().hex[:6]}"
    start_worker(
        2,
        queue,
        **private(
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="50",
            LLM_RETRY_ATTEMPTS="2",
            LLM_RETRY_INITIAL_WAIT="0.01",
        ),
    )
    # The first attempt fails (503), the second answers: two attempt spans.
    fake.script("openai", Fault(status=503))
    result = ask(f"Traced {uuid.uuid4().hex[:6]}?", f"user-{uuid.uuid4().hex[:6]}", queue).get(
        timeout=60
    )
    assert result["attempts"] == 2

    sent = [s for s in producer_spans.get_finished_spans() if s.name == "send llm.complete"]
    assert len(sent) == 1
    producer = sent[0].context
    trace_id, producer_id = f"{producer.trace_id:032x}", f"{producer.span_id:016x}"

    def worker_side() -> list[Span] | None:
        spans = collector.trace(trace_id)
        return spans if len(spans) == 3 else None

    spans = wait_for(worker_side, timeout=20, what="the worker's 3 spans at the collector")
    (job,) = [s for s in spans if s.name == "llm.complete"]
    assert job.parent_span_id == producer_id
    assert job.service == "llmq-worker"
    assert job.attributes["llmq.cost_usd"] == pytest.approx(result["cost_usd"])
    assert job.attributes["llmq.queue_wait_ms"] >= 0
    attempts = sorted(
        (s for s in spans if s.name.startswith("chat ")), key=lambda s: s.attributes["llmq.attempt"]
    )
    assert [a.parent_span_id for a in attempts] == [job.span_id, job.span_id]
    assert [a.attributes["llmq.attempt"] for a in attempts] == [1, 2]
    failed, served = attempts
    assert failed.attributes["error.type"] == "ProviderUnavailableError"
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    assert served.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": result["model"],
        "gen_ai.response.model": result["model"],
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": result["input_tokens"],
        "gen_ai.usage.output_tokens": result["output_tokens"],
        "gen_ai.usage.cache_read.input_tokens": result["cached_input_tokens"],
        "llmq.cost_usd": pytest.approx(result["cost_usd"]),
        "llmq.cached": False,
        "llmq.queue_wait_ms": pytest.approx(result["queue_wait_ms"]),
        "llmq.attempt": 2,
    }
    # No prompt text anywhere: not in what the worker exported, nor in the producer's span.
    assert collector.bodies and not any(MARKER.encode() in body for body in collector.bodies)
    assert MARKER not in sent[0].to_json()


# --- in-process parts ----------------------------------------------------------------


@pytest.fixture
def counted() -> Iterator[Metrics]:
    """Metrics on in this process, off again after the test."""
    yield telemetry.enable_metrics(tenants=["acme"])
    telemetry.disable_metrics()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of a metric in `metrics`' registry (0 when absent)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_breaker_transitions_are_counted_by_the_call_that_caused_them(
    redis_server: RedisServer, counted: Metrics
) -> None:
    clock = [time.time()]
    breaker = CircuitBreaker(
        redis_server.client(),
        config=BreakerConfig(failures=2, min_calls=100, cooldown_seconds=30),
        endpoints={"openai": f"tel-{uuid.uuid4().hex[:8]}"},
        clock=lambda: clock[0],
    )
    down = ProviderUnavailableError("openai answered HTTP 503", provider="openai", status=503)
    for _ in range(3):  # the second opens it; the third finds it open already
        breaker.record("openai", error=down, probe=False)
    assert sample(counted, "llmq_breaker_state", provider="openai") == 2
    clock[0] += 30
    assert breaker.admit("openai") is Admission.PROBE
    assert sample(counted, "llmq_breaker_state", provider="openai") == 1
    breaker.record("openai", error=None, probe=True)
    assert sample(counted, "llmq_breaker_state", provider="openai") == 0
    moves = {
        to: sample(counted, "llmq_breaker_transitions_total", provider="openai", to=to)
        for to in ("open", "half_open", "closed")
    }
    assert moves == {"open": 1, "half_open": 1, "closed": 1}


def test_tenant_label_is_bounded_to_the_users_named(counted: Metrics) -> None:
    for user in ("acme", "u-1", "u-2", "u-3"):
        telemetry.on_job({"user_id": user, "error_kind": None, "cost_usd": 0.0})
    assert sample(counted, "llmq_jobs_total", outcome="completed", tenant="acme") == 1
    assert sample(counted, "llmq_jobs_total", outcome="completed", tenant="other") == 3
    tenants = {
        s.labels.get("tenant")
        for family in counted.registry.collect()
        for s in family.samples
        if "tenant" in s.labels
    }
    assert tenants == {"acme", "other"}


def test_telemetry_off_loads_neither_server_nor_sdk(worker_env: dict[str, str]) -> None:
    env = {k: v for k, v in worker_env.items() if not k.startswith(("OTEL_", "LLM_METRICS"))}
    code = (
        "import sys, worker.tasks\n"
        "from worker import telemetry\n"
        "from worker.settings import get_settings\n"
        "telemetry.start_worker(get_settings())\n"
        "telemetry.on_call({'provider': 'openai', 'model': 'm', 'cost_usd': 1.0})\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter'))]\n"
        "print(telemetry.enabled(), loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "False []", done.stderr


def test_http_front_serves_its_own_metrics(isolated: Isolated, run_dir: Path) -> None:
    with serve_front({**isolated.env, "LLM_HTTP_AUTH": "false"}, run_dir) as (base, _):
        body = {"messages": [{"role": "user", "content": MARKER}], "user_id": "u-web"}
        posted = requests.post(f"{base}/v1/completions", json=body, timeout=10)
        assert posted.status_code == 202
        job_id = posted.json()["id"]
        assert requests.get(f"{base}{posted.json()['status_url']}", timeout=10).ok
        assert requests.post(f"{base}/v1/completions", json={}, timeout=10).status_code == 422
        text = requests.get(f"{base}/metrics", timeout=10).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    requests_total = "llmq_http_requests_total"
    route = "/v1/completions"
    assert value(samples, requests_total, method="POST", route=route, status="202") == 1
    assert value(samples, requests_total, method="POST", route=route, status="422") == 1
    assert value(samples, requests_total, method="GET", route="/v1/jobs/{job_id:path}") == 1
    assert value(samples, "llmq_http_request_seconds_count", method="POST", route=route) == 2
    # Routes by template: no job id, user or prompt in any label.
    assert job_id not in text and "u-web" not in text and MARKER not in text
