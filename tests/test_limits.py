"""Global rate limits: the Lua check-and-reserve directly, then through real workers."""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from producer import submit
from producer.cli import main as llmq
from tests.fakes import FakeProvider
from tests.harness import RedisServer, Worker, wait_for
from worker.errors import RateLimitedError
from worker.limits import LimitDecision, LimitReservation, RateLimiter, user_usage
from worker.models import Message
from worker.settings import load_settings
from worker.tasks import defer_countdown, on_limit_policy
from worker.tokens import count_messages

PROMPT = "Name three prime numbers."


def limiter_for(redis_server: RedisServer, **overrides: Any) -> RateLimiter:
    """A limiter on the test Redis with its own key prefix."""
    settings = load_settings(rate_limit_prefix=f"t-{uuid.uuid4().hex[:8]}", **overrides)
    return RateLimiter(settings, client=redis_server.client())


def reserve(limiter: RateLimiter, user: str, tokens: int, **where: str) -> LimitDecision:
    """One check-and-reserve for `user` on openai/gpt-4o-mini (or `where`)."""
    limits = limiter.limits(
        user_id=user,
        provider=where.get("provider", "openai"),
        model=where.get("model", "gpt-4o-mini"),
    )
    return limiter.check(limits, tokens=tokens, reservation_id=uuid.uuid4().hex)


def hold(limiter: RateLimiter, user: str, tokens: int) -> LimitReservation:
    """Reserve one attempt of `user` on openai/gpt-4o-mini, as the meter does."""
    limits = limiter.attempt_limits(
        user_id=user, provider="openai", model="gpt-4o-mini", first=True
    )
    held = limiter.reserve(limits, tokens=tokens, reservation_id=uuid.uuid4().hex, user_id=user)
    assert held is not None
    return held


def replay(decisions: list[tuple[int, int, int, bool]], limit: int) -> int:
    """Prove a set of (seq, usage, requested, admitted) decisions was serial and exact.

    Every decision must have seen exactly the admissions before it, admitted only
    what fit, and rejected only what did not fit. Returns the admitted total.
    """
    decisions = sorted(decisions)
    assert [d[0] for d in decisions] == list(range(1, len(decisions) + 1))
    admitted_total = 0
    for seq, usage, requested, admitted in decisions:
        assert usage == admitted_total, f"decision {seq} saw {usage}, not {admitted_total}"
        if admitted:
            assert usage + requested <= limit
            admitted_total += requested
        else:
            assert usage + requested > limit, f"decision {seq} rejected with room left"
    assert admitted_total <= limit
    return admitted_total


def redis_now(redis_server: RedisServer) -> float:
    """Redis server time in seconds."""
    seconds, micros = redis_server.client().time()
    return float(seconds) + micros / 1_000_000


# --- the Lua script, directly ----------------------------------------------------


def test_concurrent_reservations_never_over_admit(redis_server: RedisServer) -> None:
    rng = random.Random(4)
    amounts = [rng.randint(50, 150) for _ in range(300)]
    limit = sum(amounts) // 3
    limiter = limiter_for(redis_server, user_tokens_per_hour=limit)
    start = threading.Barrier(24)

    def attempt(amount: int) -> tuple[int, int, int, bool]:
        decision = reserve(limiter, "stress", amount)
        (check,) = decision.checks
        return check.seq, check.usage, amount, decision.admitted

    def worker(chunk: list[int]) -> list[tuple[int, int, int, bool]]:
        start.wait()
        return [attempt(a) for a in chunk]

    with ThreadPoolExecutor(24) as pool:
        chunks = [amounts[i::24] for i in range(24)]
        decisions = [d for done in pool.map(worker, chunks) for d in done]

    admitted_total = replay(decisions, limit)
    admitted = sum(d[3] for d in decisions)
    assert 80 <= admitted <= 130, admitted  # about a third of 300
    (now,) = limiter.usage(limiter.user_limits("stress"))
    assert now.usage == admitted_total <= limit


def test_rejected_attempts_do_not_consume_budget(redis_server: RedisServer) -> None:
    limiter = limiter_for(redis_server, user_tokens_per_hour=1000)
    assert reserve(limiter, "u", 600).admitted
    rejections = [reserve(limiter, "u", 500) for _ in range(50)]
    assert not any(r.admitted for r in rejections)
    assert {r.checks[0].usage for r in rejections} == {600}
    error = rejections[-1].error(user_id="u")
    assert (error.limit_name, error.usage, error.requested, error.limit) == (
        "user_tokens",
        600,
        500,
        1000,
    )
    assert error.retry_after is not None and 3590 < error.retry_after <= 3600
    # The user still has all of the remaining 400 tokens, to the token.
    assert reserve(limiter, "u", 400).admitted
    assert not reserve(limiter, "u", 1).admitted


def test_window_slides_on_redis_time(redis_server: RedisServer) -> None:
    window = 2.0
    limiter = limiter_for(redis_server, user_tokens_per_hour=100, user_token_window_seconds=window)
    first = reserve(limiter, "u", 60)
    wait_for(
        lambda: redis_now(redis_server) >= first.redis_time + window / 2,
        timeout=10,
        what="half a window",
    )
    second = reserve(limiter, "u", 40)
    assert first.admitted and second.admitted
    rejected = reserve(limiter, "u", 60)
    assert not rejected.admitted and rejected.retry_after is not None
    # Sliding, not fixed: 60 more fit only once the first 60 have left; the 40 stay counted.
    assert rejected.retry_after == pytest.approx(first.redis_time + window - rejected.redis_time)
    admitted = wait_for(
        lambda: (d := reserve(limiter, "u", 50)).admitted and d,
        timeout=15,
        what="the first reservation to leave the window",
    )
    assert admitted.redis_time >= first.redis_time + window
    assert admitted.redis_time >= rejected.redis_time + rejected.retry_after - 0.001
    assert admitted.checks[0].usage == 40  # the second reservation is still in the window
    # No double burst at the boundary: the window still holds 40 + 50.
    assert not reserve(limiter, "u", 20).admitted


def test_settle_release_and_expired_entries(redis_server: RedisServer) -> None:
    limiter = limiter_for(redis_server, user_tokens_per_hour=1000, user_token_window_seconds=1)
    held = hold(limiter, "u", 700)
    other = hold(limiter, "u", 200)
    assert limiter.usage(held.limits)[0].usage == 900
    held.settle(tokens=120)
    assert limiter.usage(held.limits)[0].usage == 320
    other.release()
    assert limiter.usage(held.limits)[0].usage == 120
    # A worker that died never settles: its entry ages out; settling later is a no-op.
    orphan = hold(limiter, "u", 800)
    wait_for(
        lambda: limiter.usage(orphan.limits)[0].usage == 0, timeout=10, what="entries to age out"
    )
    orphan.settle(tokens=5)
    orphan.release()
    held.release()
    assert limiter.usage(orphan.limits)[0].usage == 0
    assert reserve(limiter, "u", 1000).admitted  # the whole limit, no negative drift
    assert not reserve(limiter, "u", 1).admitted


def test_users_independent_provider_limit_shared(redis_server: RedisServer) -> None:
    limiter = limiter_for(
        redis_server,
        user_tokens_per_hour=1000,
        user_limits={"small": {"tokens_per_hour": 100}},
        provider_limits={"openai": {"rpm": 4}, "gpt-4o": {"tpm": 500}},
    )
    assert not reserve(limiter, "small", 101).admitted
    assert reserve(limiter, "big", 900).admitted  # the override is small's alone
    assert reserve(limiter, "small", 100).admitted
    assert reserve(limiter, "carol", 10).admitted
    assert reserve(limiter, "dave", 10).admitted
    # Four requests on openai from four users: the provider's fifth is refused for anyone.
    refused = reserve(limiter, "erin", 10)
    assert not refused.admitted and refused.binding is not None
    assert refused.binding.limit.name == "provider_rpm:openai"
    assert refused.error(user_id="erin").usage == 4
    # The refusal counted nowhere: erin's own budget is whole.
    assert limiter.usage(limiter.user_limits("erin"))[0].usage == 0
    # A model limit applies to that model only.
    assert reserve(limiter, "erin", 400, provider="openai-other", model="gpt-4o").admitted
    assert not reserve(limiter, "frank", 101, provider="x", model="gpt-4o").admitted


def test_a_job_larger_than_the_limit_can_never_run(redis_server: RedisServer) -> None:
    limiter = limiter_for(redis_server, user_tokens_per_hour=500, user_requests_per_minute=10)
    decision = reserve(limiter, "u", 501)
    assert not decision.admitted and decision.retry_after == math.inf
    error = decision.error(user_id="u")
    assert "can never run" in str(error) and error.retry_after == math.inf
    assert RateLimitedError(str(error)).retry_after == math.inf
    logged = json.loads(json.dumps(decision.log_fields(), allow_nan=False))
    assert logged["never_fits"] is True and logged["retry_after"] is None
    assert limiter.usage(limiter.user_limits("u"))[1].usage == 0  # nor its request


def test_error_rebuilds_from_its_message_alone(redis_server: RedisServer) -> None:
    limiter = limiter_for(redis_server, user_tokens_per_hour=100)
    reserve(limiter, "u", 80)
    error = reserve(limiter, "u", 30).error(user_id="u")
    rebuilt = RateLimitedError(str(error))  # what Celery does on the producer side
    assert (rebuilt.limit_name, rebuilt.usage, rebuilt.requested, rebuilt.limit) == (
        "user_tokens",
        80,
        30,
        100,
    )
    assert rebuilt.retry_after == error.retry_after and rebuilt.retry_after is not None
    assert "LLM_USER_TOKENS_PER_HOUR" in str(rebuilt) and "on_limit='defer'" in str(rebuilt)


def test_defer_countdown_stays_within_bounds() -> None:
    settings = load_settings(
        visibility_timeout=40, job_deadline_seconds=20, defer_max_wait_seconds=100
    )
    error = RateLimitedError(
        "x [limit=user_tokens usage=1 requested=1 limit_value=1 retry_after=500.000s]"
    )
    # Waiting plus running stays within the visibility timeout: 40 - 20 - 5 s of margin.
    assert defer_countdown(error, waited=0, settings=settings) == 15
    assert defer_countdown(error, waited=95, settings=settings) == pytest.approx(5)
    assert defer_countdown(error, waited=100, settings=settings) is None
    never = RateLimitedError(
        "x [limit=user_tokens usage=1 requested=9 limit_value=1 retry_after=never]"
    )
    assert defer_countdown(never, waited=0, settings=settings) is None


def test_on_limit_policy_defaults() -> None:
    settings = load_settings(on_limit="fail", batch_on_limit="defer")
    policy = functools.partial(on_limit_policy, settings=settings)
    assert policy(requested=None, deferred_before=False, queue="llm") == "fail"
    assert policy(requested=None, deferred_before=False, queue="batch") == "defer"
    assert policy(requested="fail", deferred_before=False, queue="batch") == "fail"
    assert policy(requested="defer", deferred_before=False, queue="llm") == "defer"
    # Once deferred, a job stays a deferred job on the deferred queue.
    assert policy(requested=None, deferred_before=True, queue="llm.deferred") == "defer"


def test_limit_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_USER_LIMITS", '{"alice": {"tokens_per_hour": 5000}}')
    monkeypatch.setenv("LLM_PROVIDER_LIMITS", '{"openai": {"rpm": 500, "tpm": 200000}}')
    settings = load_settings()
    limiter = RateLimiter(settings)
    (alice,) = limiter.user_limits("alice")
    assert (alice.limit, alice.setting) == (5000, "LLM_USER_LIMITS")
    assert limiter.user_limits("bob")[0].limit == 100_000
    assert {lim.name for lim in limiter.shared_limits()} == {
        "provider_rpm:openai",
        "provider_tpm:openai",
    }
    monkeypatch.setenv("LLM_USER_LIMITS", '{"alice": {"tokens_per_day": 5}}')
    with pytest.raises(Exception, match="LLM_USER_LIMITS"):
        load_settings()


def test_llmq_limits_prints_usage(
    redis_server: RedisServer, user_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings()  # the CLI's own settings: default prefix and limits
    limiter = RateLimiter(settings, client=redis_server.client())
    hold(limiter, user_id, 1234)
    assert llmq(["limits", user_id, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (tokens,) = report["limits"]
    assert (tokens["limit"], tokens["usage"], tokens["limit_value"]) == (
        "user_tokens",
        1234,
        100_000,
    )
    assert tokens["remaining"] == 100_000 - 1234
    assert 3590 < tokens["oldest_leaves_in_seconds"] <= 3600
    assert [u.usage for u in user_usage(settings, user_id)] == [1234]
    assert llmq(["limits", user_id]) == 0
    assert "user_tokens" in capsys.readouterr().out


# --- through real workers --------------------------------------------------------

StartWorkers = Callable[..., list[Worker]]


@pytest.fixture
def start_workers(app: Any, worker_env: dict[str, str], run_dir: Path) -> Iterator[StartWorkers]:
    """Start several workers at once on a private queue; all are stopped after the test."""
    started: list[Worker] = []

    def start(count: int, *, queue: str, concurrency: int = 4, **env: str) -> list[Worker]:
        batch = [
            Worker({**worker_env, **env}, run_dir, concurrency=concurrency, queues=queue)
            for _ in range(count)
        ]
        started.extend(batch)
        for worker in batch:
            worker.wait_ready(app)
        return batch

    yield start
    for worker in started:  # warm shutdowns in parallel, then wait for each
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in started:
        worker.stop()


def records(workers: list[Worker], event: str) -> list[dict[str, Any]]:
    """The JSON log records of `event` that `workers` wrote."""
    return [record for worker in workers for record in worker.records(event)]


def private_env(**env: str) -> dict[str, str]:
    """Worker environment with its own limit keys and deferred queue."""
    tag = uuid.uuid4().hex[:8]
    return {
        "LLM_RATE_LIMIT_PREFIX": f"e2e-{tag}",
        "LLM_DEFERRED_QUEUE": f"deferred-{tag}",
        **env,
    }


def estimate(max_tokens: int) -> tuple[int, int]:
    """The worker's pre-flight estimate for PROMPT on gpt-4o-mini: (input, total)."""
    prompt = count_messages([Message(role="user", content=PROMPT)], model="gpt-4o-mini")
    return prompt, prompt + max_tokens


def outcome(job: Any, timeout: float = 120) -> dict[str, Any] | RateLimitedError:
    """A job's result, or the RateLimitedError it failed with."""
    try:
        value: dict[str, Any] = job.get(timeout=timeout)
        return value
    except RateLimitedError as exc:
        return exc


def test_stress_300_jobs_on_4_workers_never_over_admit(
    start_workers: StartWorkers, fake: FakeProvider, user_id: str
) -> None:
    prompt_tokens, per_job = estimate(max_tokens=100)
    # The provider reports exactly the estimate, so settling changes nothing and
    # the window holds exactly the reservations.
    fake.usage = {"input_tokens": prompt_tokens, "output_tokens": 100, "cached_input_tokens": 0}
    limit = 100 * per_job
    queue = f"stress-{uuid.uuid4().hex[:6]}"
    workers = start_workers(
        4, queue=queue, concurrency=4, **private_env(LLM_USER_TOKENS_PER_HOUR=str(limit))
    )
    jobs = [
        submit([{"role": "user", "content": PROMPT}], user_id, queue=queue, max_tokens=100)
        for _ in range(300)
    ]
    outcomes = [outcome(job) for job in jobs]

    done = [o for o in outcomes if isinstance(o, dict)]
    rejected = [o for o in outcomes if isinstance(o, RateLimitedError)]
    assert len(done) + len(rejected) == 300
    assert len(done) == 100  # about a third, and exactly what fits
    assert sum(o["input_tokens"] + o["output_tokens"] for o in done) <= limit
    assert fake.requests("openai") == 100  # a rejected job never reaches the provider
    assert all(e.limit_name == "user_tokens" and e.limit == limit for e in rejected)
    assert all(e.usage is not None and e.usage + per_job > limit for e in rejected)

    # The proof from the script's own records, as the workers logged each decision.
    jobs_logged = [r for r in records(workers, "llm_job") if r["user_id"] == user_id]
    assert len(jobs_logged) == 300
    decisions = [
        (
            r["rate_limit"]["limits"]["user_tokens"]["seq"],
            r["rate_limit"]["limits"]["user_tokens"]["usage"],
            r["rate_limit"]["limits"]["user_tokens"]["requested"],
            r["rate_limit"]["admitted"],
        )
        for r in jobs_logged
    ]
    assert replay(decisions, limit) == 100 * per_job
    assert sum(r["rate_limit"]["admitted"] for r in jobs_logged) == 100
    assert {r["rate_limit"].get("limit") for r in jobs_logged if r["error"]} == {"user_tokens"}
    # Every worker process took part.
    assert all(records([w], "llm_job") for w in workers)


def test_users_and_provider_rpm_through_a_worker(
    start_workers: StartWorkers, fake: FakeProvider
) -> None:
    queue = f"rpm-{uuid.uuid4().hex[:6]}"
    users = [f"user-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    workers = start_workers(
        1,
        queue=queue,
        **private_env(
            LLM_PROVIDER_LIMITS='{"openai": {"rpm": 4}}',
            LLM_USER_LIMITS=json.dumps({users[0]: {"tokens_per_hour": 10}}),
            # No fallback: the provider limit alone decides (tests/test_metering.py has
            # the fallback taking over).
            LLM_FALLBACKS="",
        ),
    )

    def job(user: str) -> Any:
        return submit([{"role": "user", "content": PROMPT}], user, queue=queue, max_tokens=50)

    # users[0] is over its own tiny limit; the others are not affected by it.
    first = outcome(job(users[0]))
    assert isinstance(first, RateLimitedError) and first.limit_name == "user_tokens"
    assert all(isinstance(outcome(job(u)), dict) for u in users[1:])
    # The provider's 4 requests a minute are shared: two more, from anyone, then no more.
    assert isinstance(outcome(job(users[1])), dict)
    assert isinstance(outcome(job(users[2])), dict)
    late = [outcome(job(u)) for u in users[1:]]
    assert all(isinstance(e, RateLimitedError) for e in late)
    assert {e.limit_name for e in late if isinstance(e, RateLimitedError)} == {
        "provider_rpm:openai"
    }
    assert fake.requests("openai") == 4
    logged = records(workers, "llm_job")
    assert [r["rate_limit"]["admitted"] for r in logged].count(True) == 4


def test_deferred_jobs_all_complete_within_max_wait(
    start_workers: StartWorkers, fake: FakeProvider, user_id: str
) -> None:
    prompt_tokens, per_job = estimate(max_tokens=60)
    fake.usage = {"input_tokens": prompt_tokens, "output_tokens": 60, "cached_input_tokens": 0}
    max_wait = 8.0
    queue = f"defer-{uuid.uuid4().hex[:6]}"
    workers = start_workers(
        1,
        queue=queue,
        concurrency=4,
        **private_env(
            LLM_USER_TOKENS_PER_HOUR=str(2 * per_job),
            LLM_USER_TOKEN_WINDOW_SECONDS="2",
            LLM_DEFER_MAX_WAIT_SECONDS=str(max_wait),
            LLM_PROVIDER_LIMITS='{"gpt-4o": {"rpm": 1}}',
            LLM_PROVIDER_WINDOW_SECONDS="60",
            LLM_FALLBACKS="",  # the model limit alone decides; no other provider takes over
        ),
    )
    messages = [{"role": "user", "content": PROMPT}]
    ids = [f"defer-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    jobs = [
        submit(messages, user_id, queue=queue, max_tokens=60, on_limit="defer", request_id=i)
        for i in ids
    ]
    # One job too big for the limit fails at once, defer or not.
    too_big = submit(messages, user_id, queue=queue, max_tokens=2000, on_limit="defer")
    # The model limit admits one gpt-4o job a minute: the second waits, then gives up.
    other = f"user-{uuid.uuid4().hex[:6]}"
    gpt4o = [
        submit(messages, other, queue=queue, model="gpt-4o", max_tokens=20, on_limit="defer")
        for _ in range(2)
    ]

    results = [outcome(job, timeout=60) for job in jobs]
    assert all(isinstance(r, dict) for r in results), results
    assert [r["request_id"] for r in results if isinstance(r, dict)] == ids  # none lost
    assert len({job.id for job in jobs}) == len(ids)  # task ids are llmq's, not request ids
    never = outcome(too_big)
    assert isinstance(never, RateLimitedError) and never.retry_after == math.inf
    # Either gpt-4o job may reach the limit first (4 threads): exactly one runs.
    both = [outcome(job, timeout=60) for job in gpt4o]
    ran = [r for r in both if isinstance(r, dict)]
    refused = [r for r in both if isinstance(r, RateLimitedError)]
    assert len(ran) == 1 and len(refused) == 1, both
    assert "Gave up after deferring" in str(refused[0])
    assert refused[0].limit_name == "model_rpm:gpt-4o"

    deferrals = records(workers, "llm_deferred")
    mine = [d for d in deferrals if d["user_id"] == user_id]
    assert len({d["request_id"] for d in mine}) >= 3  # only 2 fit in the first window
    for record in deferrals:
        assert record["countdown"] <= 15  # half the test visibility timeout
        assert record["waited_s"] + record["countdown"] <= max_wait + 1e-6
    gave_up = [d for d in deferrals if d["user_id"] == other]
    assert gave_up and max(d["waited_s"] + d["countdown"] for d in gave_up) == pytest.approx(
        max_wait, abs=0.01
    )
    admitted = [
        r for r in records(workers, "llm_job") if r["user_id"] == user_id and not r["error"]
    ]
    assert len(admitted) == 5


def test_deferred_queue_is_consumed_by_every_worker(app: Any, worker: Worker) -> None:
    active = app.control.inspect(destination=[worker.name], timeout=5).active_queues()
    names = {q["name"] for q in active[worker.name]}
    assert {"llm", "batch", load_settings().deferred_queue} <= names
