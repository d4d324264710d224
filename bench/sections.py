"""The benchmarks, one function each, in the order the report lists them."""

from __future__ import annotations

import functools
import os
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
from bench.profile import Profile, py_spy, record
from bench.report import Report, ms
from bench.workloads import batch, cache_hits, limiter
from tests.harness import Monitor
from worker.connections import CLIENT_NAME
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
    # CPU the worker process spends per job, and Redis commands per job by who sent them.
    cpu = {
        name: _cpu_ms_per_job(worker.process.pid, send, 20 if env.quick else 300)
        for name, send in (("llm.complete", pipeline_job), ("bare", bare_job))
    }
    trips = {
        name: _commands_per_job(env, send, 10 if env.quick else 100)
        for name, send in (("llm.complete", pipeline_job), ("bare", bare_job))
    }
    profiles = _profiles(env, worker.process.pid, pipeline_job, bare_job)
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
    section.notes.append(
        f"Worker CPU per job: llm.complete {cpu['llm.complete']:.2f} ms, bare task "
        f"{cpu['bare']:.2f} ms: llmq adds {cpu['llm.complete'] - cpu['bare']:.2f} ms of CPU."
    )
    ours, celery = trips["llm.complete"]
    section.notes.append(
        f"Redis round trips per job (MONITOR, attributed by connection name): llmq's own "
        f"{ours:.2f} (target at most 3: {'met' if ours <= 3 else 'MISSED'}); Celery's and "
        f"kombu's {celery:.1f} for llm.complete and {trips['bare'][1]:.1f} for the bare task."
    )
    _cpu_profile(report, profiles, cpu)


# What would close each package's share of the added CPU, for the profile's notes.
_REMEDIES = {
    "llmq": "llmq's own Python per job (pipeline steps, guard, metering, log fields): "
    "fewer intermediate objects, one encoding of the messages shared by the fingerprint, "
    "the cache key and the scripts' arguments",
    "pydantic": "validating the job, the provider request and the result as three models; "
    "one validation of the job and plain dataclasses after it would remove most of it",
    "stdlib:json": "JSON encoding of the same messages several times (fingerprint, cache "
    "key, Lua arguments, log record): encode once and reuse the bytes",
    "pythonjsonlogger": "the llm_call and llm_job JSON records: one record per job, or a "
    "faster encoder (orjson) behind python-json-logger",
    "stdlib:logging": "two log records per job through logging's handlers and filters",
    "redis": "redis-py packing commands and handling replies (parsed in C by hiredis): "
    "Celery's broker and result backend traffic is in both columns; the added part is "
    "llmq's two scripts and the larger result it stores; fewer, smaller values in the "
    "settlement would shrink it",
    "tiktoken": "exact pre-flight counting: cache the count of a repeated system message",
    "hashlib": "hashing the messages for the fingerprint and the cache key: hash once",
}


def _profiles(
    env: Environment, pid: int, pipeline_job: Callable[[int], Any], bare_job: Callable[[int], Any]
) -> dict[str, Profile] | str:
    """py-spy profiles of the worker running each kind of job, or why there are none."""
    if py_spy() is None:
        return "py-spy is not installed (`pip install py-spy`)"
    jobs = 60 if env.quick else 400
    found: dict[str, Profile] = {}
    try:
        for name, send in (("llm.complete", pipeline_job), ("bare", bare_job)):
            run = functools.partial(_one_at_a_time, send, jobs, first=30_000_000)
            found[name] = record(pid, run, out=env.base / f"profile-{name.split('.')[0]}.txt")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"py-spy could not sample the worker: {exc}"
    return found


def _cpu_profile(report: Report, profiles: dict[str, Profile] | str, cpu: dict[str, float]) -> None:
    """Where the worker's CPU per job goes, by package, for llm.complete and the bare task."""
    section = report.section(
        "1b. Where the added CPU goes",
        "py-spy samples (200/s, every thread, idle excluded) of the same worker while it runs "
        "the overhead section's jobs one at a time, each sample charged to the package of its "
        "innermost frame; ms per job = the package's share of samples x the CPU per job "
        "measured above. Celery's, kombu's and the SDK's work appears in both columns.",
        ["package", "llm.complete ms/job", "bare ms/job", "added ms/job"],
    )
    if isinstance(profiles, str):
        section.notes.append(f"No profile: {profiles}.")
        return
    ours, bare = profiles["llm.complete"], profiles["bare"]
    rows = []
    for package in set(ours.by_package) | set(bare.by_package):
        mine = ours.share(package) * cpu["llm.complete"]
        theirs = bare.share(package) * cpu["bare"]
        rows.append((mine - theirs, package, mine, theirs))
    rows.sort(reverse=True)
    for added, package, mine, theirs in rows[:12]:
        section.rows.append([f"`{package}`", f"{mine:.2f}", f"{theirs:.2f}", f"{added:+.2f}"])
    section.notes.append(
        f"Samples: {ours.total:,} (llm.complete), {bare.total:,} (bare). CPU per job: "
        f"{cpu['llm.complete']:.2f} ms vs {cpu['bare']:.2f} ms."
    )
    for added, package, _, _ in rows[:4]:
        if added > 0.05 and package in _REMEDIES:
            section.notes.append(f"`{package}` (+{added:.2f} ms): {_REMEDIES[package]}.")


def concurrency(env: Environment, report: Report) -> None:
    """Throughput with many slow calls in flight, against Little's law, on 1 and 2 processes."""
    delay = 0.2 if env.quick else 1.0
    runs = (
        [(1, 8), (2, 8)]
        if env.quick
        else [(1, 50), (1, 100), (1, 200), (1, 400), (2, 200), (2, 1000)]
    )
    waves = 2 if env.quick else 4
    section = report.section(
        "2. I/O concurrency",
        f"The fake answers after {delay:g} s. Worker processes with the threads pool, the jobs "
        f"in flight split between them; {waves} x N jobs submitted at once. Ideal throughput "
        "by Little's law = jobs in flight / latency. Two processes is the documented layout "
        "for a 2-core host (one `-P threads` process per core).",
        [
            "processes",
            "in flight",
            "jobs",
            "failed",
            "wall",
            "throughput",
            "ideal",
            "ratio",
            "peak RSS (all)",
            "RSS per job in flight",
        ],
    )
    failures: list[str] = []
    env.control(delay=delay, reset=True)
    for processes, level in runs:
        per_process = level // processes
        workers = [
            env.start_worker(concurrency=per_process, LLM_WORKER_CONCURRENCY=str(per_process))
            for _ in range(processes)
        ]
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
                f"{processes} x {per_process} in flight: {len(errors)} of {count} jobs failed, "
                f"the first with {type(errors[0]).__name__}: {str(errors[0])[:200]}"
            )
        peak = sum(_peak_rss_mb(worker.process.pid) for worker in workers)
        for worker in workers:
            env.stop_worker(worker)
        throughput, ideal = count / wall, level / delay
        section.rows.append(
            [
                str(processes),
                str(level),
                str(count),
                str(len(errors)),
                f"{wall:.2f} s",
                f"{throughput:.1f}/s",
                f"{ideal:.0f}/s",
                f"{throughput / ideal:.0%}",
                f"{peak:.0f} MB",
                f"{peak * 1024 / level:.0f} kB",
            ]
        )
    env.control(delay=0.0, reset=True)
    section.notes.append(
        "Target: at least 90% of the ideal at 200 in flight. The wall includes the first "
        "wave's start-up and the last wave's tail, so N x waves / (waves x latency) is the "
        "best possible."
    )
    section.notes += failures


def _one_at_a_time(send: Callable[[int], Any], jobs: int, *, first: int) -> None:
    """Run `jobs` jobs one after another, numbered from `first` (distinct prompts)."""
    for i in range(first, first + jobs):
        send(i).get(timeout=30)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_ms_per_job(pid: int, send: Callable[[int], Any], jobs: int) -> float:
    """Worker CPU per job over `jobs` jobs run one after another."""
    before = _cpu_seconds(pid)
    _one_at_a_time(send, jobs, first=10_000_000)
    return (_cpu_seconds(pid) - before) * 1000 / jobs


def _commands_per_job(
    env: Environment, send: Callable[[int], Any], jobs: int
) -> tuple[float, float]:
    """(llmq's own, everyone else's) top-level Redis commands per job, by MONITOR."""
    monitor = Monitor(env.redis)
    try:
        _one_at_a_time(send, jobs, first=20_000_000)
        seen = list(monitor.seen)
        names = monitor.names()
    finally:
        monitor.stop()
    counted = Monitor.round_trips(seen, names)
    others = sum(n for name, n in counted.items() if name != CLIENT_NAME)
    return counted[CLIENT_NAME] / jobs, others / jobs


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
