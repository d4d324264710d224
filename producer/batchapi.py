"""`llmq summarize --batch-api`, producer side: hand the documents to a run, await results.

The CLI holds no state of its own: it sends one `llm.batchapi.start` task with the
documents, and the workers claim them, create the provider batches and poll them (see
`worker.batchapi.runner`). The CLI then reads each document's result from Redis as it
lands. A killed CLI loses nothing: the same command again sends the same documents, the
workers answer that an earlier run already owns them, and the CLI waits for that run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from worker.constants import BATCH_QUEUE
from worker.keyspace import BatchRunKeys, digest

START_TASK = "llm.batchapi.start"
Record = dict[str, Any]


def document_key(content_hash: str, *, user_id: str, chunk_tokens: int | None) -> str:
    """What identifies a document's batch summary: content, provider, model, words, user."""
    return digest("batchapi", user_id, content_hash, chunk_tokens)


def start(
    app: Celery,
    documents: Sequence[tuple[str, str, str]],
    *,
    options: dict[str, Any],
    timeout: float,
) -> dict[str, str]:
    """Send the run's documents (key, id, text); returns the run that owns each key."""
    payload = [{"key": key, "id": doc_id, "text": text} for key, doc_id, text in documents]
    result = app.send_task(
        START_TASK, kwargs={"documents": payload, "options": options}, queue=BATCH_QUEUE
    )
    answer = result.get(timeout=timeout)
    owners: dict[str, str] = answer["owners"]
    return owners


def await_results(
    app: Celery,
    owners: dict[str, str],
    *,
    on_result: Callable[[str, Record], None],
    stopping: Callable[[], bool],
    poll_interval: float,
    deadline: float | None,
) -> set[str]:
    """Hand each document's result to `on_result` as it lands; returns the keys still pending."""
    client = app.backend.client
    pending = dict(owners)
    while pending and not stopping():
        by_run: dict[str, list[str]] = {}
        for key, run in pending.items():
            by_run.setdefault(run, []).append(key)
        for run, keys in by_run.items():
            found = client.hmget(BatchRunKeys(run_id=run).results, keys)
            for key, raw in zip(keys, found, strict=True):
                if raw is not None:
                    pending.pop(key)
                    on_result(key, json.loads(raw))
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll_interval)
    return set(pending)
