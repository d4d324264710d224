"""Batch prices, and a provider batch's worst case held in the daily budget and settled per result.

genai-prices carries no batch rates, so a batch call costs half of what the same usage
costs in real time (both providers bill their Batch APIs at 50%), unless the model's
entry in the prices file sets `batch_input` and `batch_output` (USD per 1M tokens); then
every input token is priced at `batch_input`, cached or not (an upper bound).

A batch reserves the worst case of all its requests in one reservation, before it is
created (refused, with the numbers, if it does not fit). Each result then moves its own
worst case out of the reservation and its real cost into the day's counters, once: the
custom_id joins the batch's settled set in the same script, so a result read twice (a
poll redelivered after a crash) is never charged twice. What is left is released when
the batch's results are all in.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis

from worker.keyspace import ProviderBatchKeys
from worker.models import Usage
from worker.prices import ModelPrice
from worker.scripts import Part
from worker.spend import RETENTION_SECONDS, BudgetReservation, SpendTracker, to_units

BATCH_DISCOUNT = Decimal("0.5")
_PER_TOKEN = Decimal(1_000_000)

# KEYS: settled set, held, user, model, provider, total counters, index, batch record,
#       the day's alert flag.
# ARGV: custom_id, reservation id, the request's worst-case units, input, output, cached
#       input tokens, cost units, real-time cost units, retention (s), index entries x3,
#       alert threshold units (-1: none).
# Reply: {1 charged now | 0 already charged before, 1 if the day's alert fires now, total}.
_SETTLE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return {0, 0, '0'} end
redis.call('EXPIRE', KEYS[1], ARGV[9])
local entry = redis.call('HGET', KEYS[2], ARGV[2])
if entry then
  local units, expires = string.match(entry, '^(%d+):(%d+)$')
  if units then
    local left = math.max(0, tonumber(units) - tonumber(ARGV[3]))
    redis.call('HSET', KEYS[2], ARGV[2], string.format('%d', left) .. ':' .. expires)
  end
end
local fields = {'input_tokens', 'output_tokens', 'cached_input_tokens', 'cost_units'}
for k = 3, 6 do
  redis.call('HINCRBY', KEYS[k], 'requests', 1)
  for f = 1, 4 do redis.call('HINCRBY', KEYS[k], fields[f], ARGV[f + 3]) end
  redis.call('HINCRBY', KEYS[k], 'saved_units', 0)
  redis.call('EXPIRE', KEYS[k], ARGV[9])
end
redis.call('SADD', KEYS[7], ARGV[10], ARGV[11], ARGV[12])
redis.call('EXPIRE', KEYS[7], ARGV[9])
redis.call('HINCRBY', KEYS[8], 'cost_units', ARGV[7])
redis.call('HINCRBY', KEYS[8], 'realtime_units', ARGV[8])
redis.call('HINCRBY', KEYS[8], 'charged', 1)
local total = redis.call('HGET', KEYS[6], 'cost_units')
local threshold = tonumber(ARGV[13])
if threshold >= 0 and tonumber(total) >= threshold
    and redis.call('SET', KEYS[9], total, 'NX', 'EX', ARGV[9]) then
  return {1, 1, total}
end
return {1, 0, total}
"""


def batch_cost(price: ModelPrice, usage: Usage) -> Decimal:
    """USD a batch answer with `usage` costs."""
    if price.batch_input is not None and price.batch_output is not None:
        return (
            usage.input_tokens * price.batch_input + usage.output_tokens * price.batch_output
        ) / _PER_TOKEN
    return price.cost(usage) * BATCH_DISCOUNT


def worst_case(price: ModelPrice, *, input_tokens: int, output_tokens: int) -> Decimal:
    """USD of a batch request at most this large, uncached."""
    return batch_cost(price, Usage(input_tokens=input_tokens, output_tokens=output_tokens))


@dataclass(frozen=True, kw_only=True)
class Ledger:
    """A provider batch's reservation and per-result charges in the day's spend keys."""

    spend: SpendTracker

    @property
    def client(self) -> redis.Redis:
        """The spend tracker's Redis."""
        return self.spend.client

    def reserve(self, *, user_id: str, day: str, reservation_id: str, units: int) -> None:
        """Hold `units` for the batch (once), or raise DailyBudgetExceededError with the numbers."""
        keys = self.spend.keys(day)
        if self.client.hexists(keys.held(user_id), reservation_id):
            return  # reserved by an earlier delivery of the same submit
        budget = -1 if self.spend.budget_units is None else self.spend.budget_units
        part = Part(
            "budget_reserve",
            [keys.held(user_id), keys.counters("user", user_id), keys.holders],
            [
                reservation_id,
                units,
                budget,
                self.spend.reservation_ttl,
                RETENTION_SECONDS,
                user_id,
            ],
        )
        reservation = BudgetReservation(
            tracker=self.spend, user_id=user_id, day=day, id=reservation_id, units=units
        )
        self.spend.reserved(self.spend.scripts.run(part), reservation)

    def settle(
        self,
        *,
        local_id: str,
        custom_id: str,
        user_id: str,
        day: str,
        provider: str,
        model: str,
        worst_units: int,
        usage: Usage,
        cost: Decimal,
        realtime: Decimal,
    ) -> bool:
        """Charge one result (True), or nothing if it was charged before (False)."""
        keys = self.spend.keys(day)
        batch = ProviderBatchKeys(local_id=local_id)
        script: Any = self.client.register_script(_SETTLE)
        charged = script(
            keys=[
                batch.settled,
                keys.held(user_id),
                keys.counters("user", user_id),
                keys.counters("model", model),
                keys.counters("provider", provider),
                keys.total,
                keys.index,
                batch.state,
                keys.alerted,
            ],
            args=[
                custom_id,
                local_id,
                worst_units,
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens,
                to_units(cost),
                to_units(realtime),
                RETENTION_SECONDS,
                f"user:{user_id}",
                f"model:{model}",
                f"provider:{provider}",
                -1 if self.spend.alert_units is None else self.spend.alert_units,
            ],
        )
        done, alert, total = charged
        if int(done):
            # The day's one alert record, as a real-time answer's settle logs it.
            reservation = BudgetReservation(
                tracker=self.spend, user_id=user_id, day=day, id=local_id, units=0
            )
            self.spend.settled([alert, total, 1], reservation)
        return bool(int(done))

    def release(self, *, user_id: str, day: str, reservation_id: str) -> None:
        """Drop what is left of the batch's reservation: its results are all charged."""
        self.client.hdel(self.spend.keys(day).held(user_id), reservation_id)
