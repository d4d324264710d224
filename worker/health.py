"""Fleet health: latency percentiles, open circuits, queue lengths and fingerprints, from Redis."""

from __future__ import annotations

from typing import Any

import redis

from worker import fleet
from worker.app import BATCH_QUEUE, QUEUE
from worker.breaker import open_circuits
from worker.connections import connect, redis_client
from worker.metrics import LatencyRecorder
from worker.settings import Settings

# kombu's Redis transport keeps each priority level of a queue in its own list.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


def queue_lengths(broker: redis.Redis, queues: tuple[str, ...]) -> dict[str, int]:
    """Messages waiting in each queue, all priority levels included."""
    pipe = broker.pipeline(transaction=False)
    for queue in queues:
        for step in PRIORITY_STEPS:
            pipe.llen(queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}")
    counts = pipe.execute()
    per_queue = len(PRIORITY_STEPS)
    return {
        queue: sum(counts[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(queues)
    }


def report(settings: Settings) -> dict[str, Any]:
    """The health report `llmq health` prints and GET /health serves."""
    client = redis_client(settings)
    recorder = LatencyRecorder(client, window_seconds=settings.metrics_window_seconds)
    latency = {name: summary.as_dict() for name, summary in recorder.summary().items()}
    circuits = open_circuits(client)
    reasons = []
    p95 = latency["total_latency_ms"]["p95"]
    if p95 is not None and float(p95) > settings.p95_alert_ms:
        reasons.append(
            f"P95 total latency {float(p95):.0f} ms exceeds LLM_P95_ALERT_MS="
            f"{settings.p95_alert_ms:.0f}"
        )
    reasons.extend(f"circuit {c['state']}: {c['circuit']}" for c in circuits)
    workers = fleet.report(client)
    if workers["mixed"]:
        reasons.append(fleet.mixed_reason(workers))
    broker = client if settings.broker == settings.redis_url else connect(settings.broker)
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "window_seconds": settings.metrics_window_seconds,
        "p95_alert_ms": settings.p95_alert_ms,
        "latency_ms": latency,
        "open_circuits": circuits,
        "queues": queue_lengths(broker, (QUEUE, BATCH_QUEUE, settings.deferred_queue)),
        "fleet": workers,
    }
