"""The shared circuit breaker: real Redis, and a real worker during a primary outage."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer import submit
from producer.cli import main
from tests.conftest import MakePipeline, StartWorker
from tests.fakes import FakeProvider, Fault
from tests.harness import RedisServer, free_port, wait_for
from worker.breaker import BreakerConfig, CircuitBreaker, describe, endpoint, open_circuits
from worker.errors import AllProvidersFailedError, ProviderRequestError, ProviderUnavailableError
from worker.pipeline import JobContext
from worker.resilience import Admission
from worker.settings import load_settings

DOWN = ProviderUnavailableError("openai answered HTTP 503: down", provider="openai", status=503)
COOLDOWN = 30.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(redis_server: RedisServer, clock: Clock) -> CircuitBreaker:
    """A breaker on its own endpoint name: 3 in a row, or half of at least 10 calls."""
    config = BreakerConfig(
        failures=3,
        failure_rate=0.5,
        min_calls=10,
        window_seconds=60,
        cooldown_seconds=COOLDOWN,
        probe_ttl_seconds=5,
    )
    endpoints = {"openai": f"test-{uuid.uuid4().hex[:10]}"}
    return CircuitBreaker(redis_server.client(), config=config, endpoints=endpoints, clock=clock)


def fail(breaker: CircuitBreaker, times: int = 1, *, probe: bool = False) -> None:
    for _ in range(times):
        breaker.record("openai", error=DOWN, probe=probe)


def test_opens_after_a_run_of_failures(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.admit("openai") is Admission.CLOSED
    fail(breaker)
    assert breaker.admit("openai") is Admission.OPEN
    assert breaker.is_open("openai")
    state = breaker.state("openai")
    assert state is not None
    assert state["reason"] == "3 failures in a row" and "503" in state["last_error"]


def test_a_success_ends_the_run(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record("openai", error=None, probe=False)
    fail(breaker, 2)
    assert breaker.admit("openai") is Admission.CLOSED


def test_opens_on_failure_rate(breaker: CircuitBreaker) -> None:
    # Never two failures in a row, but half of the window's calls fail.
    for _ in range(4):
        fail(breaker)
        breaker.record("openai", error=None, probe=False)
    fail(breaker)
    assert breaker.admit("openai") is Admission.CLOSED  # 5 of 9: below the minimum calls
    breaker.record("openai", error=None, probe=False)  # 5 of 10, but a success
    assert breaker.admit("openai") is Admission.CLOSED
    fail(breaker)  # 6 of 11
    assert breaker.admit("openai") is Admission.OPEN
    assert breaker.state("openai")["reason"] == "6 of 11 calls failed"  # type: ignore[index]


def test_bad_requests_say_nothing_about_the_provider(breaker: CircuitBreaker) -> None:
    bad = ProviderRequestError("openai answered HTTP 400: bad", provider="openai", status=400)
    for _ in range(10):
        breaker.record("openai", error=bad, probe=False)
    assert breaker.admit("openai") is Admission.CLOSED


def admit_at_once(breaker: CircuitBreaker, contenders: int) -> list[Admission]:
    barrier = threading.Barrier(contenders)
    answers: list[Admission] = []

    def contend() -> None:
        barrier.wait()
        answers.append(breaker.admit("openai"))

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_half_open_admits_exactly_one_probe(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += COOLDOWN - 1
    assert admit_at_once(breaker, 10).count(Admission.OPEN) == 10

    clock.now += 1
    answers = admit_at_once(breaker, 20)
    assert answers.count(Admission.PROBE) == 1 and answers.count(Admission.OPEN) == 19

    fail(breaker, probe=True)  # the probe failed: open for another cool-down
    assert breaker.admit("openai") is Admission.OPEN
    clock.now += COOLDOWN
    answers = admit_at_once(breaker, 20)
    assert answers.count(Admission.PROBE) == 1

    breaker.record("openai", error=None, probe=True)  # the probe succeeded: closed
    assert set(admit_at_once(breaker, 5)) == {Admission.CLOSED}
    assert breaker.state("openai")["state"] == "closed"  # type: ignore[index]
    fail(breaker, 2)  # a fresh run is needed to open it again
    assert breaker.admit("openai") is Admission.CLOSED


def test_a_vanished_probe_frees_the_slot(redis_server: RedisServer, clock: Clock) -> None:
    config = BreakerConfig(failures=1, cooldown_seconds=1, probe_ttl_seconds=0.3)
    breaker = CircuitBreaker(
        redis_server.client(),
        config=config,
        endpoints={"openai": f"test-{uuid.uuid4().hex[:10]}"},
        clock=clock,
    )
    fail(breaker)
    clock.now += 1
    assert breaker.admit("openai") is Admission.PROBE
    # Its holder died without recording: after the probe TTL another job may probe.
    assert breaker.admit("openai") is Admission.OPEN
    wait_for(lambda: breaker.admit("openai") is Admission.PROBE, timeout=10, what="probe TTL")


def test_open_circuits_for_health(
    breaker: CircuitBreaker, clock: Clock, redis_server: RedisServer, capsys: Any
) -> None:
    fail(breaker, 3)
    name = breaker.circuit("openai")
    listed = {c["circuit"]: c for c in open_circuits(redis_server.client())}
    assert listed[name]["state"] == "open" and listed[name]["provider"] == "openai"
    assert 0 < listed[name]["retry_in_seconds"] <= COOLDOWN
    assert listed[name]["consecutive_failures"] == 3

    assert main(["circuits"]) == 0
    printed = {c["circuit"]: c for c in json.loads(capsys.readouterr().out)}
    assert printed[name]["state"] == "open"

    clock.now += COOLDOWN
    assert describe(redis_server.client(), name, now=clock.now)["state"] == "half_open"  # type: ignore[index]
    breaker.admit("openai")
    breaker.record("openai", error=None, probe=True)
    assert name not in {c["circuit"] for c in open_circuits(redis_server.client())}


def test_breaker_never_fails_a_job_when_redis_is_down() -> None:
    dead = redis.Redis(port=free_port(), decode_responses=True, retry=Retry(NoBackoff(), 0))
    breaker = CircuitBreaker(dead, config=BreakerConfig(failures=1))
    breaker.record("openai", error=DOWN, probe=False)
    assert breaker.admit("openai") is Admission.CLOSED
    assert not breaker.is_open("openai")


def test_endpoint_never_keeps_credentials() -> None:
    settings = load_settings(OPENAI_BASE_URL="https://user:secret@proxy.example:8443/v1/")
    assert endpoint("openai", settings) == "proxy.example:8443/v1"
    assert endpoint("anthropic", settings) == "api.anthropic.com"


def test_primary_outage_100_jobs_via_fallback_and_circuit_stops_primary(
    start_worker: StartWorker, fake: FakeProvider, redis_server: RedisServer, user_id: str
) -> None:
    path, cooldown, failures, concurrency, attempts = uuid.uuid4().hex[:10], 4.0, 5, 8, 2
    base_url = f"{fake.url}/{path}/v1"
    queue = f"breaker-{path}"
    start_worker(
        concurrency=concurrency,
        queues=queue,
        OPENAI_BASE_URL=base_url,
        LLM_BREAKER_FAILURES=str(failures),
        LLM_BREAKER_MIN_CALLS="20",
        LLM_BREAKER_COOLDOWN_SECONDS=str(cooldown),
        LLM_RETRY_ATTEMPTS=str(attempts),
        LLM_RETRY_INITIAL_WAIT_SECONDS="0.05",
    )
    fake.set_always("openai", Fault(status=503))
    messages = [{"role": "user", "content": "Say hi."}]
    jobs = [submit(messages, user_id, queue=queue) for _ in range(100)]
    results = [job.get(timeout=120) for job in jobs]

    assert [r["provider"] for r in results] == ["anthropic"] * 100
    assert fake.requests("anthropic") == 100
    name = f"openai@{endpoint('openai', load_settings(OPENAI_BASE_URL=base_url))}"
    circuit = describe(redis_server.client(), name)
    assert circuit is not None and circuit["since"] is not None

    # The fake's arrival times (monotonic) on the wall clock the breaker stores.
    offset = time.time() - time.monotonic()
    primary = [seen.at + offset for seen in fake.seen if seen.api == "openai"]
    opened = circuit["since"]
    # Before it opened: the run that opened it, plus calls already in flight.
    before = [t for t in primary if t <= opened + 1.0]
    assert failures <= len(before) <= failures + concurrency * attempts
    # After: nothing until each cool-down has passed, then one probe at a time.
    probes = [t for t in primary if t > opened + 1.0]
    previous = opened
    for probe in probes:
        assert probe - previous >= cooldown * 0.9
        previous = probe
    assert len(primary) < 100 / 4

    # The primary recovers: the next job after the cool-down is the probe, and closes it.
    wait_for(
        lambda: describe(redis_server.client(), name)["state"] == "half_open",  # type: ignore[index]
        timeout=cooldown + 10,
        what="the cool-down to end",
    )
    fake.set_always("openai", None)
    seen_before = fake.requests("openai")
    probe_result = submit(messages, user_id, queue=queue).get(timeout=30)
    assert probe_result["provider"] == "openai" and probe_result["attempts"] == 1
    assert fake.requests("openai") == seen_before + 1
    assert describe(redis_server.client(), name)["state"] == "closed"  # type: ignore[index]
    after = [submit(messages, user_id, queue=queue) for _ in range(5)]
    assert {job.get(timeout=30)["provider"] for job in after} == {"openai"}


def test_open_circuits_everywhere_fail_fast_without_calls(
    make_pipeline: MakePipeline, fake: FakeProvider, user_id: str
) -> None:
    fake.set_always("openai", Fault(status=503))
    fake.set_always("anthropic", Fault(status=503))
    pipeline = make_pipeline(LLM_BREAKER_FAILURES=2, LLM_RETRY_ATTEMPTS=2)
    job = {"messages": [{"role": "user", "content": "Hi"}], "user_id": user_id}
    with pytest.raises(AllProvidersFailedError):
        pipeline.complete(job, context=JobContext())
    assert (fake.requests("openai"), fake.requests("anthropic")) == (2, 2)

    with pytest.raises(AllProvidersFailedError) as raised:
        pipeline.complete(job, context=JobContext())
    assert str(raised.value).count("circuit is open") == 2
    assert fake.requests() == 4
