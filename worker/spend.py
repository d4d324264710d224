"""Spend in Redis: per-user daily budgets reserved before the call, settled after it.

Money is stored as integers of 1e-10 USD (`UNITS_PER_USD`): Redis increments
integers exactly, and every price on record is a whole number of units per token,
so totals never drift the way float sums do.

A job reserves its worst case with one Lua script that, atomically, drops expired
reservations, compares spent + reserved + estimate with the budget and records the
reservation. No number of concurrent workers can therefore hold more than the
budget, and settled spend (each job's actual cost, at most its worst case) cannot
pass it. A reservation carries its own expiry, so a worker that dies mid-job
frees its share after `LLM_BUDGET_RESERVATION_TTL` seconds without anyone's help.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

import redis

from worker.errors import DailyBudgetExceededError
from worker.keyspace import SpendKeys
from worker.scripts import Part, scripts_for
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.metering import Charge

UNITS_PER_USD = 10**10
# Day keys outlive their day so `llmq cost --today` style reads work for a month.
RETENTION_SECONDS = 40 * 86_400
COUNTERS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_units",
    "saved_units",
)
DIMENSIONS = ("user", "model", "provider")

logger = logging.getLogger("llmq.spend")


def to_units(usd: Decimal | float, *, rounding: str = ROUND_HALF_EVEN) -> int:
    """USD as an integer number of 1e-10 USD."""
    amount = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    return int((amount * UNITS_PER_USD).to_integral_value(rounding=rounding))


def to_usd(units: int | str) -> Decimal:
    """1e-10 USD units back to USD, exactly."""
    return Decimal(int(units)).scaleb(-10)


def utc_day(now: float | None = None) -> str:
    """The UTC calendar day, YYYY-MM-DD, that budgets and totals are kept by."""
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).date().isoformat()


@dataclass(kw_only=True)
class BudgetReservation:
    """A job's worst case held against its user's daily budget."""

    tracker: SpendTracker
    user_id: str
    day: str
    id: str
    units: int

    def settle(self, charge: Charge) -> None:
        """Replace the reservation by what the answer cost."""
        self.tracker.settle(self, charge)

    def release(self) -> None:
        """Give the reservation back: the job failed."""
        self.tracker.release(self)


class SpendTracker:
    """Per-user and global spend per UTC day, by model and provider, with budgets."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        daily_budget_usd: Decimal | float | None = None,
        alert_usd: Decimal | float | None = None,
        reservation_ttl: int = 600,
        namespace: str = "llmq",
    ) -> None:
        self.client = client
        self.budget_units = (
            None if daily_budget_usd is None else to_units(daily_budget_usd, rounding=ROUND_FLOOR)
        )
        self.alert_units = None if alert_usd is None else to_units(alert_usd, rounding=ROUND_FLOOR)
        self.reservation_ttl = reservation_ttl
        self.namespace = namespace
        self.scripts = scripts_for(client)

    @classmethod
    def from_settings(cls, settings: Settings) -> SpendTracker:
        """The tracker configured by LLM_USER_DAILY_BUDGET_USD and friends."""
        from worker.connections import redis_client

        return cls(
            redis_client(settings),
            daily_budget_usd=settings.user_daily_budget_usd,
            alert_usd=settings.daily_spend_alert_usd,
            reservation_ttl=settings.budget_reservation_ttl,
            namespace=settings.spend_namespace,
        )

    def keys(self, day: str | None = None) -> SpendKeys:
        """Key names for `day` (today, UTC, by default)."""
        return SpendKeys(namespace=self.namespace, day=day or utc_day())

    def reserve(self, *, user_id: str, worst_case_usd: Decimal) -> BudgetReservation:
        """Hold `worst_case_usd` for the user, or raise DailyBudgetExceededError."""
        part, reservation = self.reserve_part(user_id=user_id, worst_case_usd=worst_case_usd)
        return self.reserved(self.scripts.run(part), reservation)

    def reserve_part(
        self, *, user_id: str, worst_case_usd: Decimal
    ) -> tuple[Part, BudgetReservation]:
        """The script part that holds the worst case, and the reservation it makes."""
        keys = self.keys()
        units = to_units(worst_case_usd, rounding=ROUND_CEILING)
        reservation = BudgetReservation(
            tracker=self, user_id=user_id, day=keys.day, id=uuid.uuid4().hex, units=units
        )
        budget = -1 if self.budget_units is None else self.budget_units
        part = Part(
            "budget_reserve",
            [keys.held(user_id), keys.counters("user", user_id), keys.holders],
            [reservation.id, units, budget, self.reservation_ttl, RETENTION_SECONDS, user_id],
        )
        return part, reservation

    def reserved(self, reply: Any, reservation: BudgetReservation) -> BudgetReservation:
        """The reservation if the budget admitted it, else DailyBudgetExceededError."""
        ok, spent, reserved = reply
        if not int(ok):
            raise DailyBudgetExceededError(
                self._rejection(
                    reservation.user_id,
                    reservation.day,
                    int(spent),
                    int(reserved),
                    reservation.units,
                )
            )
        return reservation

    def _rejection(self, user_id: str, day: str, spent: int, reserved: int, units: int) -> str:
        budget = self.budget_units or 0
        return (
            f"Daily budget exceeded for user {user_id!r} on {day} (UTC): spent "
            f"${to_usd(spent):f} + reserved ${to_usd(reserved):f} by jobs in flight + this "
            f"job's worst-case estimate ${to_usd(units):f} = "
            f"${to_usd(spent + reserved + units):f}, over the budget of "
            f"${to_usd(budget):f} (LLM_USER_DAILY_BUDGET_USD). Fix: lower "
            "max_tokens or shorten the prompt (the estimate assumes every max_tokens is "
            "written), wait for jobs in flight to settle or for the budget to reset at "
            "00:00 UTC, or raise LLM_USER_DAILY_BUDGET_USD."
        )

    def settle(self, reservation: BudgetReservation, charge: Charge) -> None:
        """Record an answer's cost and usage; free the rest of its reservation."""
        try:
            reply = self.scripts.run(self.settle_part(reservation, charge))
        except redis.RedisError as exc:
            # The provider has been paid: failing the job now would only make the
            # caller pay again. The reservation expires on its own.
            logger.error("spend not recorded for reservation %s: %s", reservation.id, exc)
            return
        self.settled(reply, reservation)

    def settle_part(self, reservation: BudgetReservation, charge: Charge) -> Part:
        """The script part that records an answer's cost in every counter of the day."""
        keys = self.keys(reservation.day)
        usage = charge.usage
        return Part(
            "budget_settle",
            [
                keys.held(reservation.user_id),
                keys.counters("user", reservation.user_id),
                keys.counters("model", charge.model),
                keys.counters("provider", charge.provider),
                keys.total,
                keys.index,
                keys.alerted,
            ],
            [
                reservation.id,
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens,
                to_units(charge.cost_usd),
                0,
                -1 if self.alert_units is None else self.alert_units,
                RETENTION_SECONDS,
                f"user:{reservation.user_id}",
                f"model:{charge.model}",
                f"provider:{charge.provider}",
            ],
        )

    def settled(self, reply: Any, reservation: BudgetReservation) -> None:
        """Log what a settle found: an expired reservation, the day's alert."""
        alert, total, held = reply
        if not int(held):
            # Its budget was free for others while the job still ran: the TTL is too short.
            logger.warning(
                "reservation %s outlived its budget reservation TTL (%d s); raise "
                "LLM_BUDGET_RESERVATION_TTL above the longest a job can run",
                reservation.id,
                self.reservation_ttl,
                extra={"event": "reservation_expired", "user_id": reservation.user_id},
            )
        if int(alert):
            logger.warning(
                "llm_spend_alert",
                extra={
                    "event": "llm_spend_alert",
                    "alert": "DAILY_SPEND_THRESHOLD",
                    "day": reservation.day,
                    "spent_usd": float(to_usd(total)),
                    "threshold_usd": float(to_usd(self.alert_units or 0)),
                },
            )

    def release_part(self, reservation: BudgetReservation) -> Part:
        """The script part that drops a reservation."""
        return Part(
            "budget_release",
            [self.keys(reservation.day).held(reservation.user_id)],
            [reservation.id],
        )

    def release(self, reservation: BudgetReservation) -> None:
        """Drop the reservation: the job failed and spent nothing we know of."""
        try:
            self.scripts.run(self.release_part(reservation))
        except redis.RedisError as exc:
            logger.warning("reservation %s not released (it expires): %s", reservation.id, exc)

    def totals(self, day: str | None = None) -> dict[str, Any]:
        """The day's counters: {"day", "total", "user"/"model"/"provider": {name: counters}}.

        Each user's entry also has `reserved_units`: what its jobs in flight hold. Users
        whose only jobs are still in flight are listed too, with zero counters; the
        total's `reserved_units` is everyone's.
        """
        keys = self.keys(day)
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(keys.index)
        pipe.smembers(keys.holders)
        members, holders = pipe.execute()
        names = [(d, n) for d, _, n in (entry.partition(":") for entry in sorted(members))]
        settled = {name for dimension, name in names if dimension == "user"}
        users = sorted(settled | set(holders))
        pipe.hgetall(keys.total)
        for dimension, name in names:
            pipe.hgetall(keys.counters(dimension, name))
        for user in users:
            pipe.hgetall(keys.held(user))
        replies = pipe.execute()
        report: dict[str, Any] = {"day": keys.day, "total": _ints(replies[0])}
        report.update({dimension: {} for dimension in DIMENSIONS})
        for (dimension, name), counters in zip(names, replies[1:], strict=False):
            report.setdefault(dimension, {})[name] = _ints(counters)
        now = time.time()
        reserved_total = 0
        for user, held in zip(users, replies[1 + len(names) :], strict=True):
            reserved = sum(
                int(units)
                for units, _, expires in (value.partition(":") for value in held.values())
                if int(expires) > now
            )
            if user not in settled and not reserved:
                continue  # its jobs failed or expired: nothing spent, nothing held
            report["user"].setdefault(user, _ints({}))["reserved_units"] = reserved
            reserved_total += reserved
        report["total"]["reserved_units"] = reserved_total
        return report


def _ints(counters: dict[str, str]) -> dict[str, int]:
    return {field: int(counters.get(field, 0)) for field in COUNTERS}
