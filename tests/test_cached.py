"""Producer-side cache hits: resolved at submit(), with no message sent to the broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals
from celery.result import AsyncResult

from producer import CachedResult, submit
from tests.fakes import FakeProvider
from tests.harness import RedisServer, Worker, wait_for

# Explicit model and max_tokens: the test process and the worker have different defaults
# (LLM_PROVIDER), and a producer only finds what the worker stored for the same request.
OPTIONS: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 64, "temperature": 0}


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Ids of every task this process publishes during the test."""
    sent: list[str] = []

    def count(headers: dict[str, Any] | None = None, **_: Any) -> None:
        sent.append(str((headers or {}).get("id")))

    signals.before_task_publish.connect(count, weak=False)
    yield sent
    signals.before_task_publish.disconnect(count)


def test_hit_returns_resolved_without_a_message(
    worker: Worker,
    fake: FakeProvider,
    user_id: str,
    app: Any,
    redis_server: RedisServer,
    published: list[str],
) -> None:
    messages = [{"role": "user", "content": f"What is a CRDT? [{uuid.uuid4().hex}]"}]
    first = submit(messages, user_id, **OPTIONS)
    assert not isinstance(first, CachedResult)  # a miss is enqueued as usual
    original = first.get(timeout=30)
    assert published == [first.id]
    queued_before = redis_server.client().llen("llm")

    hit = submit(messages, "another-user", **OPTIONS)

    assert isinstance(hit, CachedResult)
    assert published == [first.id]  # nothing more was published
    assert redis_server.client().llen("llm") == queued_before
    assert fake.requests() == 1
    assert hit.ready() and hit.successful() and hit.state == "SUCCESS"
    value = hit.get(timeout=1)
    assert value is hit.result is hit.wait() and hit.traceback is None and not hit.failed()
    assert value["cached"] is True and value["cost_usd"] == 0
    assert value["text"] == original["text"] and hit.id != first.id
    # Whoever holds only the id finds the same result in the backend.
    assert AsyncResult(hit.id, app=app).get(timeout=5) == value


def test_lookup_can_be_turned_off(
    worker: Worker, fake: FakeProvider, user_id: str, published: list[str]
) -> None:
    messages = [{"role": "user", "content": f"What is a CRDT? [{uuid.uuid4().hex}]"}]
    submit(messages, user_id, **OPTIONS).get(timeout=30)
    unchecked = submit(messages, user_id, check_cache=False, **OPTIONS)
    assert not isinstance(unchecked, CachedResult)
    assert len(published) == 2
    assert unchecked.get(timeout=30)["cached"] is True  # the worker's lookup hit instead
    opted_out = submit(messages, user_id, cache=False, **OPTIONS)
    assert not isinstance(opted_out, CachedResult)
    assert opted_out.get(timeout=30)["cached"] is False
    assert fake.requests() == 2


def test_resubmitted_request_id_returns_the_stored_result_unsent(
    worker: Worker, fake: FakeProvider, user_id: str, published: list[str]
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": f"Write a haiku. [{uuid.uuid4().hex}]"}]
    first = submit(messages, user_id, request_id=request_id, temperature=0.9)
    original = first.get(timeout=30)

    retried = submit(messages, user_id, request_id=request_id, temperature=0.9)

    assert isinstance(retried, CachedResult) and retried.id == first.id
    assert retried.get() == original  # the same result, not a cache copy: nothing was reused
    assert published == [first.id] and fake.requests() == 1
    assert original["request_id"] == request_id
    # Another user's request_id is not theirs to read: it runs as a job of its own.
    intruder = submit(messages, "intruder", request_id=request_id, temperature=0.9)
    assert not isinstance(intruder, CachedResult)
    wait_for(lambda: fake.requests() == 2, timeout=30, what="the intruder's own provider call")
