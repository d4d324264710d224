"""`llmq summarize` end to end: inputs, resume, report, the batch queue, a real corpus."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from producer import submit
from producer.batch import (
    BatchOptions,
    BatchRun,
    Document,
    Record,
    Report,
    ResultsFile,
    Totals,
    content_hash,
    find_documents,
    percentile,
    resolved_model,
)
from tests import corpus
from tests.conftest import StartWorker
from tests.fakes import FakeProvider
from tests.harness import ROOT, RedisServer, wait_for
from worker import tokens
from worker.chunking import Chunker
from worker.mapreduce import SEPARATOR, combine_instruction

# Low enough that dozens of the corpus documents are split into several parts.
CHUNK_TOKENS = 2000
# A smaller batch: the installed distributions' READMEs (Markdown, rST, unicode).
READMES = "dist-*"


def lines(path: Path) -> list[Record]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def cli(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """`llmq` in a subprocess, against the test Redis, with no terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )


# --- inputs, resume file, report: no workers needed ------------------------------------


def test_inputs_files_directories_globs_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Alpha text.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Beta text.")
    (tmp_path / "sub" / "c.rst").write_text("Gamma text.")
    (tmp_path / "sub" / "ignored.py").write_text("print('not a document')")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "j1", "text": "Json one."}\n'
        "\n"
        "{not json\n"
        '{"id": 7, "text": "Json seven."}\n'
        '{"id": "j4"}\n'
        '["a", "list"]\n'
        '{"id": "j6", "text": "   "}\n'
    )
    (tmp_path / "e.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (tmp_path / "f.rst").write_text("  \n")
    (tmp_path / "g.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")

    found = find_documents(
        [str(tmp_path / "sub"), str(tmp_path / "*.txt"), str(tmp_path / "d.jsonl")]
    )
    found += find_documents([str(tmp_path / "missing.txt"), str(tmp_path / "*.none")])
    by_id = {d.id: d for d in found}

    good = {d.id: d.text for d in found if d.error is None}
    assert good == {
        str(tmp_path / "sub" / "b.md"): "Beta text.",
        str(tmp_path / "sub" / "c.rst"): "Gamma text.",
        str(tmp_path / "a.txt"): "Alpha text.",
        "j1": "Json one.",
        "7": "Json seven.",
    }
    errors = {d.id: d.error or "" for d in found if d.error is not None}
    assert "Invalid JSON on line 3" in errors[f"{tmp_path / 'd.jsonl'}:3"]
    assert "no 'text'" in errors["j4"]
    assert "JSON list" in errors[f"{tmp_path / 'd.jsonl'}:6"]
    assert "empty 'text'" in errors["j6"]
    assert "Binary file" in errors[str(tmp_path / "e.txt")]
    assert "Not UTF-8" in errors[str(tmp_path / "g.txt")]
    assert "Cannot read" in errors[str(tmp_path / "dangling.txt")]
    assert "No such file" in errors[str(tmp_path / "missing.txt")]
    assert "No file matches" in errors[str(tmp_path / "*.none")]
    assert by_id["7"].source == f"{tmp_path / 'd.jsonl'}:4"
    # Directories are read recursively but only for text formats; a glob matches what it says.
    assert not any("ignored.py" in i for i in by_id)
    assert str(tmp_path / "f.rst") not in by_id
    assert "Empty file" in (find_documents([str(tmp_path / "f.rst")])[0].error or "")


def test_content_hash_covers_text_model_and_words() -> None:
    base = content_hash("text", model=None, words=60)
    assert base == content_hash("text", model=None, words=60)
    assert len({base, content_hash("text!", model=None, words=60)}) == 2
    assert base != content_hash("text", model="gpt-4o", words=60)
    assert base != content_hash("text", model=None, words=61)


def test_results_file_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    ok = {"id": "a", "hash": "h1", "summary": "S", "error": None}
    failed = {"id": "b", "hash": "h2", "summary": None, "error": "boom"}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(failed) + "\n" + '{"id": "c", "hash"')

    results = ResultsFile(path)
    assert set(results.summarized()) == {"h1"}  # failures are retried, torn lines ignored
    with results:
        results.append({"id": "c", "hash": "h3", "summary": "T", "error": None})
    assert set(results.summarized()) == {"h1", "h3"}
    assert path.read_text().splitlines()[-1] == json.dumps(
        {"id": "c", "hash": "h3", "summary": "T", "error": None}
    )


def test_report_sums_records_and_percentiles() -> None:
    records = [
        {"chunks": 1, "input_tokens": 10, "output_tokens": 2, "cost_usd": 0.5, "latency_ms": 100},
        {"chunks": 3, "input_tokens": 30, "output_tokens": 4, "cost_usd": 0.25, "latency_ms": 300},
        {"chunks": 0, "error": "bad", "latency_ms": 0.0},
    ]
    report = Report.of(records, skipped=1, not_run=0, wall_time_s=1.5, interrupted=False)
    assert (report.documents, report.succeeded, report.failed, report.skipped) == (3, 2, 1, 1)
    assert (report.chunks, report.input_tokens, report.output_tokens) == (4, 40, 6)
    assert report.cost_usd == 0.75
    assert report.latency_p50_ms == 100.0
    assert percentile([float(i) for i in range(1, 101)], 95) == pytest.approx(95.05)
    assert percentile([], 50) is None and percentile([7.0], 95) == 7.0


# --- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_chunks(corpus_dir: Path) -> dict[str, list[str]]:
    """Each document's chunks at CHUNK_TOKENS, by the chunker, each checked with tiktoken."""
    tokens.install_offline_encodings()
    encoding = tiktoken.get_encoding("o200k_base")
    chunker = Chunker.for_model("gpt-4o-mini", budget=CHUNK_TOKENS)
    expected: dict[str, list[str]] = {}
    for document in find_documents([str(corpus_dir)]):
        chunks = chunker.split(document.text)
        size = len(encoding.encode(document.text.strip(), disallowed_special=()))
        assert all(len(encoding.encode(c, disallowed_special=())) <= CHUNK_TOKENS for c in chunks)
        assert (len(chunks) > 1) == (size > CHUNK_TOKENS)
        assert len(chunks) >= math.ceil(size / CHUNK_TOKENS)
        expected[document.id] = chunks
    assert len(expected) == len(corpus.documents()) >= 300
    return expected


def calls_for(chunks: list[str]) -> int:
    """Provider calls a document takes: one, or one per part plus one reduce."""
    return 1 if len(chunks) == 1 else len(chunks) + 1


def test_corpus_interrupted_then_resumed(
    start_worker: StartWorker,
    fake: FakeProvider,
    user_id: str,
    tmp_path: Path,
    corpus_dir: Path,
    corpus_chunks: dict[str, list[str]],
) -> None:
    total = len(corpus_chunks)
    half = total // 2
    start_worker(concurrency=24, queues="batch")
    out = tmp_path / "results.jsonl"
    args = ["summarize", str(corpus_dir), "--out", str(out), "--user", user_id, "--no-cache"]
    args += ["--chunk-tokens", str(CHUNK_TOKENS), "--concurrency", "24"]

    # Run 1: the CLI, interrupted (SIGINT, as Ctrl-C) once about half the documents are done.
    with (tmp_path / "run1.txt").open("wb") as log:
        first = cli(*args, stdout=log)
        wait_for(
            lambda: count_lines(out) >= half or first.poll() is not None,
            timeout=240,
            what=f"{half} documents summarized",
        )
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130, (tmp_path / "run1.txt").read_text()
    output = (tmp_path / "run1.txt").read_text()
    assert "stopping: finishing the documents in flight" in output
    assert "\x1b[" not in output  # no progress bar or colours in a file
    after_first = lines(out)  # every line is whole JSON: json.loads would raise otherwise
    finished = {r["id"] for r in after_first}
    assert half <= len(after_first) < total and len(finished) == len(after_first)
    assert all(r["error"] is None for r in after_first)
    # In-flight documents were drained, not abandoned: every call made is on record.
    requests_first = fake.requests()
    assert requests_first == sum(calls_for(corpus_chunks[i]) for i in finished)
    seen_first = len(fake.seen)

    # Run 2: the same job again; it skips what run 1 finished.
    report = BatchRun(
        documents=find_documents([str(corpus_dir)]),
        options=BatchOptions(
            user_id=user_id, cache=False, chunk_tokens=CHUNK_TOKENS, concurrency=24
        ),
        out=out,
    ).run()

    rest = set(corpus_chunks) - finished
    assert fake.requests() - requests_first == sum(calls_for(corpus_chunks[i]) for i in rest)
    owner = {chunk: doc for doc, chunks in corpus_chunks.items() for chunk in chunks}
    resent = {owner.get(s.body["messages"][-1]["content"]) for s in fake.seen[seen_first:]}
    assert not resent & finished, "a document finished in run 1 was summarized again"

    # Every document has exactly one line and a summary.
    records = lines(out)
    by_id = {r["id"]: r for r in records}
    assert len(records) == len(by_id) == total and set(by_id) == set(corpus_chunks)
    assert all(r["summary"] == fake.text and r["error"] is None for r in records)
    # Documents over the budget were chunked as the chunker says, and reduced once.
    chunked = {i for i, chunks in corpus_chunks.items() if len(chunks) > 1}
    assert len(chunked) >= 50
    for doc_id, record in by_id.items():
        chunks = corpus_chunks[doc_id]
        assert record["chunks"] == len(chunks), doc_id
        assert record["calls"] == calls_for(chunks), doc_id
        assert record["levels"] == (1 if doc_id in chunked else 0), doc_id
        assert record["input_tokens"] == 11 * record["calls"]  # the fake's usage per call
        provider, model = resolved_model(None)
        assert record["hash"] == content_hash(
            (corpus_dir / Path(doc_id).name).read_text(), model=model, words=60, provider=provider
        )
    reduces = Counter(
        s.body["messages"][-1]["content"].count(fake.text)
        for s in fake.seen
        if s.body["messages"][0]["content"] == combine_instruction(60)
    )
    assert reduces == Counter(len(corpus_chunks[i]) for i in chunked)
    assert all(SEPARATOR.join([fake.text] * n).count(fake.text) == n for n in reduces)
    # Each document was summarized exactly once over both runs.
    assert fake.requests() == sum(r["calls"] for r in records)

    # The report's totals are the sums over the output lines.
    assert report.documents == total and report.failed == 0 and report.not_run == 0
    assert report.skipped == len(finished) and report.succeeded == total
    assert report.chunks == sum(r["chunks"] for r in records)
    assert report.input_tokens == sum(r["input_tokens"] for r in records)
    assert report.output_tokens == sum(r["output_tokens"] for r in records)
    assert report.cost_usd == pytest.approx(sum(r["cost_usd"] for r in records), abs=1e-9)
    assert report.latency_p50_ms is not None and report.latency_p95_ms is not None
    assert 0 < report.latency_p50_ms <= report.latency_p95_ms


def test_killed_producer_loses_no_finished_document(
    start_worker: StartWorker,
    fake: FakeProvider,
    app: Any,
    redis_server: RedisServer,
    user_id: str,
    tmp_path: Path,
    corpus_dir: Path,
) -> None:
    batch_worker = start_worker(concurrency=16, queues="batch")
    out = tmp_path / "results.jsonl"
    pattern = str(corpus_dir / READMES)
    args = [
        "summarize",
        pattern,
        "--out",
        str(out),
        "--user",
        user_id,
        "--chunk-tokens",
        "3000",
        "--no-cache",
    ]

    crashed = cli(*args, stdout=subprocess.DEVNULL)
    wait_for(lambda: count_lines(out) >= 20, timeout=120, what="20 documents summarized")
    crashed.kill()  # SIGKILL: no handler runs, nothing is flushed on the way out
    crashed.wait(timeout=30)
    survived = lines(out)  # each line on disk is whole JSON
    finished = {r["id"] for r in survived}
    assert len(survived) >= 20 and all(r["summary"] == fake.text for r in survived)

    # The dead producer's documents in flight still run; let them finish, unrecorded.
    redis = redis_server.client()

    def idle() -> bool:
        inspect = app.control.inspect(destination=[batch_worker.name], timeout=1)
        busy = [*(inspect.active() or {}).values(), *(inspect.reserved() or {}).values()]
        return not any(busy) and redis.llen("batch") == 0

    wait_for(lambda: idle() and idle(), timeout=60, what="the batch worker to go idle")
    requests_before = fake.requests()
    seen_before = len(fake.seen)

    documents = find_documents([pattern])
    report = BatchRun(
        documents=documents,
        options=BatchOptions(user_id=user_id, cache=False, chunk_tokens=3000, concurrency=16),
        out=out,
    ).run()

    chunker = Chunker.for_model("gpt-4o-mini", budget=3000)
    chunks = {d.id: chunker.split(d.text) for d in documents}
    owner = {chunk: doc for doc, parts in chunks.items() for chunk in parts}
    resent = {owner.get(s.body["messages"][-1]["content"]) for s in fake.seen[seen_before:]}
    assert not resent & finished, "a document saved before the crash was summarized again"
    rest = set(chunks) - finished
    # Documents the dead producer had in flight were finished by the worker, unrecorded;
    # their calls carry stable request ids, so the re-run replays them without paying again.
    earlier = {owner.get(s.body["messages"][-1]["content"]) for s in fake.seen[:seen_before]}
    orphans = rest & earlier
    assert fake.requests() - requests_before == sum(calls_for(chunks[i]) for i in rest - orphans)
    by_id = {r["id"]: r for r in lines(out)}
    assert len(by_id) == len(lines(out)) == len(documents) >= 50
    assert all(r["summary"] == fake.text for r in by_id.values())
    assert (
        report.skipped == len(finished)
        and report.documents == len(documents)
        and report.failed == 0
    )


def test_interactive_job_is_not_starved_by_a_batch(
    start_worker: StartWorker,
    fake: FakeProvider,
    user_id: str,
    tmp_path: Path,
    corpus_dir: Path,
    redis_server: RedisServer,
) -> None:
    # A small batch worker facing a big backlog, and an interactive worker on `llm` only.
    start_worker(concurrency=4, queues="batch")
    start_worker(concurrency=2, queues="llm")
    out = tmp_path / "batch.jsonl"
    documents = find_documents([str(corpus_dir / READMES)])
    run = BatchRun(
        documents=documents,
        options=BatchOptions(user_id=user_id, cache=False, chunk_tokens=1500, concurrency=24),
        out=out,
    )
    runner = threading.Thread(target=run.run)
    runner.start()
    try:
        redis = redis_server.client()
        wait_for(
            lambda: count_lines(out) >= 5 and redis.llen("batch") > 0,
            timeout=120,
            what="a batch under way with a backlog",
        )
        backlog = redis.llen("batch")
        result = submit([{"role": "user", "content": "Quick question?"}], user_id).get(timeout=30)
        done_by_then = count_lines(out)
    finally:
        run.stop()
        runner.join(timeout=120)
    assert not runner.is_alive()
    assert backlog > 0 and done_by_then < len(documents)
    assert result["text"] == fake.text
    # Reported, and small: the interactive queue had no backlog of its own.
    assert result["queue_wait_ms"] is not None
    assert result["queue_wait_ms"] < 5_000


def test_malformed_inputs_are_per_document_errors(
    start_worker: StartWorker, fake: FakeProvider, user_id: str, tmp_path: Path
) -> None:
    start_worker(concurrency=4, queues="llm,batch")
    docs = tmp_path / "docs"
    (docs / "nested").mkdir(parents=True)
    (docs / "good.txt").write_text("A good plain document about queues.")
    (docs / "nested" / "good.md").write_text("# Title\n\nA good markdown document.")
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (docs / "empty.rst").write_text("")
    (docs / "items.jsonl").write_text(
        '{"id": "item-1", "text": "First item text."}\n'
        "this line is not JSON\n"
        '{"id": "item-3", "text": "Third item text."}\n'
    )
    out = tmp_path / "out.jsonl"
    args = ["summarize", str(docs), "--out", str(out), "--user", user_id, "--words", "30"]

    done = cli(*args)
    stdout, _ = done.communicate(timeout=120)
    text = stdout.decode()

    assert done.returncode == 1, text  # some documents failed
    by_id = {r["id"]: r for r in lines(out)}
    errors = {i: r["error"] for i, r in by_id.items() if r["error"]}
    assert set(errors) == {
        str(docs / "image.txt"),
        str(docs / "empty.rst"),
        f"{docs / 'items.jsonl'}:2",
    }
    assert "Binary file" in errors[str(docs / "image.txt")]
    assert "Empty file" in errors[str(docs / "empty.rst")]
    assert "Invalid JSON on line 2" in errors[f"{docs / 'items.jsonl'}:2"]
    summarized = {i for i, r in by_id.items() if r["summary"] == fake.text}
    assert summarized == {
        str(docs / "good.txt"),
        str(docs / "nested" / "good.md"),
        "item-1",
        "item-3",
    }
    assert fake.requests() == 4
    assert "llmq summarize report" in text and "FAILED: Binary file" in text
    assert "provider=openai model=gpt-4o-mini chunks=1" in text
    assert "\x1b[" not in text

    # Re-run: the four summaries are skipped, the three bad inputs are reported again.
    again = cli(*args)
    stdout, _ = again.communicate(timeout=120)
    assert again.returncode == 1
    assert "skipping 4 documents already summarized" in stdout.decode()
    assert fake.requests() == 4
    assert len(lines(out)) == 7 + 3


def test_listener_sees_running_totals(
    start_worker: StartWorker, fake: FakeProvider, user_id: str
) -> None:
    start_worker(concurrency=4, queues="llm,batch")
    seen: list[tuple[int, int, float]] = []
    starts: list[tuple[int, int]] = []

    class Listener:
        def started(self, *, total: int, skipped: int) -> None:
            starts.append((total, skipped))

        def finished(self, record: Record, totals: Totals) -> None:
            seen.append((totals.done, totals.input_tokens, totals.cost_usd))

    documents = [Document(id=f"d{i}", source="mem", text=f"Document {i}.") for i in range(5)]
    documents.append(Document(id="bad", source="mem", error="Empty file: nothing to summarize."))
    report = BatchRun(
        documents=documents,
        options=BatchOptions(user_id=user_id, cache=False, concurrency=2),
        listener=Listener(),
    ).run()

    assert starts == [(6, 0)]
    assert [done for done, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1][1] == 5 * 11 and seen[-1][2] == pytest.approx(report.cost_usd)
    assert report.failed == 1 and report.succeeded == 5
