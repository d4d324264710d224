"""A batch-API run: documents into rounds of provider batches, durable in Redis, resumable.

Round 0 holds every document's map calls (a document that fits one call is summarized
by it); each next round holds the combining calls of the documents still going, until
every document has its summary or its error. Every round goes through the Batch API
too: it is the half price that makes the mode worth its latency, and a combining round
is as small as the number of long documents.

Nothing lives only in a process. Before a provider batch is created its record
(`ProviderBatchKeys.state`) holds the custom_ids it carries, its worst case is
reserved, and `attempted` is set; only then is it created, and its id recorded. A
delivery that finds `attempted` without an id (the worker died during the create)
never creates blindly: it looks for the batch in the provider's list first (OpenAI: by
the `llmq_batch` metadata, exact; Anthropic, which keeps no metadata: by a batch with
the same request count created since the intent, not recorded by any other run). One
found is adopted; none found is created; more than one candidate fails the documents
with `BatchAmbiguousError` naming the candidates rather than risk paying twice.

A batch that ends expired, failed or cancelled leaves its unfinished requests as
`BatchNotRunError` per document, with nothing charged for them: the documents are
reported, not retried in real time (that would cost double what the user chose), and
the next run of the same command submits them again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from worker import keyspace
from worker.batchapi import money
from worker.batchapi.clients import (
    METADATA_KEY,
    PROVIDER_LIMITS,
    AnthropicBatches,
    BatchClient,
    OpenAIBatches,
    Outcome,
    split,
)
from worker.batchapi.listing import find_batch
from worker.chunking import Chunker
from worker.connections import redis_client
from worker.errors import (
    BatchAmbiguousError,
    CircuitOpenError,
    ConfigurationError,
    DailyBudgetExceededError,
    LLMQError,
    ProviderError,
    RateLimitedError,
)
from worker.guard import count_input_tokens
from worker.mapreduce import (
    MAX_LEVELS,
    SEPARATOR,
    TEMPERATURE,
    DocumentSummary,
    Summarizer,
    SummaryJob,
    combine_instruction,
    part_instruction,
    summarize_instruction,
)
from worker.models import Message, Usage
from worker.pipeline import Pipeline
from worker.providers.base import ProviderRequest
from worker.resilience import Admission
from worker.spend import SpendTracker, to_units, to_usd, utc_day

logger = logging.getLogger("llmq.batchapi")
# Local states of a provider batch's record.
ENDED_STATES = frozenset({"done", "refused", "ambiguous", "unsubmitted"})
# Run keys outlive the longest batch (24 h) and a month of `llmq batches`.
RUN_TTL = 30 * 86_400


class _Busy(Exception):
    """Another delivery holds the batch's lock (or held it when its worker died)."""


T = TypeVar("T")
# A Batch API call that cannot be made now (its circuit is open, its provider's requests
# per minute are used up) or failed: tried again at the next poll.
NOT_NOW = (ProviderError, RateLimitedError)
# Sends a task by name with kwargs after a countdown (seconds).
Send = Callable[[str, dict[str, Any], float], None]
POLL_TASK = "llm.batchapi.poll"
SUBMIT_TASK = "llm.batchapi.submit"


def _no_call(job: dict[str, Any]) -> Any:
    raise LLMQError("batch-API runs make no real-time calls")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a run summarizes with: the same knobs as the real-time batch."""

    user_id: str
    words: int
    model: str | None = None
    chunk_tokens: int | None = None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _fields(mapping: dict[str, str]) -> dict[Any, Any]:
    """A str mapping as redis-py's hset types it."""
    return dict(mapping)


def _units(raw: Any) -> int:
    return int(raw or 0)


class BatchRunner:
    """The worker side of batch-API runs: start, submit, poll, advance, cancel."""

    def __init__(self, pipeline: Pipeline, *, send: Send) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.redis: redis.Redis = redis_client(self.settings)
        # Its chunking and sizing only: every call goes into a provider batch.
        self.summarizer = Summarizer(pipeline, complete=_no_call)
        spend = SpendTracker.from_settings(self.settings)
        spend.reservation_ttl = self.settings.batch_api_reservation_ttl
        self.ledger = money.Ledger(spend=spend)
        self.send = send
        self._clients: dict[str, BatchClient] = {}

    # --- configuration -------------------------------------------------------------

    def client(self, provider: str) -> BatchClient:
        """The provider's Batch API client."""
        if provider not in self._clients:
            if provider not in ("openai", "anthropic"):
                raise ConfigurationError(
                    f"The Batch API mode needs an OpenAI or Anthropic model; this run's "
                    f"model is served by {provider!r}. Fix: pass --model, or run without "
                    "--batch-api."
                )
            key = self.settings.api_key(provider)  # type: ignore[arg-type]
            if key is None:
                env = "OPENAI_API_KEY" if provider == "openai" else "ANTHROPIC_API_KEY"
                raise ConfigurationError(f"The Batch API mode for {provider} needs {env}.")
            cls = OpenAIBatches if provider == "openai" else AnthropicBatches
            base = (
                self.settings.openai_base_url
                if provider == "openai"
                else self.settings.anthropic_base_url
            )
            self._clients[provider] = cls(
                api_key=key.get_secret_value(),
                base_url=base,
                timeout=self.settings.timeout_seconds,
                guard=self.guarded,
            )
        return self._clients[provider]

    def guarded(self, provider: str, what: str, call: Callable[[], T], requests: int = 1) -> T:
        """A Batch API call behind the provider's circuit and its requests-per-minute limits."""
        breaker, limiter = self.pipeline.breaker, self.pipeline.limiter
        admission = breaker.admit(provider)
        if admission is Admission.OPEN:
            raise CircuitOpenError(
                f"{provider}'s circuit is open: the batch API call ({what}) waits for the next "
                "poll",
                provider=provider,
            )
        probe = admission is Admission.PROBE
        limits = [
            limit for limit in limiter.shared_limits(provider=provider) if limit.unit == "requests"
        ]
        held = []
        try:
            for _ in range(requests if limits else 0):
                held.append(
                    limiter.reserve(
                        limits,
                        tokens=0,
                        reservation_id=f"batchapi:{uuid.uuid4().hex}",
                        user_id="batchapi",
                    )
                )
        except RateLimitedError:
            for reservation in held:
                if reservation is not None:
                    reservation.release()
            if probe:
                breaker.abandon_probe(provider)
            raise
        try:
            result = call()
        except ProviderError as exc:
            breaker.record(provider, error=exc, probe=probe)
            raise
        except BaseException:
            if probe:
                breaker.abandon_probe(provider)
            raise
        breaker.record(provider, error=None, probe=probe)
        return result

    def countdown_after(self, error: Exception) -> float:
        """When to try a call that could not run: when its rate limit frees up, else next poll."""
        wait = getattr(error, "retry_after", None)
        if isinstance(error, RateLimitedError) and wait is not None and wait != float("inf"):
            return min(max(self.poll_countdown(), float(wait) + 0.05), self.poll_cap())
        return self.poll_countdown()

    def lock_seconds(self) -> int:
        """How long a batch's lock outlives a worker that died holding it."""
        # A poll or a create is a few provider calls, each within LLM_TIMEOUT_SECONDS.
        return int(max(30, 6 * self.settings.timeout_seconds))

    def poll_cap(self) -> float:
        """The longest countdown a task may wait without being redelivered."""
        return max(1.0, self.settings.visibility_timeout - self.settings.job_deadline_seconds - 5)

    def poll_countdown(self) -> float:
        """Seconds to the next poll: within the visibility timeout, so it is not redelivered."""
        return min(self.settings.batch_api_poll_seconds, self.poll_cap())

    def schedule(self, local_id: str, countdown: float) -> None:
        """Poll the batch after `countdown`; an older chain of polls of it stops."""
        token = uuid.uuid4().hex[:12]
        self.redis.hset(keyspace.ProviderBatchKeys(local_id=local_id).state, "poll_token", token)
        self.send(POLL_TASK, {"batch": local_id, "token": token}, countdown)

    def _job(self, meta: dict[str, str], document_id: str = "run") -> SummaryJob:
        return SummaryJob(
            document_id=document_id,
            words=int(meta["words"]),
            user_id=meta["user_id"],
            model=meta.get("model") or None,
            request_id=meta["run_id"],
            chunk_tokens=int(meta["chunk_tokens"]) if meta.get("chunk_tokens") else None,
        )

    # --- start ---------------------------------------------------------------------

    def start(
        self, run_id: str, documents: list[dict[str, str]], options: RunOptions
    ) -> dict[str, Any]:
        """Claim the documents no other run holds, plan round 0 and submit it.

        Returns which run owns each document key: this run, or an earlier one still
        running or finished with a summary, whose results the caller then reads.
        """
        job = SummaryJob(
            document_id="run",
            words=options.words,
            user_id=options.user_id,
            model=options.model,
            request_id=run_id,
            chunk_tokens=options.chunk_tokens,
        )
        model = self.summarizer.model(job)
        price = self.pipeline.prices.get(model)
        self.client(price.provider)  # no Batch API or no key: refused before any claim
        run = keyspace.BatchRunKeys(run_id=run_id)
        owners: dict[str, str] = {}
        mine: list[dict[str, str]] = []
        for document in documents:
            owner = self._claim(document["key"], run_id)
            owners[document["key"]] = owner
            if owner == run_id:
                mine.append(document)
        if not mine:
            return {"run_id": run_id, "owners": owners}
        meta = {
            "run_id": run_id,
            "user_id": options.user_id,
            "words": str(options.words),
            "model": model,
            "provider": price.provider,
            "chunk_tokens": str(options.chunk_tokens or ""),
            "documents": str(len(mine)),
            "created_at": f"{time.time():.3f}",
            "state": "running",
            "round": "0",
        }
        if self.redis.hget(run.meta, "round") is None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(run.meta, mapping=_fields(meta))
            pipe.expire(run.meta, RUN_TTL)
            pipe.execute()
        meta = self.redis.hgetall(run.meta)  # type: ignore[assignment]
        if not self.redis.exists(run.round(0)):
            self._plan_first(run, meta, mine)
        self.submit(run_id, 0)
        return {"run_id": run_id, "owners": owners}

    def _claim(self, key: str, run_id: str) -> str:
        """The run that owns the document: an earlier one unless it finished with an error."""
        claim = keyspace.batch_doc_claim(key)
        for _ in range(3):
            if self.redis.set(claim, run_id, nx=True, ex=RUN_TTL):
                return run_id
            owner = self.redis.get(claim)
            if owner is None:
                continue
            owner = owner if isinstance(owner, str) else owner.decode()
            if owner == run_id:
                return run_id
            result = self.redis.hget(keyspace.BatchRunKeys(run_id=owner).results, key)
            if result is None or json.loads(result).get("error") is None:
                return owner  # still running, or summarized: never paid for twice
            # Its earlier run failed it: this run tries again.
            if self.redis.set(claim, run_id, ex=RUN_TTL, xx=True):
                return run_id
        return run_id

    def _plan_first(
        self, run: keyspace.BatchRunKeys, meta: dict[str, str], documents: list[dict[str, str]]
    ) -> None:
        """Chunk every document and write round 0's requests and each document's state."""
        requests: dict[str, str] = {}
        states: dict[str, str] = {}
        for n, document in enumerate(documents):
            job = self._job(meta, document["id"])
            state: dict[str, Any] = {
                "n": n,
                "id": document["id"],
                "level": 0,
                "items": [],
                "chunk_sizes": [],
                "cost_units": 0,
                "realtime_units": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "calls": 0,
                "batches": [],
            }
            try:
                chunker = self.summarizer.chunker(job)
                parts = chunker.split(document["text"])
                if not parts:
                    raise LLMQError("The document is empty; nothing to summarize.")
                state["chunk_sizes"] = [chunker.count(p) for p in parts]
                state["chunks"] = len(parts)
                for i, text in enumerate(parts, start=1):
                    instruction = (
                        summarize_instruction(job.words)
                        if len(parts) == 1
                        else part_instruction(job.words, i, len(parts))
                    )
                    custom_id = f"d{n:06d}-l0-p{i:05d}"
                    requests[custom_id] = self._request(meta, document["key"], instruction, text)
                    state["items"].append(custom_id)
            except LLMQError as exc:
                self._finish(run, document["key"], state, error=f"{type(exc).__name__}: {exc}")
                continue
            states[document["key"]] = _json(state)
        pipe = self.redis.pipeline(transaction=True)
        if states:
            pipe.hset(run.docs, mapping=_fields(states))
        if requests:
            pipe.hset(run.round(0), mapping=_fields(requests))
        for key in (run.docs, run.round(0)):
            pipe.expire(key, RUN_TTL)
        pipe.execute()

    def _request(self, meta: dict[str, str], doc_key: str, instruction: str, text: str) -> str:
        """One request of a round: its provider body and worst case, as JSON."""
        model = meta["model"]
        price = self.pipeline.prices.get(model)
        max_tokens = self.summarizer.max_output(self._job(meta))
        messages = [
            Message(role="system", content=instruction),
            Message(role="user", content=text),
        ]
        request = ProviderRequest(
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            timeout=self.settings.timeout_seconds,
            reasoning=price.reasoning,
        )
        body = self.client(price.provider).body(request)
        input_tokens = count_input_tokens(messages, model=model, price=price)
        worst = money.worst_case(price, input_tokens=input_tokens, output_tokens=max_tokens)
        return _json(
            {
                "doc": doc_key,
                "body": body,
                "worst_units": to_units(worst),
            }
        )

    # --- submit --------------------------------------------------------------------

    def submit(self, run_id: str, number: int) -> None:
        """Create the round's provider batches that do not exist yet, each recorded first."""
        run = keyspace.BatchRunKeys(run_id=run_id)
        meta: dict[str, str] = self.redis.hgetall(run.meta)  # type: ignore[assignment]
        raw: dict[str, str] = self.redis.hgetall(run.round(number))  # type: ignore[assignment]
        if not raw:
            self.advance(run_id, number)
            return
        provider = meta["provider"]
        client = self.client(provider)
        requests = [(cid, json.loads(raw[cid])) for cid in sorted(raw)]
        count_limit, byte_limit = PROVIDER_LIMITS[provider]
        groups = split(
            [(cid, item["body"]) for cid, item in requests],
            client,
            max_requests=min(count_limit, self.settings.batch_api_max_requests or count_limit),
            max_bytes=min(byte_limit, self.settings.batch_api_max_bytes or byte_limit),
        )
        worst = {cid: int(item["worst_units"]) for cid, item in requests}
        self.redis.hset(run.meta, f"round:{number}:batches", str(len(groups)))
        retry: float | None = None
        for g, group in enumerate(groups):
            local_id = f"{run_id}-r{number}-b{g}"
            custom_ids = [cid for cid, _ in group]
            self._record_intent(local_id, meta, number, custom_ids, worst)
            try:
                self._create(local_id, group)
            except _Busy:
                retry = max(retry or 0.0, self.poll_countdown())
            except NOT_NOW as exc:
                # Whether it exists is unknown: the next try looks in the provider's list.
                logger.warning(
                    "batch creation failed (tried again, looking for it first): %s",
                    exc,
                    extra={"event": "batch_create_failed", "batch": local_id},
                )
                retry = max(retry or 0.0, self.countdown_after(exc))
        if retry is not None:
            # One retry of the whole round: the batches already made are skipped then.
            self.send(SUBMIT_TASK, {"run": run_id, "round": number}, retry)

    def _record_intent(
        self,
        local_id: str,
        meta: dict[str, str],
        number: int,
        custom_ids: list[str],
        worst: dict[str, int],
    ) -> None:
        keys = keyspace.ProviderBatchKeys(local_id=local_id)
        record = {
            "local_id": local_id,
            "run_id": meta["run_id"],
            "round": str(number),
            "provider": meta["provider"],
            "model": meta["model"],
            "user_id": meta["user_id"],
            "day": utc_day(),
            "custom_ids": _json(custom_ids),
            "requests": str(len(custom_ids)),
            "worst_units": str(sum(worst[c] for c in custom_ids)),
            "intent_at": f"{time.time():.3f}",
            "state": "recorded",
            "cost_units": "0",
            "realtime_units": "0",
            "charged": "0",
        }
        if self.redis.hget(keys.state, "worst_units") is None:
            # All at once: a record is whole or absent (a redelivery writes the same one).
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(keys.state, mapping=_fields(record))
            pipe.expire(keys.state, RUN_TTL)
            pipe.zadd(keyspace.BATCH_INDEX, {local_id: time.time()})
            pipe.execute()

    def _create(self, local_id: str, group: list[tuple[str, dict[str, Any]]]) -> None:
        """Reserve, then create (or find) the provider batch; record its id, schedule its poll."""
        keys = keyspace.ProviderBatchKeys(local_id=local_id)
        if not self.redis.set(keys.lock, "create", nx=True, ex=self.lock_seconds()):
            raise _Busy(local_id)  # another delivery is creating it, or died doing so
        ended = False
        record: dict[str, str] = {}
        try:
            record = self.redis.hgetall(keys.state)  # type: ignore[assignment]
            if record.get("state") in ENDED_STATES:
                ended = True
                return
            if record.get("provider_id"):
                self.schedule(local_id, self.poll_countdown())
                return
            try:
                self.ledger.reserve(
                    user_id=record["user_id"],
                    day=record["day"],
                    reservation_id=local_id,
                    units=int(record["worst_units"]),
                )
            except DailyBudgetExceededError as exc:
                message = (
                    f"DailyBudgetExceededError: provider batch {local_id} of "
                    f"{record['requests']} requests was refused before creation: {exc}"
                )
                self.redis.hset(keys.state, mapping={"state": "refused", "error": message})
                self._end(record, message)
                ended = True
                return
            client = self.client(record["provider"])
            provider_id: str | None = None
            if record.get("attempted"):
                try:
                    provider_id = self._find(client, record)
                except BatchAmbiguousError as exc:
                    message = f"BatchAmbiguousError: {exc}"
                    self.redis.hset(keys.state, mapping={"state": "ambiguous", "error": message})
                    self._release(record)
                    self._end(record, message)
                    ended = True
                    return
            if provider_id is None:
                try:
                    # Marked just before the request that makes the batch: from then on,
                    # whether it exists is unknown until the provider says.
                    provider_id = client.create(
                        group,
                        local_id=local_id,
                        sending=lambda: self._attempted(keys),
                    )
                except ProviderError as exc:
                    if exc.status is not None and exc.status < 500 and exc.status != 429:
                        # The provider refused the batch itself: it will not be created.
                        message = f"{type(exc).__name__}: {exc}"
                        self.redis.hset(
                            keys.state, mapping={"state": "unsubmitted", "error": message}
                        )
                        self._release(record)
                        self._end(record, message)
                        ended = True
                        return
                    raise  # unknown whether it exists: the next delivery looks first
            self.redis.hset(
                keys.state,
                mapping={
                    "provider_id": provider_id,
                    "state": "submitted",
                    "submitted_at": f"{time.time():.3f}",
                },
            )
            self.redis.sadd(keyspace.BATCH_PROVIDER_IDS, provider_id)
            logger.info(
                "batch_submitted",
                extra={
                    "event": "batch_submitted",
                    "batch": local_id,
                    "provider": record["provider"],
                    "provider_batch_id": provider_id,
                    "requests": int(record["requests"]),
                    "worst_case_usd": float(to_usd(int(record["worst_units"]))),
                },
            )
            self.schedule(local_id, self.poll_countdown())
        finally:
            self.redis.delete(keys.lock)
            if ended:
                self._round_ended(record)

    def _attempted(self, keys: keyspace.ProviderBatchKeys) -> None:
        self.redis.hset(keys.state, "attempted", f"{time.time():.3f}")

    def _find(self, client: BatchClient, record: dict[str, str]) -> str | None:
        """The provider batch an interrupted create may have made, if the list shows one."""
        local_id, total = record["local_id"], int(record["requests"])
        since = float(record.get("intent_at") or 0) - 5
        found = client.recent()
        if client.provider == "openai":
            tagged = [b.id for b in found if b.metadata.get(METADATA_KEY) == local_id]
            return tagged[0] if tagged else None
        known = self.redis.smembers(keyspace.BATCH_PROVIDER_IDS)
        candidates = [
            b.id for b in found if b.created_at >= since and b.total == total and b.id not in known
        ]
        if len(candidates) > 1:
            raise BatchAmbiguousError(
                f"the creation of provider batch {local_id} was interrupted and "
                f"{len(candidates)} batches of {total} requests created since then could be "
                f"it ({', '.join(candidates)}); none was adopted and none created. Fix: cancel "
                "the ones that are not yours in the provider's console, then re-run."
            )
        return candidates[0] if candidates else None

    # --- poll ----------------------------------------------------------------------

    def poll(self, local_id: str, token: str | None = None) -> None:
        """Check one provider batch; record its results once ended, else poll again later."""
        keys = keyspace.ProviderBatchKeys(local_id=local_id)
        if not self.redis.set(keys.lock, "poll", nx=True, ex=self.lock_seconds()):
            # Its holder schedules the next poll, unless it died: then this chain goes on
            # once the lock expires (the holder's own next poll, if any, retires this one).
            wait = max(self.poll_countdown(), self.redis.ttl(keys.lock) or 0)
            self.schedule(local_id, min(float(wait), self.poll_cap()))
            return
        try:
            record: dict[str, str] = self.redis.hgetall(keys.state)  # type: ignore[assignment]
            if not record:
                return
            if token is not None and record.get("poll_token") not in (None, token):
                return  # a newer chain of polls has replaced this one
            if record.get("state") in ENDED_STATES:
                self._round_ended(record)
                return
            client = self.client(record["provider"])
            try:
                status = client.retrieve(record["provider_id"])
            except NOT_NOW as exc:
                logger.warning(
                    "batch poll failed (tried again at the next poll): %s",
                    exc,
                    extra={"event": "batch_poll_failed", "batch": local_id},
                )
                self.schedule(local_id, self.countdown_after(exc))
                return
            self.redis.hset(
                keys.state,
                mapping={
                    "provider_state": status.provider_state,
                    "total": str(status.total),
                    "done": str(status.done),
                    "failed": str(status.failed),
                    "polled_at": f"{time.time():.3f}",
                },
            )
            if status.state != "ended":
                self.schedule(local_id, self.poll_countdown())
                return
            try:
                self._collect(record, client, status.errors)
            except NOT_NOW as exc:
                logger.warning(
                    "batch results not read (tried again at the next poll): %s",
                    exc,
                    extra={"event": "batch_poll_failed", "batch": local_id},
                )
                self.schedule(local_id, self.countdown_after(exc))
                return
            self.redis.hset(keys.state, mapping={"state": "done", "ended_at": f"{time.time():.3f}"})
            self._release(record)
        finally:
            self.redis.delete(keys.lock)
        self._round_ended(record)

    def _collect(self, record: dict[str, str], client: BatchClient, errors: str | None) -> None:
        """Charge and store every result of an ended batch; what has none was not run."""
        run = keyspace.BatchRunKeys(run_id=record["run_id"])
        requests = self.redis.hgetall(run.round(int(record["round"])))
        price = self.pipeline.prices.get(record["model"])
        expected: list[str] = json.loads(record["custom_ids"])
        seen: set[str] = set()
        answers: dict[str, str] = {}
        for outcome in list(client.results(record["provider_id"])):
            if outcome.custom_id not in expected or outcome.custom_id in seen:
                continue
            seen.add(outcome.custom_id)
            worst = int(json.loads(requests[outcome.custom_id])["worst_units"])
            answers[outcome.custom_id] = _json(self._answer(record, outcome, price, worst))
        for custom_id in expected:
            if custom_id not in seen:
                reason = f" ({errors})" if errors else ""
                answers[custom_id] = _json(
                    {
                        "error": f"BatchNotRunError: provider batch {record.get('provider_id')} "
                        f"ended without running this request{reason}; nothing was charged "
                        "for it. Re-run the same command to submit it again."
                    }
                )
        if answers:
            self.redis.hset(run.answers, mapping=_fields(answers))
            self.redis.expire(run.answers, RUN_TTL)

    def _answer(
        self, record: dict[str, str], outcome: Outcome, price: Any, worst: int
    ) -> dict[str, Any]:
        """One result as stored: charged exactly once if the provider billed it."""
        usage: Usage | None = None
        if outcome.completion is not None:
            usage = outcome.completion.usage
        elif isinstance(outcome.error, ProviderError) and outcome.error.usage is not None:
            usage = outcome.error.usage
        answer: dict[str, Any] = {}
        if usage is not None:
            cost = money.batch_cost(price, usage)
            realtime = price.cost(usage)
            self.ledger.settle(
                local_id=record["local_id"],
                custom_id=outcome.custom_id,
                user_id=record["user_id"],
                day=record["day"],
                provider=record["provider"],
                model=record["model"],
                worst_units=worst,
                usage=usage,
                cost=cost,
                realtime=realtime,
            )
            answer.update(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_units=to_units(cost),
                realtime_units=to_units(realtime),
            )
        if outcome.completion is not None and outcome.completion.finish_reason != "length":
            answer["text"] = outcome.completion.text
        elif outcome.completion is not None:
            answer["error"] = (
                "TruncatedResponseError: the batch answer hit max_tokens; ask for fewer words."
            )
        elif outcome.error is not None:
            answer["error"] = f"{type(outcome.error).__name__}: {outcome.error}"
        else:
            answer["error"] = (
                f"BatchNotRunError: provider batch {record.get('provider_id')} ended with this "
                f"request {outcome.not_run}; nothing was charged for it. Re-run the same "
                "command to submit it again."
            )
        return answer

    def _release(self, record: dict[str, str]) -> None:
        self.ledger.release(
            user_id=record["user_id"], day=record["day"], reservation_id=record["local_id"]
        )

    def _end(self, record: dict[str, str], message: str) -> None:
        """A batch that will never run: each of its requests ends with `message`."""
        run = keyspace.BatchRunKeys(run_id=record["run_id"])
        custom_ids: list[str] = json.loads(record["custom_ids"])
        self.redis.hset(run.answers, mapping={c: _json({"error": message}) for c in custom_ids})
        self.redis.expire(run.answers, RUN_TTL)

    def _round_ended(self, record: dict[str, str]) -> None:
        """Count the batch as ended in its round; the round's last one advances the run."""
        run = keyspace.BatchRunKeys(run_id=record["run_id"])
        number = int(record["round"])
        self.redis.sadd(run.ended(number), record["local_id"])
        self.redis.expire(run.ended(number), RUN_TTL)
        expected = self.redis.hget(run.meta, f"round:{number}:batches")
        if expected is not None and self.redis.scard(run.ended(number)) >= int(expected):
            self.advance(record["run_id"], number)

    # --- advance -------------------------------------------------------------------

    def advance(self, run_id: str, number: int) -> None:
        """After round `number`: finish documents, plan and submit the next round."""
        run = keyspace.BatchRunKeys(run_id=run_id)
        token = uuid.uuid4().hex
        if not self.redis.set(run.lock, token, nx=True, ex=self.lock_seconds()):
            # Another task is advancing the run, or died doing so: look again later (a
            # no-op once the round has advanced).
            self.send(SUBMIT_TASK, {"run": run_id, "round": number}, self.poll_countdown())
            return
        try:
            meta: dict[str, str] = self.redis.hgetall(run.meta)  # type: ignore[assignment]
            if int(meta.get("round", 0)) != number or meta.get("state") == "done":
                return  # already advanced
            docs: dict[str, str] = self.redis.hgetall(run.docs)  # type: ignore[assignment]
            requests: dict[str, str] = {}
            states: dict[str, str] = {}
            for key, raw in docs.items():
                state = json.loads(raw)
                if state.get("done") or state["level"] != number:
                    continue
                step = self._step(run, meta, key, state)
                if step is not None:
                    requests.update(step)
                    states[key] = _json(state)
            pipe = self.redis.pipeline(transaction=True)
            if requests:
                pipe.hset(run.round(number + 1), mapping=_fields(requests))
                pipe.expire(run.round(number + 1), RUN_TTL)
            if states:
                pipe.hset(run.docs, mapping=_fields(states))
            # The round's requests (document text) are no longer needed once it is done.
            pipe.delete(run.round(number))
            pipe.hset(run.meta, mapping={"round": str(number + 1)})
            if not requests:
                pipe.hset(run.meta, mapping={"state": "done", "ended_at": f"{time.time():.3f}"})
            pipe.execute()
        finally:
            if self.redis.get(run.lock) == token:
                self.redis.delete(run.lock)
        if requests:
            self.submit(run_id, number + 1)

    def _step(
        self, run: keyspace.BatchRunKeys, meta: dict[str, str], key: str, state: dict[str, Any]
    ) -> dict[str, str] | None:
        """One document after a round: finished (None) or its next round's requests."""
        items: list[str] = state["items"]
        answers = [
            json.loads(a) if a else {"error": "no answer recorded"}
            for a in self.redis.hmget(run.answers, items)
        ]
        for answer in answers:
            state["calls"] += 1 if "cost_units" in answer else 0
            state["cost_units"] += _units(answer.get("cost_units"))
            state["realtime_units"] += _units(answer.get("realtime_units"))
            state["input_tokens"] += int(answer.get("input_tokens") or 0)
            state["output_tokens"] += int(answer.get("output_tokens") or 0)
        failed = [a for a in answers if a.get("error") or a.get("text") is None]
        level = state["level"]
        if failed:
            first = failed[0].get("error")
            error = (
                str(first)
                if len(items) == 1
                else f"{len(failed)} of {len(items)} parts failed (level {level}), so the "
                f"document has no summary. First error: {first}"
            )
            self._finish(run, key, state, error=error)
            return None
        texts = [str(a["text"]) for a in answers]
        if len(items) == 1:
            self._finish(run, key, state, summary=texts[0])
            return None
        job = self._job(meta, state["id"])
        combined = SEPARATOR.join(texts)
        chunker: Chunker = self.summarizer.chunker(job)
        groups = [combined] if chunker.fits(combined) else chunker.split(combined)
        if len(groups) > 1 and (len(groups) >= len(items) or level + 1 >= MAX_LEVELS):
            self._finish(
                run,
                key,
                state,
                error=f"{len(items)} part summaries do not shrink into fewer groups of "
                f"{chunker.budget} tokens (level {level}). Fix: ask for fewer words or raise "
                "LLM_BATCH_CHUNK_TOKENS.",
            )
            return None
        state["level"] = level + 1
        state["items"] = []
        requests = {}
        for i, text in enumerate(groups, start=1):
            custom_id = f"d{state['n']:06d}-l{level + 1}-p{i:05d}"
            requests[custom_id] = self._request(meta, key, combine_instruction(job.words), text)
            state["items"].append(custom_id)
        return requests

    def _finish(
        self,
        run: keyspace.BatchRunKeys,
        key: str,
        state: dict[str, Any],
        *,
        summary: str | None = None,
        error: str | None = None,
    ) -> None:
        """Store a document's final result, and mark it done."""
        state["done"] = True
        meta: dict[str, str] = self.redis.hgetall(run.meta)  # type: ignore[assignment]
        result = DocumentSummary(
            document_id=state["id"],
            provider=meta.get("provider") if summary is not None else None,
            model=meta.get("model") if summary is not None else None,
            chunks=int(state.get("chunks") or 1),
            chunk_sizes=state.get("chunk_sizes") or [],
            levels=int(state["level"]) if summary is not None else 0,
            calls=int(state["calls"]),
            input_tokens=int(state["input_tokens"]),
            output_tokens=int(state["output_tokens"]),
            cost_usd=float(to_usd(state["cost_units"])),
            error=error,
            summary=summary,
        ).model_dump()
        result["realtime_cost_usd"] = float(to_usd(state["realtime_units"]))
        result["cost_units"] = state["cost_units"]
        result["realtime_units"] = state["realtime_units"]
        result["batch_api"] = True
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(run.results, key, _json(result))
        pipe.expire(run.results, RUN_TTL)
        pipe.hset(run.docs, key, _json(state))
        pipe.execute()

    # --- listing and cancelling ----------------------------------------------------

    def cancel(self, batch: str) -> dict[str, Any]:
        """Ask the provider to cancel a batch (by llmq's id or the provider's)."""
        record = find_batch(self.redis, batch)
        if record is None:
            raise LLMQError(f"No batch {batch!r} on record. `llmq batches` lists them.")
        if not record.get("provider_id") or record.get("state") in ENDED_STATES:
            raise LLMQError(
                f"Batch {record['local_id']} is {record.get('state')}; there is nothing to cancel."
            )
        client = self.client(record["provider"])
        status = client.cancel(record["provider_id"])
        keys = keyspace.ProviderBatchKeys(local_id=record["local_id"])
        self.redis.hset(keys.state, mapping={"provider_state": status.provider_state})
        self.schedule(record["local_id"], 0.0)
        return {"batch": record["local_id"], "provider_state": status.provider_state}
