"""A request_id is bound to its first request and to its user; task ids are never shared."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery.result import AsyncResult

from producer import submit
from producer.batch import BatchOptions, BatchRun, Document
from tests.fakes import FakeProvider
from tests.harness import Isolated, Worker, wait_for
from worker.errors import IdempotencyConflictError
from worker.idempotency import task_id_for
from worker.mapreduce import Summarizer, SummaryJob
from worker.models import CompletionJob
from worker.pipeline import Pipeline
from worker.settings import load_settings


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_same_id_same_request_replays_different_request_conflicts(
    worker: Worker, fake: FakeProvider, user_id: str, app: Any
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    first = submit(ask("What is a CRDT?"), user_id, request_id=request_id, cache=False)
    original = first.get(timeout=30)
    assert fake.requests() == 1
    # The same request again, even straight to a worker: the stored answer, no call.
    again = submit(
        ask("What is a CRDT?"), user_id, request_id=request_id, cache=False, check_cache=False
    )
    assert again.get(timeout=30) == original and again.id == first.id
    # Other messages, or another model, under the same id: refused, nothing called.
    for changed in (
        {"messages": ask("What is a B-tree?")},
        {"messages": ask("What is a CRDT?"), "max_tokens": 99},
    ):
        messages = changed.pop("messages")
        other = submit(messages, user_id, request_id=request_id, cache=False, **changed)
        with pytest.raises(IdempotencyConflictError) as raised:
            other.get(timeout=30)
        assert "first used for a different request" in str(raised.value)
        assert "CRDT" not in str(raised.value) and "B-tree" not in str(raised.value)
        assert other.id != first.id  # the first job's stored result is untouched
    assert fake.requests() == 1
    assert AsyncResult(first.id, app=app).get(timeout=5) == original


def test_another_users_request_id_is_not_theirs(
    worker: Worker, fake: FakeProvider, user_id: str, app: Any
) -> None:
    victim, attacker = user_id, f"{user_id}-b"
    request_id = f"shared-{uuid.uuid4().hex[:8]}"
    fake.text = "Answer for A."
    a = submit(ask("A's question"), victim, request_id=request_id, cache=False)
    assert a.get(timeout=30)["text"] == "Answer for A."
    fake.text = "Answer for B."
    # Through submit(): B's id is B's own job; B gets B's answer, A's stays A's.
    b = submit(ask("A's question"), attacker, request_id=request_id, cache=False)
    assert b.id != a.id and b.get(timeout=30)["text"] == "Answer for B."
    # Through a plain Celery producer (its own random task ids), the same.
    plain = app.send_task(
        "llm.complete",
        kwargs={
            "messages": ask("A's question"),
            "user_id": attacker,
            "request_id": request_id,
            "cache": False,
        },
    )
    assert plain.get(timeout=30)["text"] == "Answer for B."
    # A plain producer that reuses A's task id cannot overwrite what A receives: the
    # worker refuses to run another user's job under it, and stores nothing.
    calls = fake.requests()
    reused = app.send_task(
        "llm.complete",
        kwargs={"messages": ask("poison"), "user_id": attacker, "request_id": "x", "cache": False},
        task_id=a.id,
    )
    wait_for(
        lambda: any(
            r.get("task_id") == reused.id and r.get("error_kind") == "TaskIdConflictError"
            for r in worker.records("llm_job")
        ),
        timeout=30,
        what="the refused job's record",
    )
    assert fake.requests() == calls
    assert AsyncResult(a.id, app=app).get(timeout=5)["text"] == "Answer for A."
    again = submit(ask("A's question"), victim, request_id=request_id, cache=False)
    assert again.get(timeout=5)["text"] == "Answer for A."


def test_task_ids_are_derived_per_user_and_request() -> None:
    def job(**fields: Any) -> CompletionJob:
        return CompletionJob.model_validate(
            {"messages": ask("hi"), "user_id": "u", "request_id": "r", **fields}
        )

    assert task_id_for(job()) == task_id_for(job())
    assert task_id_for(job()) != task_id_for(job(user_id="v"))
    assert task_id_for(job()) != task_id_for(job(max_tokens=5))
    assert task_id_for(job()) != "r"
    # How a job waits for a limit or the cache does not change what it asks.
    assert task_id_for(job()) == task_id_for(job(on_limit="defer", cache=False))


def test_batch_call_ids_follow_the_configuration() -> None:
    def call_id(**env: Any) -> str:
        pipeline = Pipeline(load_settings(OPENAI_API_KEY="k", **env))
        summarizer = Summarizer(pipeline, lambda job: pytest.fail("no call"))
        job = SummaryJob(document_id="d", words=60, user_id="u", request_id="batch-1")
        return summarizer.call_id(job, "-L0-P1")

    base = call_id(LLM_PROVIDER="extractive")
    assert base == call_id(LLM_PROVIDER="extractive")  # stable: a resumed run replays
    assert base != call_id(LLM_PROVIDER="openai")
    assert base != call_id(LLM_PROVIDER="extractive", LLM_CACHE_VERSION="2")


def test_a_new_configuration_summarizes_afresh(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    document = Document(id="doc", source="doc", text="Otters sleep holding hands. " * 20)

    def summarize(**env: str) -> str | None:
        worker = start_worker(isolated=isolated, LLM_FALLBACKS="", **env)
        try:
            report = BatchRun(
                documents=[document],
                options=BatchOptions(user_id=user_id, cache=False),
                app=isolated.app,
            )
            records: list[dict[str, Any]] = []
            report.listener = type(
                "Listen",
                (),
                {"started": lambda *a, **k: None, "finished": lambda s, r, t: records.append(r)},
            )()
            report.run()
            return records[0]["summary"]
        finally:
            worker.stop()

    offline = summarize(LLM_PROVIDER="extractive")
    assert offline and offline != fake.text and fake.requests() == 0
    assert summarize(LLM_PROVIDER="openai") == fake.text
    assert fake.requests() == 1
    assert summarize(LLM_PROVIDER="openai") == fake.text and fake.requests() == 1  # replayed
    assert summarize(LLM_PROVIDER="openai", LLM_CACHE_VERSION="2") == fake.text
    assert fake.requests() == 2  # a new cache version, with --no-cache: afresh
