"""Spend tracking in Redis: atomic per-user daily budgets, settlement, expiry, daily alert."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from producer import submit
from tests.fakes import FakeProvider
from tests.harness import RedisServer, Worker
from worker import tokens
from worker.errors import BudgetExceededError, DailyBudgetExceededError
from worker.metering import Charge
from worker.models import Usage
from worker.spend import COUNTERS, RETENTION_SECONDS, SpendTracker, to_units, to_usd, utc_day

LLMQ = str(Path(sys.executable).with_name("llmq"))


def _tracker(redis_server: RedisServer, **options: Any) -> SpendTracker:
    """A tracker in a namespace of its own, so tests never share counters."""
    return SpendTracker(redis_server.client(), namespace=f"test-{uuid.uuid4().hex[:10]}", **options)


def _result(cost: str, *, model: str = "gpt-4o-mini", provider: str = "openai") -> Charge:
    return Charge(
        provider=provider,
        model=model,
        usage=Usage(input_tokens=100, output_tokens=10, cached_input_tokens=40),
        cost_usd=Decimal(cost),
        charged_as="usage",
    )


def test_money_is_integer_units_of_1e_10_usd() -> None:
    assert to_units(Decimal("0.0000001234")) == 1234
    assert to_units(0.1) == 1_000_000_000  # from the float's repr, not its binary value
    assert to_usd(1234) == Decimal("0.0000001234")
    assert to_units(Decimal("0.00000000005"), rounding="ROUND_CEILING") == 1


def test_reserve_settle_and_release(redis_server: RedisServer, user_id: str) -> None:
    tracker = _tracker(redis_server, daily_budget_usd=0.01)
    held = tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.004"))
    # Nothing settled yet, but the job in flight is shown with what it holds.
    in_flight = tracker.totals()
    assert in_flight["user"] == {
        user_id: {**dict.fromkeys(COUNTERS, 0), "reserved_units": 40_000_000}
    }
    assert in_flight["total"]["reserved_units"] == 40_000_000
    held.settle(_result("0.0012345678"))
    other = tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.003"))
    totals = tracker.totals()
    mine = totals["user"][user_id]
    assert mine["cost_units"] == 12_345_678 and mine["requests"] == 1
    assert mine["reserved_units"] == 30_000_000  # only the job still in flight
    assert (mine["input_tokens"], mine["output_tokens"], mine["cached_input_tokens"]) == (
        100,
        10,
        40,
    )
    assert totals["model"]["gpt-4o-mini"]["cost_units"] == 12_345_678
    assert totals["provider"]["openai"]["requests"] == 1
    assert totals["total"]["cost_units"] == 12_345_678
    assert totals["day"] == utc_day()
    other.release()
    assert tracker.totals()["user"][user_id]["reserved_units"] == 0


def test_released_or_expired_reservations_of_a_user_with_no_spend_are_not_listed(
    redis_server: RedisServer, user_id: str
) -> None:
    tracker = _tracker(redis_server, reservation_ttl=0)
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.004"))  # expires at once
    SpendTracker(redis_server.client(), namespace=tracker.namespace).reserve(
        user_id="released", worst_case_usd=Decimal("0.001")
    ).release()
    totals = tracker.totals()
    assert totals["user"] == {} and totals["total"]["reserved_units"] == 0


def test_over_budget_reservation_states_every_number_and_the_fix(
    redis_server: RedisServer, user_id: str
) -> None:
    tracker = _tracker(redis_server, daily_budget_usd=0.01)
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.002")).settle(_result("0.001"))
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.006"))
    with pytest.raises(DailyBudgetExceededError) as raised:
        tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.0035"))
    assert isinstance(raised.value, BudgetExceededError)
    message = str(raised.value)
    assert (
        "spent $0.0010000000 + reserved $0.0060000000 by jobs in flight + this job's "
        "worst-case estimate $0.0035000000 = $0.0105000000, over the budget of "
        "$0.0100000000 (LLM_USER_DAILY_BUDGET_USD)"
    ) in message
    assert user_id in message and "Fix:" in message and "00:00 UTC" in message
    # What is left still fits a smaller job: nothing was held by the rejection.
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.003"))


def test_reservations_expire_on_their_own(redis_server: RedisServer, user_id: str) -> None:
    # A worker that dies between reserve and settle never gives its share back;
    # the reservation's own expiry does. ttl=0 makes it expire at once.
    crashed = _tracker(redis_server, daily_budget_usd=0.01, reservation_ttl=0)
    crashed.reserve(user_id=user_id, worst_case_usd=Decimal("0.008"))
    alive = SpendTracker(redis_server.client(), daily_budget_usd=0.01, namespace=crashed.namespace)
    alive.reserve(user_id=user_id, worst_case_usd=Decimal("0.008"))  # the dead one is gone
    with pytest.raises(DailyBudgetExceededError):
        alive.reserve(user_id=user_id, worst_case_usd=Decimal("0.008"))  # the live one holds


def test_settling_after_the_reservation_expired_warns(
    redis_server: RedisServer, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = _tracker(redis_server, daily_budget_usd=0.01, reservation_ttl=0)
    held = tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.008"))
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.001")).release()  # purges it
    with caplog.at_level(logging.WARNING, logger="llmq.spend"):
        held.settle(_result("0.002"))
    [record] = [r for r in caplog.records if r.__dict__.get("event") == "reservation_expired"]
    assert "LLM_BUDGET_RESERVATION_TTL" in record.getMessage()
    # The spend is recorded all the same: the provider was paid.
    assert tracker.totals()["user"][user_id]["cost_units"] == 20_000_000


def test_spend_keys_expire(redis_server: RedisServer, user_id: str) -> None:
    tracker = _tracker(redis_server, daily_budget_usd=1)
    tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.1")).settle(_result("0.01"))
    client = redis_server.client()
    keys = client.keys(f"{tracker.namespace}:spend:*")
    assert len(keys) >= 5
    assert all(0 < client.ttl(key) <= RETENTION_SECONDS for key in keys)


def test_threads_racing_for_the_budget_get_exactly_what_fits(
    redis_server: RedisServer, user_id: str
) -> None:
    tracker = _tracker(redis_server, daily_budget_usd=0.0105)
    outcomes: list[bool] = []
    start = threading.Barrier(40)

    def race() -> None:
        start.wait()
        try:
            tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.001"))
            outcomes.append(True)
        except DailyBudgetExceededError:
            outcomes.append(False)

    threads = [threading.Thread(target=race) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 10 and outcomes.count(False) == 30


def test_daily_alert_is_logged_once(
    redis_server: RedisServer, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = _tracker(redis_server, alert_usd=0.00005)
    # A second worker process, as far as Redis is concerned.
    second = SpendTracker(redis_server.client(), alert_usd=0.00005, namespace=first.namespace)
    start = threading.Barrier(20)

    def job(tracker: SpendTracker) -> None:
        start.wait()
        tracker.reserve(user_id=user_id, worst_case_usd=Decimal("0.001")).settle(_result("0.00001"))

    with caplog.at_level(logging.WARNING, logger="llmq.spend"):
        threads = [threading.Thread(target=job, args=(t,)) for t in [first, second] * 10]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    alerts = [r for r in caplog.records if getattr(r, "event", "") == "llm_spend_alert"]
    assert len(alerts) == 1
    alert = alerts[0]
    fields = alert.__dict__
    assert fields["alert"] == "DAILY_SPEND_THRESHOLD" and fields["threshold_usd"] == 0.00005
    assert 0.00005 <= fields["spent_usd"] < 0.00006  # logged by the settle that crossed it
    assert first.totals()["total"]["cost_units"] == 20 * 100_000


# --- End to end, through real workers -------------------------------------------------


def _job_records(*workers: Worker) -> list[dict[str, Any]]:
    return [r for worker in workers for r in worker.records("llm_job", "llm_spend_alert")]


@pytest.mark.parametrize(
    ("model", "usage", "cost", "discount"),
    [
        # gpt-4o-mini: 6000 x $0.15 + 4000 x $0.075 (cached) + 500 x $0.60, per 1M.
        ("gpt-4o-mini", (10_000, 500, 4_000), "0.0015", "0.0003"),
        # claude-haiku-4-5: 333 x $1 + 3000 x $0.10 (cache read) + 1 x $5, per 1M.
        ("claude-haiku-4-5", (3_333, 1, 3_000), "0.000638", "0.0027"),
    ],
)
def test_cached_input_priced_exactly_in_result_log_and_redis(
    worker: Worker,
    fake: FakeProvider,
    redis_server: RedisServer,
    user_id: str,
    model: str,
    usage: tuple[int, int, int],
    cost: str,
    discount: str,
) -> None:
    fake.usage = dict(
        zip(("input_tokens", "output_tokens", "cached_input_tokens"), usage, strict=True)
    )
    result = submit([{"role": "user", "content": "hi"}], user_id, model=model).get(timeout=30)
    assert (result["input_tokens"], result["cached_input_tokens"]) == (usage[0], usage[2])
    assert abs(Decimal(str(result["cost_usd"])) - Decimal(cost)) < Decimal("1e-8")
    assert result["cost_usd"] == float(cost)
    [record] = [r for r in _job_records(worker) if r.get("request_id") == result["request_id"]]
    assert record["cost_usd"] == float(cost) and record["cached_input_tokens"] == usage[2]
    assert record["cache_discount_usd"] == float(discount)
    counters = SpendTracker(redis_server.client()).totals()["user"][user_id]
    assert to_usd(counters["cost_units"]) == Decimal(cost)


def test_failed_job_releases_its_reservation(
    worker: Worker, fake: FakeProvider, redis_server: RedisServer, user_id: str
) -> None:
    from tests.fakes import Fault
    from worker.errors import LLMQError

    fake.set_always("openai", Fault(status=400))
    fake.set_always("anthropic", Fault(status=400))
    job = submit([{"role": "user", "content": "hi"}], user_id)
    with pytest.raises(LLMQError):
        job.get(timeout=30)
    tracker = SpendTracker(redis_server.client())
    assert redis_server.client().hlen(tracker.keys().held(user_id)) == 0
    assert user_id not in tracker.totals()["user"]


def _cost_today(*, namespace: str = "llmq") -> dict[str, Any]:
    done = subprocess.run(
        [LLMQ, "cost", "--today", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLM_SPEND_NAMESPACE": namespace},
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_cost_today_shows_a_new_users_job_in_flight(
    worker: Worker, fake: FakeProvider, redis_server: RedisServer, user_id: str
) -> None:
    from tests.fakes import Fault
    from tests.harness import wait_for

    fake.script("openai", Fault(delay=3))  # the call is slow: the reservation is held
    job = submit([{"role": "user", "content": "hi"}], user_id, cache=False)
    wait_for(lambda: fake.requests("openai") == 1, timeout=30, what="the call in flight")
    held = redis_server.client().hvals(SpendTracker(redis_server.client()).keys().held(user_id))
    [units] = [int(value.split(":")[0]) for value in held]

    # The user has settled nothing yet: before the fix `llmq cost --today` left it out.
    mine = _cost_today()["user"][user_id]
    assert mine["reserved_usd"] == float(to_usd(units)) > 0
    assert mine["requests"] == 0 and mine["cost_usd"] == 0

    result = job.get(timeout=30)
    mine = _cost_today()["user"][user_id]
    assert mine["requests"] == 1 and mine["reserved_usd"] == 0
    assert mine["cost_usd"] == result["cost_usd"]


JOBS = 200
FITTING = 50
MAX_TOKENS = 1000
PROMPT = [{"role": "user", "content": "Summarize the quarterly report in one line."}]
_MESSAGE_NUMBERS = re.compile(
    r"spent \$([\d.]+) \+ reserved \$([\d.]+) by jobs in flight \+ this job's worst-case "
    r"estimate \$([\d.]+) = \$[\d.]+, over the budget of \$([\d.]+)"
)


def test_concurrent_jobs_never_overrun_the_daily_budget(
    app: Any,
    fake: FakeProvider,
    worker_env: dict[str, str],
    run_dir: Path,
    redis_server: RedisServer,
    user_id: str,
) -> None:
    from worker.models import Message

    # The provider reports exactly the worst case (gpt-4o-mini counts are exact), so
    # every accepted job settles to its reservation and the number that fit is exact.
    input_tokens = tokens.count_messages([Message(**m) for m in PROMPT], model="gpt-4o-mini")  # type: ignore[arg-type]
    fake.usage = {
        "input_tokens": input_tokens,
        "output_tokens": MAX_TOKENS,
        "cached_input_tokens": 0,
    }
    estimate = input_tokens * 1_500 + MAX_TOKENS * 6_000  # units: $0.15 and $0.60 per 1M
    budget = estimate * FITTING + estimate // 2  # room for 50.5 jobs
    alert_at = estimate * 20
    namespace = f"test-{user_id}"
    queue = f"spend-{user_id}"
    env = {
        **worker_env,
        "LLM_FALLBACKS": "",  # one candidate: the reservation is its exact worst case
        "LLM_USER_DAILY_BUDGET_USD": str(to_usd(budget)),
        "LLM_DAILY_SPEND_ALERT_USD": str(to_usd(alert_at)),
        "LLM_SPEND_NAMESPACE": namespace,
    }
    workers = [Worker(env, run_dir, concurrency=6, queues=queue) for _ in range(4)]
    try:
        for process in workers:
            process.wait_ready(app)
        pending = [
            submit(PROMPT, user_id, max_tokens=MAX_TOKENS, temperature=0, queue=queue, cache=False)
            for _ in range(JOBS)
        ]
        outcomes = [job.get(timeout=120, propagate=False) for job in pending]
    finally:
        for process in workers:
            process.stop()

    accepted = [o for o in outcomes if isinstance(o, dict)]
    rejected = [o for o in outcomes if not isinstance(o, dict)]
    assert all(isinstance(o, DailyBudgetExceededError) for o in rejected), rejected[:3]
    # As many as can fit, and not one more; rejected jobs never reached the provider.
    assert len(accepted) == FITTING == budget // estimate
    assert len(rejected) == JOBS - FITTING
    assert fake.requests("openai") == FITTING

    tracker = SpendTracker(redis_server.client(), namespace=namespace)
    counters = tracker.totals()["user"][user_id]
    assert counters["cost_units"] == FITTING * estimate <= budget
    assert counters["requests"] == FITTING and counters["reserved_units"] == 0
    assert sum(Decimal(str(r["cost_usd"])) for r in accepted) == to_usd(counters["cost_units"])

    # No job was turned away while its worst case still fitted the unreserved budget:
    # each rejection saw spent + reserved = all 50 accepted jobs (50.5 would be needed).
    for error in rejected:
        found = _MESSAGE_NUMBERS.search(str(error))
        assert found, str(error)
        spent, reserved, job_estimate, limit = (to_units(Decimal(g)) for g in found.groups())
        assert (job_estimate, limit) == (estimate, budget)
        assert spent + reserved == FITTING * estimate
        assert spent + reserved + job_estimate > budget

    records = _job_records(*workers)
    alerts = [r for r in records if r.get("event") == "llm_spend_alert"]
    assert len(alerts) == 1 and alerts[0]["alert"] == "DAILY_SPEND_THRESHOLD"
    assert {r["task_id"] for r in records if r.get("event") == "llm_job"} == {
        job.id for job in pending
    }

    # `llmq cost` over these workers' logs totals exactly the per-job cost_usd.
    logs = [str(process.log_path) for process in workers]
    done = subprocess.run(
        [LLMQ, "cost", "--json", *logs], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    mine = report["user"][user_id]
    assert Decimal(str(mine["cost_usd"])) == to_usd(counters["cost_units"])
    assert (mine["requests"], mine["failed"]) == (JOBS, JOBS - FITTING)
    assert mine["output_tokens"] == FITTING * MAX_TOKENS

    # And `llmq cost --today` reads the same numbers from the live Redis counters.
    live = subprocess.run(
        [LLMQ, "cost", "--today", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLM_SPEND_NAMESPACE": namespace},
    )
    assert live.returncode == 0, live.stderr
    today = json.loads(live.stdout)
    assert today["user"][user_id]["cost_usd"] == mine["cost_usd"]
    assert today["user"][user_id]["requests"] == FITTING
    assert today["total"]["cost_usd"] == mine["cost_usd"]
