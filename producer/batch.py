"""Batch summarization, producer side: read inputs, skip finished work, submit, record, report.

Each document goes to the workers as one `llm.batch.summarize` task on the `batch`
queue; at most `concurrency` documents are in flight. A long document's task answers
`{"continue": <id>}` (it started a chord, see `worker.mapreduce`), and the run follows
that id until the document's final result. Every finished document is appended to the
output file at once (flushed and fsynced), so an interrupted run loses no finished work,
and a re-run skips each document whose content hash already has a summary there.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

import redis
from celery import Celery

from worker.deferrals import Deferral, DeferralLog, Waiting, waiting

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIX = ".jsonl"
GLOB_CHARS = frozenset("*?[")
TASK = "llm.batch.summarize"

Record = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Document:
    """One input document: its text, or why it could not be read."""

    id: str
    source: str
    text: str = ""
    error: str | None = None


def find_documents(paths: Sequence[str]) -> list[Document]:
    """Every document named by `paths`: files, directories (recursive), globs, JSONL files."""
    documents: list[Document] = []
    for raw in paths:
        if GLOB_CHARS & set(raw) and not Path(raw).exists():
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                documents.append(Document(id=raw, source=raw, error="No file matches this path."))
            for match in matches:
                documents.extend(_from_path(Path(match)))
        else:
            documents.extend(_from_path(Path(raw)))
    return documents


def _from_path(path: Path) -> Iterator[Document]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.suffix.lower() in (*TEXT_SUFFIXES, JSONL_SUFFIX) and not child.is_dir():
                yield from _read(child)
    elif path.exists() or path.is_symlink():
        yield from _read(path)
    else:
        yield Document(id=str(path), source=str(path), error="No such file or directory.")


def _read(path: Path) -> Iterator[Document]:
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield Document(id=name, source=name, error=f"Cannot read the file: {exc.strerror}.")
        return
    if b"\x00" in data:
        yield Document(
            id=name,
            source=name,
            error=f"Binary file ({len(data)} bytes with NUL bytes); only UTF-8 text "
            f"({', '.join(TEXT_SUFFIXES)}, {JSONL_SUFFIX}) is summarized.",
        )
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield Document(
            id=name,
            source=name,
            error=f"Not UTF-8 text (invalid byte at offset {exc.start}). Fix: convert it to UTF-8.",
        )
        return
    if path.suffix.lower() == JSONL_SUFFIX:
        yield from _jsonl(name, text)
    elif not text.strip():
        yield Document(id=name, source=name, error="Empty file: nothing to summarize.")
    else:
        yield Document(id=name, source=name, text=text)


def _jsonl(name: str, text: str) -> Iterator[Document]:
    """One document per line `{"id": ..., "text": ...}`; a bad line is that line's error."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{name}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            yield Document(id=source, source=source, error=f"Invalid JSON on line {number}: {exc}.")
            continue
        if not isinstance(item, dict):
            yield Document(
                id=source,
                source=source,
                error=f'Line {number} is a JSON {type(item).__name__}, not {{"id", "text"}}.',
            )
            continue
        raw_id, body = item.get("id"), item.get("text")
        doc_id = str(raw_id) if isinstance(raw_id, (str, int)) and str(raw_id) else source
        if not isinstance(body, str) or not body.strip():
            problem = "has no 'text' string" if not isinstance(body, str) else "has empty 'text'"
            yield Document(id=doc_id, source=source, error=f"Line {number} {problem}.")
            continue
        yield Document(id=doc_id, source=source, text=body)


def content_hash(text: str, *, model: str | None, words: int, provider: str = "") -> str:
    """sha256 of what decides a summary: the text, the provider and model, the length."""
    canonical = json.dumps(
        {"text": text, "model": model or "", "words": words, "provider": provider},
        sort_keys=True,
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def resolved_model(model: str | None) -> tuple[str, str]:
    """The (provider, model) this configuration sends a batch's calls to."""
    from worker.settings import get_settings

    settings = get_settings()
    return settings.provider, model or settings.model_for(settings.provider)


class ResultsFile:
    """The JSONL output: one line per finished document, each durable once written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def summarized(self) -> dict[str, Record]:
        """Records with a summary, by content hash; unparsable lines (a torn write) are skipped."""
        found: dict[str, Record] = {}
        if not self.path.exists():
            return found
        with self.path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if (
                    isinstance(record, dict)
                    and isinstance(record.get("hash"), str)
                    and isinstance(record.get("summary"), str)
                    and record.get("error") is None
                ):
                    found[record["hash"]] = record
        return found

    def __enter__(self) -> ResultsFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash mid-write can leave a torn last line; start ours on a fresh one.
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                torn = existing.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if torn:
            self._file.write("\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, record: Record) -> None:
        """Write one record as a line and make it durable before returning."""
        if self._file is None:
            raise RuntimeError("ResultsFile is not open; use it as a context manager")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


@dataclass(kw_only=True)
class Totals:
    """Running totals of a batch, for the progress display."""

    done: int = 0
    failed: int = 0
    chunks: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, record: Record) -> None:
        """Count one finished document."""
        self.done += 1
        self.failed += record.get("error") is not None
        self.chunks += int(record.get("chunks") or 0)
        self.input_tokens += int(record.get("input_tokens") or 0)
        self.output_tokens += int(record.get("output_tokens") or 0)
        self.cost_usd += float(record.get("cost_usd") or 0.0)


@dataclass(frozen=True, kw_only=True)
class Report:
    """The batch's final numbers, over the latest record of every input document."""

    documents: int
    succeeded: int
    failed: int
    skipped: int
    not_run: int
    chunks: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    wall_time_s: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    interrupted: bool = False
    # Rate-limit deferrals of this run's jobs, and the time those jobs spent deferred.
    deferrals: int = 0
    waited_s: float = 0.0
    # Batch API mode: the real-time price of the same usage (None: not a batch-API run).
    realtime_cost_usd: float | None = None

    @classmethod
    def of(
        cls,
        records: Sequence[Record],
        *,
        skipped: int,
        not_run: int,
        wall_time_s: float,
        interrupted: bool,
        deferrals: Sequence[Deferral] = (),
    ) -> Report:
        """Sum `records` (this run's and the skipped ones) into a report."""
        latencies = sorted(
            float(r["latency_ms"]) for r in records if isinstance(r.get("latency_ms"), int | float)
        )
        failed = sum(1 for r in records if r.get("error") is not None)
        priced = [r for r in records if isinstance(r.get("realtime_cost_usd"), int | float)]
        return cls(
            documents=len(records),
            succeeded=len(records) - failed,
            failed=failed,
            skipped=skipped,
            not_run=not_run,
            chunks=sum(int(r.get("chunks") or 0) for r in records),
            input_tokens=sum(int(r.get("input_tokens") or 0) for r in records),
            output_tokens=sum(int(r.get("output_tokens") or 0) for r in records),
            cost_usd=round(sum(float(r.get("cost_usd") or 0.0) for r in records), 10),
            wall_time_s=round(wall_time_s, 3),
            latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95),
            interrupted=interrupted,
            deferrals=sum(d.count for d in deferrals),
            waited_s=round(sum(d.waited_s for d in deferrals), 3),
            realtime_cost_usd=(
                round(sum(float(r["realtime_cost_usd"]) for r in priced), 10) if priced else None
            ),
        )


def percentile(values: Sequence[float], p: int) -> float | None:
    """The p-th percentile (linear interpolation between closest ranks), or None if empty."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 3)


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How to summarize: the job's options and how many documents to keep in flight."""

    words: int = 60
    model: str | None = None
    user_id: str = "batch"
    concurrency: int = 16
    chunk_tokens: int | None = None
    cache: bool | None = None
    timeout: float = 600.0
    poll_interval: float = 0.05
    # How often the run asks Redis which of its jobs are deferred, and on what.
    deferral_interval: float = 1.0
    # Through the providers' Batch APIs (producer/batchapi.py): half price, up to 24 h.
    batch_api: bool = False
    # Batch API mode: seconds to wait for the results (None: until every one is in).
    batch_wait: float | None = None


class BatchListener(Protocol):
    """Told about a batch's progress (the CLI's progress bar is one)."""

    def started(self, *, total: int, skipped: int) -> None:
        """The run starts: `total` input documents, `skipped` of them already done."""

    def finished(self, record: Record, totals: Totals) -> None:
        """One document finished (summarized or failed) and was recorded."""

    def waiting(self, status: Waiting | None) -> None:
        """Some in-flight documents wait on a rate limit (None: none do any more)."""


@dataclass(kw_only=True)
class _Flight:
    document: Document
    hash: str
    submitted: float
    chunks: int = 1


@dataclass(kw_only=True)
class BatchRun:
    """One run of `llmq summarize` over `documents`."""

    documents: Sequence[Document]
    options: BatchOptions = field(default_factory=BatchOptions)
    out: Path | None = None
    listener: BatchListener | None = None
    app: Celery | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _totals: Totals = field(default_factory=Totals)
    _watch: DeferralWatch | None = None

    def stop(self) -> None:
        """Submit no more documents; the run ends once those in flight are recorded."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called."""
        return self._stopping.is_set()

    def run(self) -> Report:
        """Summarize every document not already in the output file; return the report."""
        started = time.monotonic()
        results = ResultsFile(self.out) if self.out else None
        done_before = results.summarized() if results else {}
        skipped: list[Record] = []
        todo: deque[tuple[Document, str]] = deque()
        # A different provider or model means different summaries, not the old ones again.
        provider, model = resolved_model(self.options.model)
        for document in self.documents:
            digest = content_hash(
                document.text, model=model, words=self.options.words, provider=provider
            )
            if document.error is None and digest in done_before:
                skipped.append(done_before[digest])
            else:
                todo.append((document, digest))
        if self.listener:
            self.listener.started(total=len(skipped) + len(todo), skipped=len(skipped))
        app = self.app or _default_app()
        self._watch = DeferralWatch.of(
            app,
            user_id=self.options.user_id,
            request_ids={_request_id(digest) for _, digest in todo},
        )
        records: list[Record] = []
        with results if results else contextlib.nullcontext() as sink:
            if self.options.batch_api:
                self._drive_batch_api(todo, lambda record: self._record(record, sink, records))
            else:
                self._drive(app, todo, lambda record: self._record(record, sink, records))
        return Report.of(
            skipped + records,
            skipped=len(skipped),
            not_run=len(todo),
            wall_time_s=time.monotonic() - started,
            interrupted=self.stopping and bool(todo),
            deferrals=self._watch.final() if self._watch else (),
        )

    def _drive(
        self, app: Celery, todo: deque[tuple[Document, str]], record: Callable[[Record], None]
    ) -> None:
        """Keep `concurrency` documents in flight until all are recorded (or stop() drains)."""
        in_flight: dict[str, _Flight] = {}
        while (todo and not self.stopping) or in_flight:
            if self._watch is not None and self.listener is not None:
                changed, status = self._watch.poll(interval=self.options.deferral_interval)
                if changed:
                    self.listener.waiting(status)
            while todo and not self.stopping and len(in_flight) < self.options.concurrency:
                document, digest = todo.popleft()
                if document.error is not None:
                    record(_record_of(document, digest, {"error": document.error}, 0.0))
                    continue
                in_flight[self._submit(app, document, digest)] = _Flight(
                    document=document, hash=digest, submitted=time.monotonic()
                )
            if not in_flight:
                continue
            ready = app.backend.get_many(
                list(in_flight), interval=self.options.poll_interval, max_iterations=1
            )
            for task_id, meta in ready:
                flight = in_flight.pop(task_id)
                value = meta.get("result")
                if meta.get("status") == "SUCCESS" and isinstance(value, dict):
                    if "continue" in value:
                        flight.chunks = int(value.get("chunks") or flight.chunks)
                        in_flight[str(value["continue"])] = flight
                        continue
                    result = value
                else:
                    result = {"error": f"{type(value).__name__}: {value}", "chunks": flight.chunks}
                latency = (time.monotonic() - flight.submitted) * 1000
                record(_record_of(flight.document, flight.hash, result, latency))
            now = time.monotonic()
            for task_id, flight in list(in_flight.items()):
                if now - flight.submitted > self.options.timeout:
                    del in_flight[task_id]
                    error = (
                        f"No result after {self.options.timeout:.0f}s: are workers consuming "
                        "the 'batch' queue? Fix: run `celery -A worker worker -Q batch`."
                    )
                    record(
                        _record_of(
                            flight.document,
                            flight.hash,
                            {"error": error, "chunks": flight.chunks},
                            (now - flight.submitted) * 1000,
                        )
                    )

    def _drive_batch_api(
        self, todo: deque[tuple[Document, str]], record: Callable[[Record], None]
    ) -> None:
        """Hand every document to a batch-API run, then record results as they land."""
        from producer import batchapi

        app = self.app or _default_app()
        options = self.options
        started = time.monotonic()
        waiting: dict[str, tuple[Document, str]] = {}
        while todo:
            document, digest = todo.popleft()
            if document.error is not None:
                record(_record_of(document, digest, {"error": document.error}, 0.0))
                continue
            key = batchapi.document_key(
                digest, user_id=options.user_id, chunk_tokens=options.chunk_tokens
            )
            waiting[key] = (document, digest)
        if not waiting:
            return
        owners = batchapi.start(
            app,
            [(key, doc.id, doc.text) for key, (doc, _) in waiting.items()],
            options={
                "user_id": options.user_id,
                "words": options.words,
                "model": options.model,
                "chunk_tokens": options.chunk_tokens,
            },
            timeout=options.timeout,
        )

        def landed(key: str, result: Record) -> None:
            document, digest = waiting[key]
            record(_record_of(document, digest, result, (time.monotonic() - started) * 1000))

        left = batchapi.await_results(
            app,
            owners,
            on_result=landed,
            stopping=lambda: self.stopping,
            poll_interval=max(options.poll_interval, 0.2),
            deadline=None if options.batch_wait is None else started + options.batch_wait,
        )
        # Still with the provider: the same command later picks them up (not run here).
        todo.extend(waiting[key] for key in left)
        if left and not self.stopping:
            self.stop()

    def _submit(self, app: Celery, document: Document, digest: str) -> str:
        options = self.options
        kwargs: dict[str, Any] = {
            "document_id": document.id,
            "text": document.text,
            "words": options.words,
            "user_id": options.user_id,
            "model": options.model,
            # Stable across runs, so an idempotent cache can recognise a repeated call.
            "request_id": _request_id(digest),
            "chunk_tokens": options.chunk_tokens,
            "cache": options.cache,
        }
        return str(app.send_task(TASK, kwargs=kwargs, task_id=str(uuid.uuid4())).id)

    def _record(self, record: Record, sink: ResultsFile | None, records: list[Record]) -> None:
        if sink is not None:
            sink.append(record)
        records.append(record)
        self._totals.add(record)
        if self.listener:
            self.listener.finished(record, self._totals)


def _request_id(digest: str) -> str:
    """A document's request_id; its calls' request_ids start with it (worker.mapreduce)."""
    return f"batch-{digest[:32]}"


@dataclass(kw_only=True)
class DeferralWatch:
    """This run's deferred jobs, read from the workers' deferral notes (worker.deferrals)."""

    log: DeferralLog
    user_id: str
    request_ids: set[str]
    # Epoch seconds; notes are in Redis time, so allow for a little clock skew.
    since: float = field(default_factory=lambda: time.time() - 5.0)
    _last_poll: float = 0.0
    _last: Waiting | None = None

    @classmethod
    def of(cls, app: Celery, *, user_id: str, request_ids: set[str]) -> DeferralWatch | None:
        """A watch over the app's result-backend Redis, or None when it is not Redis."""
        client = getattr(app.backend, "client", None)
        if not isinstance(client, redis.Redis):
            return None
        return cls(log=DeferralLog(client), user_id=user_id, request_ids=request_ids)

    def mine(self) -> list[Deferral]:
        """This run's deferrals (its calls' request_ids start with a document's)."""
        width = len(_request_id("0" * 32))
        return [
            d
            for d in self.log.of(self.user_id, since=self.since)
            if d.request_id[:width] in self.request_ids
        ]

    def poll(self, *, interval: float) -> tuple[bool, Waiting | None]:
        """(whether to tell the listener, what the run waits on now), at most per interval."""
        now = time.monotonic()
        if now - self._last_poll < interval:
            return False, self._last
        self._last_poll = now
        try:
            status = waiting(self.mine())
        except redis.RedisError:
            return False, self._last
        changed = not (status is None and self._last is None)
        self._last = status
        return changed, status

    def final(self) -> list[Deferral]:
        """Every deferral of the run, for its report (none if Redis cannot say)."""
        try:
            return self.mine()
        except redis.RedisError:
            return []


def _record_of(document: Document, digest: str, result: Record, latency_ms: float) -> Record:
    """The output line of one document."""
    return {
        "id": document.id,
        "path": document.source,
        "hash": digest if document.error is None else None,
        "summary": result.get("summary"),
        "provider": result.get("provider"),
        "model": result.get("model"),
        "chunks": int(result.get("chunks") or (0 if document.error else 1)),
        "chunk_sizes": [int(n) for n in result.get("chunk_sizes") or []],
        "levels": int(result.get("levels") or 0),
        "calls": int(result.get("calls") or 0),
        "input_tokens": int(result.get("input_tokens") or 0),
        "output_tokens": int(result.get("output_tokens") or 0),
        "cost_usd": float(result.get("cost_usd") or 0.0),
        "latency_ms": round(latency_ms, 3),
        "error": result.get("error"),
        # Batch API mode: what the same calls would have cost in real time.
        **(
            {"realtime_cost_usd": float(result["realtime_cost_usd"]), "batch_api": True}
            if "realtime_cost_usd" in result
            else {}
        ),
    }


def _default_app() -> Celery:
    from worker.app import app

    return app


@contextlib.contextmanager
def stop_on_signals(run: BatchRun, *, on_stop: Callable[[], None] | None = None) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop submitting and drain. Second: KeyboardInterrupt at once."""
    signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)

    def handle(signum: int, frame: FrameType | None) -> None:
        if run.stopping:
            raise KeyboardInterrupt
        run.stop()
        if on_stop:
            on_stop()

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
