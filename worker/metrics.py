"""Fleet-wide latency: every worker records into Redis, anyone reads percentiles back.

Each metric is a sorted set scored by Redis server time, so a rolling window is a
range query and every worker's samples land in the same place.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis

from worker.keyspace import LATENCY
from worker.scripts import Part, scripts_for

METRICS = ("queue_wait_ms", "provider_latency_ms", "total_latency_ms")
PREFIX = LATENCY
# Bounds memory whatever the traffic: older samples beyond this are trimmed.
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class Summary:
    """Count and percentiles of one metric over the window."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        """The summary as plain JSON-ready values."""
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float]) -> Summary:
    """Count, P50, P95, P99 and max of `values`."""
    ordered = sorted(values)
    return Summary(
        count=len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        max=ordered[-1] if ordered else None,
    )


class LatencyRecorder:
    """Writes and reads latency samples shared by the whole fleet."""

    def __init__(self, client: redis.Redis, *, window_seconds: int) -> None:
        self.client = client
        self.window_seconds = window_seconds

    def record(self, **samples: float | None) -> None:
        """Add one sample per metric given (None values are skipped), in one round trip."""
        scripts_for(self.client).run(self.record_part(**samples))

    def record_part(self, **samples: float | None) -> Part:
        """The script part that adds the samples, stamped with Redis time."""
        unknown = set(samples) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown latency metrics: {sorted(unknown)}")
        values = [samples.get(metric) for metric in METRICS]
        return Part(
            "latency_record",
            [PREFIX + metric for metric in METRICS],
            [
                self.window_seconds,
                MAX_SAMPLES,
                uuid.uuid4().hex[:12],
                *("" if value is None else f"{value:.3f}" for value in values),
            ],
        )

    def values(self, metric: str) -> list[float]:
        """Samples of `metric` within the window."""
        now = self._now()
        members = self.client.zrangebyscore(PREFIX + metric, now - self.window_seconds, "+inf")
        return [float(str(m).split(":", 1)[0]) for m in members]

    def summary(self) -> dict[str, Summary]:
        """A summary per metric over the window."""
        return {metric: summarize(self.values(metric)) for metric in METRICS}

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1_000_000
