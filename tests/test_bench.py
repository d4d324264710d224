"""The benchmark harness still runs: a smoke run, no timings asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT


def test_quick_benchmark_runs_every_section(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("llmq-bench-")] == []
    report = done.stdout
    for title in (
        "## Machine",
        "own ceiling",
        "1. Pipeline overhead",
        "1b. Where the added CPU goes",
        "2. I/O concurrency",
        "3. Cache hits",
        "4. Batch summarization under a provider rate limit",
        "5. Rate limiter",
    ):
        assert title in report
    assert "**added by llmq**" in report
    # py-spy is a dev dependency: the profile that explains a miss must be there.
    assert "No profile:" not in report
    assert re.search(r"\| `[\w:.-]+` \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \|", report)
    assert re.search(r"Samples: [1-9][\d,]* \(llm.complete\), [1-9][\d,]* \(bare\)", report)
    assert "speed-up vs Celery no-op" in report
    assert "**wall / ideal**" in report
    assert "| documents (succeeded / failed) | 3 / 0 |" in report
    assert re.search(r"\| `RateLimiter.check` \(Python, threads\) \| [\d,]+ \|", report)
