"""`llmq summarize --batch-api`: real workers against the stateful fake Batch APIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from producer.batch import BatchOptions, BatchRun, Document, Record
from tests import corpus
from tests.conftest import StartWorker
from tests.fake_batches import USAGE_IN, USAGE_OUT, FakeBatches, Outcome, answer_text
from tests.harness import ROOT, Isolated, wait_for
from worker.batchapi.listing import listing
from worker.models import Usage
from worker.prices import load_prices
from worker.spend import to_units, utc_day

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
CHUNK_TOKENS = 2000


@pytest.fixture(scope="session")
def batches_server() -> Iterator[FakeBatches]:
    """The fake Batch APIs for the whole session."""
    server = FakeBatches()
    yield server
    server.stop()


@pytest.fixture
def batches(batches_server: FakeBatches) -> FakeBatches:
    """The fake Batch APIs, reset."""
    batches_server.reset()
    return batches_server


def batch_env(batches: FakeBatches, **extra: str) -> dict[str, str]:
    """Worker environment: both providers' SDKs at the fake, polls every 0.1 s."""
    return {
        "OPENAI_BASE_URL": f"{batches.url}/v1",
        "ANTHROPIC_BASE_URL": batches.url,
        "LLM_BATCH_API_POLL_SECONDS": "0.1",
        **extra,
    }


def realtime_price(model: str) -> Decimal:
    """What one fake answer costs in real time, from the price table."""
    return load_prices().get(model).cost(Usage(input_tokens=USAGE_IN, output_tokens=USAGE_OUT))


def requests_sent(batches: FakeBatches) -> int:
    return sum(len(b.requests) for b in batches.batches.values())


def succeeded(batches: FakeBatches) -> int:
    return sum(1 for b in batches.batches.values() for r in b.results if r["kind"] == "succeeded")


def spent_units(isolated: Isolated, user_id: str) -> int:
    import redis

    client = redis.Redis.from_url(isolated.url, decode_responses=True)
    return int(client.hget(f"llmq:spend:{utc_day()}:user:{user_id}", "cost_units") or 0)


def run_batch(
    isolated: Isolated,
    documents: list[Document],
    *,
    model: str,
    user_id: str,
    out: Path | None = None,
    wait: float = 120,
) -> tuple[Any, list[Record]]:
    records: list[Record] = []

    class Listener:
        def started(self, *, total: int, skipped: int) -> None:
            pass

        def finished(self, record: Record, totals: Any) -> None:
            records.append(record)

    run = BatchRun(
        documents=documents,
        options=BatchOptions(
            user_id=user_id,
            model=model,
            words=40,
            chunk_tokens=CHUNK_TOKENS,
            batch_api=True,
            batch_wait=wait,
            timeout=60,
        ),
        out=out,
        listener=Listener(),
        app=isolated.app,
    )
    return run.run(), records


def corpus_documents(count: int) -> list[Document]:
    return [Document(id=d.name, source=d.name, text=d.text) for d in corpus.sample(count)]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_300_documents_at_half_price(
    provider: str,
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    model = MODELS[provider]
    # 120 requests a batch: the map round is split into several provider batches.
    start_worker(isolated=isolated, **batch_env(batches, LLM_BATCH_API_MAX_REQUESTS="120"))
    documents = corpus_documents(300)
    report, records = run_batch(isolated, documents, model=model, user_id=user_id)

    # Every document accounted for, each summarized from the provider's batch answers.
    assert report.documents == len(records) == 300 and report.failed == 0, [
        r["error"] for r in records if r["error"]
    ][:3]
    assert {r["id"] for r in records} == {d.id for d in documents}
    chunked = [r for r in records if r["chunks"] > 1]
    assert len(chunked) >= 10  # long documents went through a combining round
    order = {d.id: n for n, d in enumerate(documents)}
    for record in records:
        # A short document's own answer; a long one's from the combining round.
        last = f"d{order[record['id']]:06d}-l{record['levels']}-p00001"
        assert record["summary"] == answer_text(last), record["id"]
        assert record["levels"] == (0 if record["chunks"] == 1 else 1)
        assert record["calls"] == (1 if record["chunks"] == 1 else record["chunks"] + 1)
    # Map round split by the request limit; one more round combined the long documents.
    map_requests = sum(r["chunks"] for r in records)
    assert requests_sent(batches) == map_requests + len(chunked)
    assert batches.created[provider] == -(-map_requests // 120) + -(-len(chunked) // 120)
    assert all(len(b.requests) <= 120 for b in batches.batches.values())

    # Half of the real-time price, to 1e-9 USD: in the report, per record, in the budget.
    calls = requests_sent(batches)
    realtime = realtime_price(model) * calls
    assert abs(Decimal(str(report.cost_usd)) - realtime / 2) < Decimal("1e-9")
    assert report.realtime_cost_usd is not None
    assert abs(Decimal(str(report.realtime_cost_usd)) - realtime) < Decimal("1e-9")
    assert spent_units(isolated, user_id) == to_units(realtime / 2)
    assert report.input_tokens == USAGE_IN * calls and report.output_tokens == USAGE_OUT * calls

    # `llmq batches`: every batch done, counted and costed; no reservation left behind.
    import redis

    client = redis.Redis.from_url(isolated.url, decode_responses=True)
    rows = listing(client)
    assert len(rows) == sum(batches.created.values())
    assert all(row["state"] == "done" and row["charged"] == row["requests"] for row in rows)
    assert abs(sum(Decimal(str(row["cost_usd"])) for row in rows) - realtime / 2) < Decimal("1e-9")
    assert not client.hgetall(f"llmq:spend:{utc_day()}:held:{user_id}")


def cli(env: dict[str, str], *args: str, stdout: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )


def test_killed_cli_resumes_without_a_new_batch(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
    tmp_path: Path,
) -> None:
    start_worker(isolated=isolated, **batch_env(batches, LLM_BATCH_API_MAX_REQUESTS="15"))
    folder = tmp_path / "docs"
    folder.mkdir()
    for n in range(40):
        (folder / f"doc{n:02d}.txt").write_text(f"Document {n}. " + "Some words here. " * 20)
    out = tmp_path / "out.jsonl"
    args = ["summarize", str(folder), "--batch-api", "--out", str(out), "--user", user_id]
    args += ["--model", "gpt-4o-mini", "--words", "40"]
    env = {**os.environ, **isolated.env}
    batches.hold = True  # every batch stays in progress: the CLI has nothing to write yet
    with (tmp_path / "first.txt").open("wb") as log:
        first = cli(env, *args, stdout=log)
        wait_for(
            lambda: batches.in_progress("openai") == 3 or first.poll() is not None,
            timeout=60,
            what="three provider batches in progress",
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    assert batches.created["openai"] == 3 and (not out.exists() or not out.read_text())

    batches.release()
    with (tmp_path / "second.txt").open("wb") as log:
        second = cli(env, *args, stdout=log)
        assert second.wait(timeout=120) == 0, (tmp_path / "second.txt").read_text()
    # No new provider batch: the re-run waited for the batches the first one made.
    assert batches.created["openai"] == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(str(p) for p in folder.iterdir())
    assert all(r["error"] is None and r["summary"].startswith("Fake") for r in records)
    report = (tmp_path / "second.txt").read_text()
    assert "in real time (Batch API saved)" in report
    assert spent_units(isolated, user_id) == to_units(realtime_price("gpt-4o-mini") * 40 / 2)

    # `llmq batches` shows the three, done, with their cost.
    shown = subprocess.run(
        [sys.executable, "-m", "producer.cli", "batches"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("done/completed") == 3
    # 40 documents in batches of at most 15: counts and each batch's half-price cost.
    assert shown.stdout.count("15+0 failed of 15") == 2 and "10+0 failed of 10" in shown.stdout
    each = realtime_price("gpt-4o-mini") / 2
    assert f"cost ${15 * each:.6f}" in shown.stdout and f"cost ${10 * each:.6f}" in shown.stdout


def test_failed_requests_and_an_expired_batch(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    worker = start_worker(
        isolated=isolated,
        **batch_env(batches, LLM_BATCH_API_MAX_REQUESTS="10", LLM_DAILY_SPEND_ALERT_USD="0.00001"),
    )
    documents = [
        Document(id=f"doc{n:02d}", source=f"doc{n:02d}", text=f"Text {n}. " * 30) for n in range(30)
    ]
    # Batch 1: 3 requests fail. Batch 2: expires after 4 requests ran. Batch 3: fine.
    batches.plan(Outcome(errors=3), Outcome(status="expired", finished=4), Outcome())
    report, records = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == 30
    failed = sorted(
        d for d, r in by_id.items() if r["error"] and "BatchRequestFailed" in r["error"]
    )
    expired = sorted(d for d, r in by_id.items() if r["error"] and "BatchNotRunError" in r["error"])
    assert failed == ["doc00", "doc01", "doc02"]
    assert "fake per-request failure of d000000-l0-p00001" in by_id["doc00"]["error"]
    assert expired == [f"doc{n:02d}" for n in range(14, 20)]
    assert "nothing was charged" in by_id["doc14"]["error"]
    assert report.failed == 9 and report.succeeded == 21
    price = realtime_price("gpt-4o-mini")
    # Only the 21 answers are charged, once each; the failed and expired ones cost nothing.
    assert spent_units(isolated, user_id) == to_units(price * 21 / 2)
    assert all(by_id[d]["cost_usd"] == 0 for d in failed + expired)

    # The same command again submits exactly the 9 documents left, and charges only them.
    again, more = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)
    assert batches.created["openai"] == 4
    assert len(batches.batches[batches.order[-1]].requests) == 9
    retried = {r["id"]: r for r in more}
    assert all(retried[d]["error"] is None for d in failed + expired)
    assert spent_units(isolated, user_id) == to_units(price * 30 / 2)
    assert again.failed == 0
    # The day's spend crossed LLM_DAILY_SPEND_ALERT_USD once: one alert record.
    assert len(worker.records("llm_spend_alert")) == 1


def test_budget_refuses_a_batch_before_creation(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    start_worker(isolated=isolated, **batch_env(batches, LLM_USER_DAILY_BUDGET_USD="0.00001"))
    documents = [
        Document(id=f"doc{n}", source=f"doc{n}", text=f"Text {n}. " * 30) for n in range(20)
    ]
    report, records = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)
    assert batches.created["openai"] == 0 and batches.calls["POST /v1/files"] == 0
    assert report.failed == 20
    error = records[0]["error"]
    assert "DailyBudgetExceededError" in error and "refused before creation" in error
    assert "over the budget of $0.0000100000" in error
    assert "worst-case estimate $" in error
    assert spent_units(isolated, user_id) == 0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_create_whose_answer_was_lost_is_found_not_made_again(
    provider: str,
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    worker = start_worker(isolated=isolated, **batch_env(batches, LLM_BATCH_API_MAX_REQUESTS="5"))
    # The provider makes the first batch but its answer is lost (HTTP 500): the id is
    # unknown, the intent is on record, and the retry must find that batch, not pay twice.
    batches.lose_created = 1
    documents = [
        Document(id=f"doc{n:02d}", source=f"doc{n:02d}", text=f"Text {n}. " * 30) for n in range(12)
    ]
    model = MODELS[provider]
    report, records = run_batch(isolated, documents, model=model, user_id=user_id)
    assert report.failed == 0 and len(records) == 12
    assert batches.created[provider] == 3  # 12 requests in batches of 5, each made once
    assert spent_units(isolated, user_id) == to_units(realtime_price(model) * 12 / 2)
    failures = worker.records("batch_create_failed")
    assert len(failures) == 1 and "HTTP 500" in failures[0]["message"]
    import redis

    client = redis.Redis.from_url(isolated.url, decode_responses=True)
    ids = {row["provider_batch_id"] for row in listing(client)}
    assert ids == set(batches.batches)


def test_cancel_a_batch(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    start_worker(isolated=isolated, **batch_env(batches))
    batches.hold = True
    documents = [
        Document(id=f"doc{n}", source=f"doc{n}", text=f"Text {n}. " * 30) for n in range(5)
    ]
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)

    import threading

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: batches.in_progress("openai") == 1, timeout=30, what="a batch in progress")
    (batch_id,) = batches.batches
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "batches", "cancel", batch_id],
        cwd=ROOT,
        env={**os.environ, **isolated.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cancelling" in done.stdout
    thread.join(60)
    report, records = outcome["result"]
    assert batches.batches[batch_id].state == "cancelled"
    assert report.failed == 5
    assert all("BatchNotRunError" in r["error"] and "canceled" in r["error"] for r in records)
    assert spent_units(isolated, user_id) == 0


def test_batch_endpoints_behind_the_circuit_breaker(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    worker = start_worker(
        isolated=isolated,
        **batch_env(
            batches,
            LLM_BREAKER_FAILURES="2",
            LLM_BREAKER_MIN_CALLS="1000000",
            LLM_BREAKER_COOLDOWN_SECONDS="0.5",
        ),
    )
    batches.fail_retrieves = 3
    documents = [
        Document(id=f"doc{n}", source=f"doc{n}", text=f"Text {n}. " * 30) for n in range(5)
    ]
    report, _ = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)
    assert report.failed == 0 and batches.fail_retrieves == 0
    failures = [r["message"] for r in worker.records("batch_poll_failed")]
    assert sum("HTTP 503" in m for m in failures) == 3
    # Two failures opened the circuit: polls then skipped the provider until the cool-down.
    assert any("circuit is open" in m for m in failures)


def test_batch_endpoints_within_the_provider_request_limit(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    worker = start_worker(
        isolated=isolated,
        **batch_env(
            batches,
            LLM_BATCH_API_MAX_REQUESTS="2",
            LLM_PROVIDER_LIMITS='{"openai": {"rpm": 4}}',
            LLM_PROVIDER_WINDOW_SECONDS="1",
            # Polls as rare as the limit: at 0.1 s they would keep taking every free slot.
            LLM_BATCH_API_POLL_SECONDS="1",
        ),
    )
    documents = [
        Document(id=f"doc{n}", source=f"doc{n}", text=f"Text {n}. " * 30) for n in range(6)
    ]
    report, _ = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)
    assert report.failed == 0 and batches.created["openai"] == 3
    times = sorted(batches.times)
    # 4 requests a second at most: the run's requests are spread over at least
    # len/4 - 1 seconds (an admitted request may arrive late, never early).
    assert len(times) >= 12
    assert times[-1] - times[0] >= len(times) // 4 - 1
    assert any(
        "RateLimitedError" in r["message"] or "rate" in r["message"].lower()
        for r in worker.records("batch_poll_failed", "batch_create_failed")
    )


def test_a_killed_worker_leaves_nothing_behind(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    # Its unacknowledged tasks (the start, the polls waiting out their countdown) are
    # handed out again after the visibility timeout, to the next worker.
    env = batch_env(
        batches,
        LLM_BATCH_API_MAX_REQUESTS="5",
        LLM_VISIBILITY_TIMEOUT="10",
        LLM_JOB_DEADLINE_SECONDS="3",
    )
    first = start_worker(isolated=isolated, **env)
    batches.hold = True
    documents = [
        Document(id=f"doc{n}", source=f"doc{n}", text=f"Text {n}. " * 30) for n in range(10)
    ]
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = run_batch(isolated, documents, model="gpt-4o-mini", user_id=user_id)

    import threading

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: batches.in_progress("openai") == 2, timeout=30, what="two batches")
    first.kill()
    batches.release()
    start_worker(isolated=isolated, **env)
    thread.join(120)
    report, records = outcome["result"]
    assert report.failed == 0 and len(records) == 10
    assert batches.created["openai"] == 2  # polled by the second worker, not made again
    assert spent_units(isolated, user_id) == to_units(realtime_price("gpt-4o-mini") * 10 / 2)


# --- pieces without workers ------------------------------------------------------------


def test_split_by_request_count_and_bytes() -> None:
    from worker.batchapi.clients import AnthropicBatches, OpenAIBatches, split

    client = OpenAIBatches(api_key="sk-test", base_url="http://127.0.0.1:9", timeout=1)
    requests = [
        (f"c{n:03d}", {"model": "m", "messages": [{"content": "x" * 90}]}) for n in range(10)
    ]
    size = len(client.line(*requests[0]))
    by_count = split(requests, client, max_requests=4, max_bytes=10**9)
    assert [len(g) for g in by_count] == [4, 4, 2]
    by_bytes = split(requests, client, max_requests=100, max_bytes=3 * size)
    assert [len(g) for g in by_bytes] == [3, 3, 3, 1]
    assert [c for g in by_bytes for c, _ in g] == [c for c, _ in requests]  # order kept
    anthropic = AnthropicBatches(api_key="sk-ant-test", base_url="http://127.0.0.1:9", timeout=1)
    with pytest.raises(Exception, match="more than a whole batch may hold"):
        split(requests, anthropic, max_requests=100, max_bytes=size // 2)


def test_batch_prices_half_or_the_files_batch_rates(tmp_path: Path) -> None:
    from worker.batchapi.money import batch_cost, worst_case

    usage = Usage(input_tokens=1_000_000, output_tokens=2_000_000)
    price = load_prices().get("gpt-4o-mini")
    assert batch_cost(price, usage) == price.cost(usage) / 2
    assert (
        worst_case(price, input_tokens=10, output_tokens=20)
        == price.cost(Usage(input_tokens=10, output_tokens=20)) / 2
    )
    prices = tmp_path / "prices.toml"
    prices.write_text("[models.gpt-4o-mini]\nbatch_input = 0.1\nbatch_output = 0.25\n")
    custom = load_prices(str(prices)).get("gpt-4o-mini")
    assert batch_cost(custom, usage) == Decimal("0.1") + Decimal("0.5")


def test_cli_batch_api_flag_and_default() -> None:
    from producer.cli import parser

    assert parser().parse_args(["summarize", "x"]).batch_api is None  # LLM_BATCH_API decides
    assert parser().parse_args(["summarize", "x", "--batch-api"]).batch_api is True
    assert parser().parse_args(["summarize", "x", "--no-batch-api"]).batch_api is False
    assert parser().parse_args(["batches", "cancel", "b1"]).batch_id == "b1"


def test_bad_runs_fail_typed_with_no_provider_call(
    batches: FakeBatches,
    isolated: Isolated,
    start_worker: StartWorker,
    user_id: str,
) -> None:
    from worker.errors import ConfigurationError, InvalidJobError

    start_worker(isolated=isolated, **batch_env(batches))
    bad = isolated.app.send_task(
        "llm.batchapi.start",
        kwargs={
            "documents": [{"key": "k", "id": "d", "text": "SECRET-TEXT", "extra": 1}],
            "options": {"user_id": user_id, "words": "40"},
        },
        queue="batch",
    )
    with pytest.raises(InvalidJobError) as raised:
        bad.get(timeout=30)
    message = str(raised.value)
    assert "documents.0.extra" in message and "options.words" in message
    assert "SECRET-TEXT" not in message
    documents = [Document(id="d", source="d", text="Some text. " * 20)]
    # The offline extractive model has no Batch API: refused as a whole, typed.
    with pytest.raises(ConfigurationError, match="needs an OpenAI or Anthropic model"):
        run_batch(isolated, documents, model="extractive", user_id=user_id)
    assert sum(batches.calls.values()) == 0
