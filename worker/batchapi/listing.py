"""`llmq batches`: the provider batches on record, by llmq's id or the provider's."""

from __future__ import annotations

import time
from typing import Any

import redis

from worker import keyspace
from worker.spend import to_usd


def find_batch(client: redis.Redis, batch: str) -> dict[str, str] | None:
    """A batch's record by llmq's id or the provider's."""
    record: dict[str, str] = client.hgetall(keyspace.ProviderBatchKeys(local_id=batch).state)  # type: ignore[assignment]
    if record:
        return record
    for local_id in client.zrange(keyspace.BATCH_INDEX, 0, -1):
        name = str(local_id)  # the client decodes responses
        found: dict[str, str] = client.hgetall(keyspace.ProviderBatchKeys(local_id=name).state)  # type: ignore[assignment]
        if found.get("provider_id") == batch:
            return found
    return None


def listing(
    client: redis.Redis, *, limit: int = 100, now: float | None = None
) -> list[dict[str, Any]]:
    """The newest batches: state, counts, cost so far and ETA, for `llmq batches`."""
    now = time.time() if now is None else now
    rows = []
    for local_id in client.zrevrange(keyspace.BATCH_INDEX, 0, limit - 1):
        name = str(local_id)  # the client decodes responses
        r: dict[str, str] = client.hgetall(keyspace.ProviderBatchKeys(local_id=name).state)  # type: ignore[assignment]
        if not r:
            continue
        total = int(r.get("total") or r.get("requests") or 0)
        done, failed = int(r.get("done") or 0), int(r.get("failed") or 0)
        submitted = float(r.get("submitted_at") or r.get("intent_at") or now)
        eta: float | None = None
        if r.get("state") == "submitted":
            finished = done + failed
            if finished:
                eta = max(0.0, (now - submitted) / finished * (total - finished))
            else:
                eta = max(0.0, submitted + 86_400 - now)  # the providers' 24 h window
        rows.append(
            {
                "batch": name,
                "provider": r.get("provider"),
                "provider_batch_id": r.get("provider_id"),
                "state": r.get("state"),
                "provider_state": r.get("provider_state"),
                "requests": int(r.get("requests") or 0),
                "done": done,
                "failed": failed,
                "charged": int(r.get("charged") or 0),
                "cost_usd": float(to_usd(int(r.get("cost_units") or 0))),
                "realtime_cost_usd": float(to_usd(int(r.get("realtime_units") or 0))),
                "worst_case_usd": float(to_usd(int(r.get("worst_units") or 0))),
                "eta_seconds": None if eta is None else round(eta, 1),
                "error": r.get("error"),
            }
        )
    return rows
