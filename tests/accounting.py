"""What a user has been charged today, read from Redis as the workers count it.

Two ledgers count a job: its settled spend (worker/spend.py, per UTC day) and the
tokens in the user's rate-limit window (worker/limits.py). Tests that promise "no
duplicate charge" compare both with what the jobs' results say they cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.limits import user_usage
from worker.settings import load_settings
from worker.spend import SpendTracker, to_units


@dataclass(frozen=True, kw_only=True)
class Charges:
    """A user's settled spend counters and the tokens in its rate-limit window."""

    requests: int
    input_tokens: int
    output_tokens: int
    cost_units: int  # settled spend in 1e-10 USD; reservations of jobs in flight excluded
    limit_tokens: int

    @classmethod
    def of(cls, results: Iterable[Mapping[str, Any]]) -> Charges:
        """What these results, each counted exactly once, must have charged."""
        done = list(results)
        return cls(
            requests=len(done),
            input_tokens=sum(r["input_tokens"] for r in done),
            output_tokens=sum(r["output_tokens"] for r in done),
            # Settling converts each job's cost_usd on its own: sum the same conversions.
            cost_units=sum(to_units(r["cost_usd"]) for r in done),
            limit_tokens=sum(r["input_tokens"] + r["output_tokens"] for r in done),
        )


def user_counters(user_id: str) -> dict[str, int]:
    """The user's spend counters today (SpendTracker.totals), empty if it has none."""
    tracker = SpendTracker.from_settings(load_settings())
    counters: dict[str, int] = tracker.totals()["user"].get(user_id, {})
    return counters


def charges(user_id: str) -> Charges:
    """What `user_id` has been charged today, by the workers' default settings."""
    settings = load_settings()  # the test workers' spend namespace and limit prefix
    counters = user_counters(user_id)
    usage = {u.limit.name: u.usage for u in user_usage(settings, user_id)}
    return Charges(
        requests=counters.get("requests", 0),
        input_tokens=counters.get("input_tokens", 0),
        output_tokens=counters.get("output_tokens", 0),
        cost_units=counters.get("cost_units", 0),
        limit_tokens=usage["user_tokens"],
    )
