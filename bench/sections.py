"""The benchmarks, one function each, in the order the report lists them."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.result import ResultSet

from bench.environment import Environment
from bench.report import Report, ms
from bench.workloads import batch, cache_hits, limiter
from worker.metrics import percentile


def _messages(tag: str) -> list[dict[str, str]]:
    # Unique content per job, so the response cache always misses.
    return [{"role": "user", "content": f"Benchmark prompt {tag}: summarize nothing."}]


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
    assert p50 is not None and p99 is not None
    return p50, p99


def fake_ceiling(env: Environment, report: Report) -> None:
    """How much the async fake provider takes before it is the bottleneck."""
    section = report.section(
        "The fake provider's own ceiling",
        "wrk against the benchmark's fake provider (Starlette on uvicorn, one process). "
        "It must not be what limits the other figures.",
        ["load", "requests/s", "peak connections in flight"],
    )
    wrk = shutil.which("wrk")
    if wrk is None:
        section.notes.append("wrk is not installed (`./run bench` installs it): not measured.")
        return
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.body = \'{"model": "gpt-4o-mini", "messages": []}\'\n'
    )
    duration = "2s" if env.quick else "5s"
    runs = [(0.0, 64, "no delay, 64 connections"), (1.0, 1000, "1 s delay, 1000 connections")]
    for delay, connections, label in runs:
        env.control(delay=delay, reset=True)
        done = subprocess.run(
            [
                wrk,
                "-t2",
                f"-c{connections}",
                f"-d{duration}",
                "--timeout",
                "10s",
                "-s",
                str(script),
                f"{env.fake_url}/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
        rps = float(found.group(1)) if found else 0.0
        section.rows.append([label, f"{rps:,.0f}", str(env.control()["peak_in_flight"])])
    env.control(delay=0.0, reset=True)


def overhead(env: Environment, report: Report) -> None:
    """llm.complete with every step on versus a bare task making the same SDK call."""
    jobs = 50 if env.quick else 2000
    section = report.section(
        "1. Pipeline overhead",
        f"{jobs} jobs each, one at a time, alternating, against the fake provider with no "
        "delay, one worker (threads, 4). `llm.complete` runs every step (validation, cost "
        "guard, budget and rate-limit reservations, cache miss + store, JSON logs, latency "
        "metrics); the baseline `bench.bare_complete` makes the same openai SDK call and "
        "nothing else. End-to-end = `delay()` to `get()` in the producer.",
        ["task", "P50", "P99", "mean"],
    )
    env.control(delay=0.0, reset=True)
    worker = env.start_worker(concurrency=4, queues="llm,bench")
    run_id = uuid.uuid4().hex[:8]

    def pipeline_job(i: int) -> Any:
        return env.app.send_task(
            "llm.complete",
            kwargs={
                "messages": _messages(f"{run_id}-{i}"),
                "user_id": f"bench-{run_id}",
                "max_tokens": 64,
                "temperature": 0,
            },
        )

    def bare_job(i: int) -> Any:
        return env.app.send_task(
            "bench.bare_complete",
            kwargs={"messages": _messages(f"{run_id}-{i}")},
            queue="bench",
        )

    timings: dict[str, list[float]] = {"llm.complete": [], "bare": []}
    for i in range(-20, jobs):  # the first 20 of each warm up and are not counted
        for name, send in (("llm.complete", pipeline_job), ("bare", bare_job)):
            started = time.perf_counter()
            send(i).get(timeout=30)
            if i >= 0:
                timings[name].append((time.perf_counter() - started) * 1000)
    env.stop_worker(worker)

    full = {name: _quantiles(values) for name, values in timings.items()}
    for name, values in timings.items():
        p50, p99 = full[name]
        label = "`llm.complete` (all steps)" if name != "bare" else "bare Celery + SDK call"
        section.rows.append([label, ms(p50), ms(p99), ms(statistics.fmean(values))])
    added50 = full["llm.complete"][0] - full["bare"][0]
    added99 = full["llm.complete"][1] - full["bare"][1]
    section.rows.append(["**added by llmq**", ms(added50), ms(added99), ""])
    section.notes.append(
        f"Target: at most 1 ms added at P50 and 3 ms at P99. P50: {_verdict(added50, 1.0)}; "
        f"P99: {_verdict(added99, 3.0)}."
    )
    section.notes.append(
        f"Ratio llm.complete / bare at P50: {full['llm.complete'][0] / full['bare'][0]:.2f}x."
    )


def concurrency(env: Environment, report: Report) -> None:
    """Throughput with many slow calls in flight on one worker node, against Little's law."""
    delay = 0.2 if env.quick else 1.0
    levels = [8] if env.quick else [50, 100, 200, 400]
    waves = 2 if env.quick else 4
    section = report.section(
        "2. I/O concurrency",
        f"The fake answers after {delay:g} s. One worker process (threads pool, concurrency = "
        f"jobs in flight); {waves} x N jobs submitted at once. Ideal throughput by Little's "
        "law = jobs in flight / latency.",
        ["in flight", "jobs", "failed", "wall", "throughput", "ideal", "ratio", "worker peak RSS"],
    )
    failures: list[str] = []
    env.control(delay=delay, reset=True)
    for level in levels:
        worker = env.start_worker(concurrency=level, LLM_WORKER_CONCURRENCY=str(level))
        count = level * waves
        run_id = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        handles = [
            env.app.send_task(
                "llm.complete",
                kwargs={
                    "messages": _messages(f"{run_id}-{i}"),
                    "user_id": f"conc-{i % 50}",
                    "max_tokens": 64,
                },
            )
            for i in range(count)
        ]
        values = ResultSet(handles).join(timeout=600, propagate=False)
        wall = time.perf_counter() - started
        errors = [value for value in values if isinstance(value, BaseException)]
        if errors:
            failures.append(
                f"{level} in flight: {len(errors)} of {count} jobs failed, the first with "
                f"{type(errors[0]).__name__}: {str(errors[0])[:200]}"
            )
        peak = _peak_rss_mb(worker.process.pid)
        env.stop_worker(worker)
        throughput, ideal = count / wall, level / delay
        section.rows.append(
            [
                str(level),
                str(count),
                str(len(errors)),
                f"{wall:.2f} s",
                f"{throughput:.1f}/s",
                f"{ideal:.0f}/s",
                f"{throughput / ideal:.0%}",
                f"{peak:.0f} MB",
            ]
        )
    env.control(delay=0.0, reset=True)
    section.notes.append(
        "Target: at least 90% of the ideal at 200 in flight. The wall includes the first "
        "wave's start-up and the last wave's tail, so N x waves / (waves x latency) is the "
        "best possible."
    )
    section.notes += failures


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status")
    found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(found.group(1)) / 1024 if found else 0.0


def _verdict(value: float, target: float) -> str:
    if value <= target:
        return f"met ({value:.2f} ms <= {target:g} ms)"
    return f"MISSED by {value - target:.2f} ms ({value:.2f} ms > {target:g} ms)"


SECTIONS: dict[str, Callable[[Environment, Report], None]] = {
    "fake": fake_ceiling,
    "overhead": overhead,
    "concurrency": concurrency,
    "cache": cache_hits,
    "batch": batch,
    "limiter": limiter,
}
