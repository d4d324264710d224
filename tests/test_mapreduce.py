"""Map-reduce of one document on real workers: parts in a chord, reduce, failures as values."""

from __future__ import annotations

import random
from typing import Any

from producer.batch import BatchOptions, BatchRun, Document, Record, Totals
from tests.fakes import FakeProvider, Fault
from tests.harness import Isolated, Worker
from worker import tokens
from worker.chunking import Chunker
from worker.mapreduce import (
    SEPARATOR,
    combine_instruction,
    summarize_instruction,
    summary_max_tokens,
)
from worker.settings import DEFAULT_CHUNK_TOKENS

MARKER = "ZEBRA-QUOKKA-991"


class Collect:
    """A BatchListener that keeps every record."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def started(self, *, total: int, skipped: int) -> None:
        self.total = total

    def finished(self, record: Record, totals: Totals) -> None:
        self.records.append(record)


def summarize(documents: list[Document], *, app: Any = None, **options: Any) -> list[Record]:
    # Calls are counted at the fake: identical reduce inputs must not be served by the cache.
    options.setdefault("cache", False)
    collect = Collect()
    BatchRun(documents=documents, options=BatchOptions(**options), listener=collect, app=app).run()
    return collect.records


def long_text(paragraphs: int, *, words: int = 60, marker: str = "") -> str:
    return "\n\n".join(
        f"Paragraph {i} {marker} " + " ".join(f"word{i}x{j}" for j in range(words)) + "."
        for i in range(paragraphs)
    )


def messages_of(fake: FakeProvider) -> list[tuple[str, str]]:
    """(system, user) of every OpenAI request the fake received."""
    return [
        (seen.body["messages"][0]["content"], seen.body["messages"][-1]["content"])
        for seen in fake.seen
        if seen.api == "openai"
    ]


def test_document_that_fits_is_one_call(worker: Worker, fake: FakeProvider, user_id: str) -> None:
    [record] = summarize(
        [Document(id="short", source="short.txt", text="Celery runs jobs. Redis holds them.")],
        user_id=user_id,
        words=40,
    )

    assert fake.requests() == 1
    body = fake.seen[0].body
    assert body["messages"][0]["content"] == summarize_instruction(40)
    assert body["max_tokens"] == summary_max_tokens(40) and body["temperature"] == 0
    assert record["summary"] == fake.text and record["error"] is None
    assert (record["chunks"], record["levels"], record["calls"]) == (1, 0, 1)
    assert (record["input_tokens"], record["output_tokens"]) == (11, 7)
    assert record["cost_usd"] > 0 and record["provider"] == "openai"


def test_long_document_is_mapped_in_a_chord_and_reduced(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    text = long_text(10, marker=MARKER)
    parts = Chunker.for_model("gpt-4o-mini", budget=200).split(text)
    assert len(parts) > 3

    [record] = summarize(
        [Document(id="long", source="long.txt", text=text)], user_id=user_id, chunk_tokens=200
    )

    n = len(parts)
    assert record["error"] is None and record["summary"] == fake.text
    assert (record["chunks"], record["levels"], record["calls"]) == (n, 1, n + 1)
    assert fake.requests("openai") == n + 1
    assert (record["input_tokens"], record["output_tokens"]) == (11 * (n + 1), 7 * (n + 1))
    sent = messages_of(fake)
    part_requests = sorted(user for system, user in sent if system.startswith("This is part"))
    assert part_requests == sorted(parts)
    assert sum(f"part {i} of {n}" in system for i in range(1, n + 1) for system, _ in sent) == n
    reduce_requests = [user for system, user in sent if system == combine_instruction(60)]
    assert reduce_requests == [SEPARATOR.join([fake.text] * n)]
    # The document's text never reaches the worker's log, not even in task reprs.
    assert MARKER not in worker.output()


def test_failed_part_fails_the_document_without_killing_the_chord(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    text = long_text(8)
    n = len(Chunker.for_model("gpt-4o-mini", budget=200).split(text))
    # One part's call fails at the primary and at the fallback; the others succeed.
    fake.script("openai", Fault(status=400))
    fake.script("anthropic", Fault(status=400))

    [record] = summarize(
        [Document(id="doomed", source="doomed.txt", text=text)],
        user_id=user_id,
        chunk_tokens=200,
    )

    assert record["summary"] is None
    assert record["error"].startswith(f"1 of {n} parts failed")
    assert "AllProvidersFailedError" in record["error"]
    # No reduce call was made; the parts that succeeded are still accounted for.
    assert fake.requests("openai") == n and fake.requests("anthropic") == 1
    assert all(system != combine_instruction(60) for system, _ in messages_of(fake))
    assert record["calls"] == n - 1 and record["input_tokens"] == 11 * (n - 1)
    assert record["chunks"] == n


def test_summaries_still_too_long_are_reduced_again(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.text = "A long partial summary. " * 12  # ~60 tokens: two fit a 150-token group
    chunker = Chunker.for_model("gpt-4o-mini", budget=150)
    text = long_text(8, words=50)
    n = len(chunker.split(text))
    # What the reduction should do, level by level, by the chunker's own arithmetic.
    calls, levels, width = n, 0, n
    while True:
        levels += 1
        combined = SEPARATOR.join([fake.text] * width)
        if chunker.fits(combined):
            calls += 1
            break
        width = len(chunker.split(combined))
        calls += width
    assert levels >= 3

    [record] = summarize(
        [Document(id="deep", source="deep.txt", text=text)], user_id=user_id, chunk_tokens=150
    )

    assert record["error"] is None and record["summary"] == fake.text
    assert (record["chunks"], record["levels"], record["calls"]) == (n, levels, calls)
    assert fake.requests("openai") == calls
    assert record["input_tokens"] == 11 * calls


def test_bad_batch_job_is_an_error_value_not_a_crash(
    worker: Worker, fake: FakeProvider, app: Any, user_id: str
) -> None:
    job = {
        "document_id": "bad",
        "text": "Some text.",
        "words": 0,
        "user_id": user_id,
        "request_id": "batch-bad",
    }
    result = app.send_task("llm.batch.summarize", kwargs=job).get(timeout=30)
    assert result["summary"] is None
    assert "words" in result["error"] and "InvalidJobError" in result["error"]
    unknown = app.send_task(
        "llm.batch.summarize", kwargs={**job, "words": 50, "model": "gpt-17-ultra"}
    ).get(timeout=30)
    assert "Unknown model 'gpt-17-ultra'" in unknown["error"]
    assert fake.requests() == 0
    assert worker.process.poll() is None


def large_document(size: int = 900_000) -> str:
    """About `size` characters of varied English-like prose (~200k tokens for 900 KB)."""
    rng = random.Random(900)
    words = [
        "otter",
        "river",
        "stone",
        "current",
        "shell",
        "kelp",
        "tide",
        "harbour",
        "fisher",
        "morning",
        "quiet",
        "swift",
        "silver",
        "north",
        "under",
        "across",
    ]
    paragraphs, total = [], 0
    while total < size:
        sentences = [
            " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(12)).capitalize()
            + "."
            for _ in range(6)
        ]
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def test_a_document_over_the_token_allowance_is_refused_before_any_call(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    text = large_document()
    [record] = summarize([Document(id="big", source="big.txt", text=text)], user_id=user_id)
    assert fake.requests() == 0
    error = record["error"]
    assert error.startswith("DocumentTooLargeError")
    assert "LLM_USER_TOKENS_PER_HOUR" in error and "100000" in error
    needed = int(error.split("needs up to ")[1].split(" tokens")[0])
    assert needed > tokens.count_text(text)  # every chunk's prompt and output on top


def test_a_large_document_summarizes_in_default_sized_chunks(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(isolated=isolated, LLM_USER_TOKENS_PER_HOUR="2000000")
    text = large_document()
    [record] = summarize(
        [Document(id="big", source="big.txt", text=text)], user_id=user_id, app=isolated.app
    )
    assert record["error"] is None and record["summary"] == fake.text
    sizes = record["chunk_sizes"]
    assert record["chunks"] == len(sizes) > 50
    # The documented default chunk size, and every chunk of the text accounted for.
    assert max(sizes) <= DEFAULT_CHUNK_TOKENS and min(sizes) > 0
    assert sum(sizes) >= tokens.count_text(text) * 0.99
    assert record["calls"] == fake.requests() > len(sizes)
