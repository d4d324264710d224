"""Telemetry through real parts: a worker's /metrics scraped by Debian's Prometheus."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from producer import submit
from tests.conftest import StartWorker
from tests.fakes import FakeProvider, Fault
from tests.harness import free_port, wait_for
from tests.prometheus import PrometheusServer, scrape, value
from worker.errors import RateLimitedError

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
