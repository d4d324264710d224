"""Map-reduce summarization of one document: split, summarize each part, combine.

A document that fits one call is summarized by that call. A longer one is split by
`worker.chunking`; its parts run as a Celery chord (`llm.batch.part` tasks, then one
`llm.batch.reduce`) on the Redis backend. The reduce step combines the part summaries
in one more call, or, if together they are still too long, splits them and runs
another chord one level up. Nothing here blocks on another task: a task that starts a
chord returns `{"continue": <task id>}` and the producer follows that id.

Failures are values, never exceptions: a part that fails returns a `PartSummary` with
its error, so the chord always reaches the reduce step. The reduce step then reports
the whole document as failed (naming how many parts failed and the first error) and
makes no further call: a summary silently missing part of the document would be worse
than none, and the next run of `llmq summarize` retries the document.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from celery import chord
from celery.exceptions import Retry
from pydantic import BaseModel, Field, ValidationError

from worker import logs
from worker.app import app
from worker.chunking import Chunker, chunk_budget, input_margin
from worker.errors import DocumentTooLargeError, LLMQError, RateLimitedError
from worker.models import CompletionResult, Message
from worker.pipeline import Pipeline
from worker.prices import ModelPrice
from worker.tokens import count_messages

# Job options every batch call passes with its job: THE one place for them. A throttled
# batch call waits for capacity (its task is re-scheduled) instead of failing.
BATCH_JOB_OPTIONS: dict[str, Any] = {"on_limit": "defer"}

# Summaries are for reading, not for creativity; temperature 0 also makes them cacheable.
TEMPERATURE = 0.0
SEPARATOR = "\n\n"
MAX_LEVELS = 8

Complete = Callable[[dict[str, Any]], CompletionResult]
# Called when a rate limit rejects a call: raises to re-schedule the task, or returns
# to let the rejection be reported as the document's error.
OnLimited = Callable[[RateLimitedError, dict[str, Any]], None]


def summarize_instruction(words: int) -> str:
    """The system prompt for a whole document."""
    return f"Summarize the document in about {words} words."


def part_instruction(words: int, index: int, total: int) -> str:
    """The system prompt for one part of a long document."""
    return (
        f"This is part {index} of {total} of a long document. "
        f"Summarize this part in about {words} words."
    )


def combine_instruction(words: int) -> str:
    """The system prompt that merges summaries of consecutive parts."""
    return (
        "These are summaries of consecutive parts of one document, in order. "
        f"Combine them into one summary of the whole document in about {words} words."
    )


def summary_max_tokens(words: int) -> int:
    """Output tokens for a summary of `words` words (English runs ~1.3 tokens a word)."""
    return max(64, 2 * words)


class SummaryJob(BaseModel):
    """What every batch task needs to know about its document."""

    document_id: str = Field(min_length=1, max_length=2000)
    words: int = Field(ge=5, le=5000)
    user_id: str = Field(min_length=1, max_length=200)
    model: str | None = None
    request_id: str = Field(min_length=1, max_length=200)
    chunk_tokens: int | None = Field(None, ge=64)
    # False: never serve or store these summaries in the response cache.
    cache: bool | None = None


class DocumentRequest(SummaryJob):
    """`llm.batch.summarize` kwargs: one document."""

    text: str


class PartRequest(SummaryJob):
    """`llm.batch.part` kwargs: one part of a document, at one level of the reduction."""

    text: str
    index: int = Field(ge=1)
    total: int = Field(ge=1)
    level: int = Field(ge=0)


class Totals(BaseModel):
    """What a document's calls have used so far."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Totals) -> Totals:
        """Both totals together."""
        return Totals(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 10),
        )

    @classmethod
    def of(cls, result: CompletionResult) -> Totals:
        """The usage of one call."""
        return cls(
            calls=1,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost_usd=result.cost_usd,
        )


class PartSummary(BaseModel):
    """`llm.batch.part`'s result: a summary or an error, never an exception."""

    index: int
    provider: str | None = None
    model: str | None = None
    totals: Totals = Field(default_factory=Totals)
    error: str | None = None
    summary: str | None = None


class ReduceState(SummaryJob):
    """`llm.batch.reduce` kwargs: where the reduction stands."""

    level: int = Field(ge=0)
    chunks: int = Field(ge=1)
    chunk_sizes: list[int] = Field(default_factory=list)
    totals: Totals = Field(default_factory=Totals)


class DocumentSummary(BaseModel):
    """A document's final result: its summary, or the error that prevented one."""

    document_id: str
    provider: str | None = None
    model: str | None = None
    chunks: int = 1
    # Tokens of text in each chunk, in order (one entry for a document that fits one call).
    chunk_sizes: list[int] = Field(default_factory=list)
    levels: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    # Last: Celery's truncated repr of a result still shows every number before it.
    summary: str | None = None

    @classmethod
    def failed(
        cls,
        job: SummaryJob,
        error: str,
        *,
        totals: Totals,
        chunks: int = 1,
        chunk_sizes: list[int] | None = None,
    ) -> dict[str, Any]:
        """A failed document's result (as the dict a task returns)."""
        return cls(
            document_id=job.document_id,
            error=error,
            chunks=chunks,
            chunk_sizes=chunk_sizes or [],
            **totals.model_dump(),
        ).model_dump()


def _error(exc: BaseException) -> str:
    """An error as a document's result shows it: never quoting its input."""
    if isinstance(exc, ValidationError):
        # pydantic's own text quotes the input values, which may be document text.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
        )
        return f"InvalidJobError: {problems}"
    if isinstance(exc, LLMQError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (unexpected; see the worker log)"


@dataclass(frozen=True, kw_only=True)
class RunEstimate:
    """An upper bound of what summarizing one document can take, before any call."""

    calls: int
    tokens: int
    cost_usd: Decimal


def estimate_run(
    chunk_tokens: list[int],
    *,
    prompt_tokens: int,
    max_output_tokens: int,
    budget: int,
    price: ModelPrice,
) -> RunEstimate:
    """Every call of the map and reduce levels at its worst case (each summary at max length).

    Level 0 summarizes each chunk; each level up combines the summaries, in groups of at
    most `budget` tokens (greedy packing can take up to twice the minimum number of
    groups, and never more groups than inputs), until one call takes them all.
    """
    margin = input_margin(price)
    calls, tokens, cost = 0, 0, Decimal(0)

    def add(text_tokens: int) -> None:
        nonlocal calls, tokens, cost
        sent = math.ceil((prompt_tokens + text_tokens) * margin)
        calls += 1
        tokens += sent + max_output_tokens
        cost += (sent * price.input + max_output_tokens * price.output) / Decimal(1_000_000)

    for size in chunk_tokens:
        add(size)
    items = len(chunk_tokens)
    per_item = max_output_tokens + 2  # a summary and the blank line joining it to the next
    while items > 1:
        combined = items * per_item
        if combined <= budget:
            add(combined)
            break
        groups = min(items - 1, 2 * math.ceil(combined / budget))
        for _ in range(groups):
            add(min(budget, combined))
        items = groups
    return RunEstimate(calls=calls, tokens=tokens, cost_usd=cost)


class Summarizer:
    """Runs the map and reduce steps of one document against the pipeline."""

    def __init__(
        self, pipeline: Pipeline, complete: Complete, *, on_limited: OnLimited | None = None
    ) -> None:
        self.pipeline = pipeline
        self.complete = complete
        self.on_limited = on_limited

    def model(self, job: SummaryJob) -> str:
        """The model the job's calls go to: its own, else the primary provider's."""
        settings = self.pipeline.settings
        return job.model or settings.model_for(settings.provider)

    def prompt_tokens(self, job: SummaryJob) -> int:
        """The longest instruction any call of this job carries, counted with framing."""
        instructions = (
            summarize_instruction(job.words),
            part_instruction(job.words, 99_999, 99_999),
            combine_instruction(job.words),
        )
        return max(
            count_messages(
                [Message(role="system", content=text), Message(role="user", content="")],
                model=self.model(job),
            )
            for text in instructions
        )

    def max_output(self, job: SummaryJob) -> int:
        """max_tokens of every call: the summary length, capped by the model."""
        price = self.pipeline.prices.get(self.model(job))
        return min(summary_max_tokens(job.words), price.max_output_tokens)

    def token_limit(self, job: SummaryJob) -> tuple[int, str] | None:
        """The smallest token allowance one call must fit, and the setting that sets it."""
        model = self.model(job)
        price = self.pipeline.prices.get(model)
        limits = self.pipeline.limiter.attempt_limits(
            user_id=job.user_id,
            provider=price.provider,
            model=model,
            first=True,
            metered=price.input > 0 or price.output > 0,
        )
        tokens = [(limit.limit, limit.setting) for limit in limits if limit.unit == "tokens"]
        return min(tokens) if tokens else None

    def chunker(self, job: SummaryJob) -> Chunker:
        """The chunker sized for `job`'s model, words, chunk setting and per-call limits."""
        settings = self.pipeline.settings
        model = self.model(job)
        limit = self.token_limit(job)
        budget = chunk_budget(
            self.pipeline.prices.get(model),
            prompt_tokens=self.prompt_tokens(job),
            max_output_tokens=self.max_output(job),
            max_cost_usd=settings.max_cost_per_request,
            configured=job.chunk_tokens or settings.batch_chunk_tokens,
            max_call_tokens=limit[0] if limit else None,
            call_limit_setting=limit[1] if limit else "",
        )
        return Chunker.for_model(model, budget=budget)

    def check_run(self, job: SummaryJob, chunker: Chunker, sizes: list[int]) -> None:
        """Refuse, before any call, a document whose whole run cannot fit the limits in force.

        Its calls would be paid for one by one until the user's token allowance or daily
        budget stopped them, leaving a document without a summary that still cost money.
        """
        settings = self.pipeline.settings
        model = self.model(job)
        price = self.pipeline.prices.get(model)
        run = estimate_run(
            sizes,
            prompt_tokens=self.prompt_tokens(job),
            max_output_tokens=self.max_output(job),
            budget=chunker.budget,
            price=price,
        )
        shape = (
            f"{len(sizes)} chunk{'s' if len(sizes) != 1 else ''} of at most {chunker.budget} "
            f"tokens and {run.calls - len(sizes)} combining call(s)"
        )
        users = [
            limit
            for limit in self.pipeline.limiter.user_limits(job.user_id)
            if limit.unit == "tokens"
        ]
        if (price.input > 0 or price.output > 0) and users and run.tokens > users[0].limit:
            limit = users[0]
            raise DocumentTooLargeError(
                f"Document {job.document_id!r} needs up to {run.tokens} tokens in {run.calls} "
                f"calls ({shape}), more than user {job.user_id!r} may use in {limit.window:g}s: "
                f"{limit.limit} ({limit.setting}). Nothing was called. Fix: raise "
                f"{limit.setting} to at least {run.tokens}, or split the document."
            )
        budget = settings.user_daily_budget_usd
        if budget is not None and run.cost_usd > Decimal(str(budget)):
            raise DocumentTooLargeError(
                f"Document {job.document_id!r} may cost up to ${run.cost_usd:.6f} in "
                f"{run.calls} calls ({shape}), more than the daily budget of ${budget:g} "
                "(LLM_USER_DAILY_BUDGET_USD). Nothing was called. Fix: raise "
                "LLM_USER_DAILY_BUDGET_USD, ask for fewer words, or split the document."
            )

    def call_id(self, job: SummaryJob, suffix: str = "") -> str:
        """A call's request_id: stable across runs, new when anything deciding it changes.

        The configuration decides the answer too (which provider and model the worker
        resolves to, the cache version, --no-cache): a run after a change of any of them
        must get fresh summaries, not the stored answers of the old configuration.
        """
        settings = self.pipeline.settings
        identity = json.dumps(
            [settings.chain, self.model(job), settings.cache_version, job.cache],
            separators=(",", ":"),
        )
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:12]
        return f"{job.request_id}-{digest}{suffix}"

    def call(
        self, job: SummaryJob, instruction: str, text: str, request_id: str
    ) -> CompletionResult:
        """One summary through the full pipeline (guard, limits, cache, providers, logs)."""
        call = {
            "messages": [
                {"role": "system", "content": instruction},
                {"role": "user", "content": text},
            ],
            "user_id": job.user_id,
            "max_tokens": summary_max_tokens(job.words),
            "temperature": TEMPERATURE,
            "request_id": request_id,
            **({"model": job.model} if job.model else {}),
            **({"cache": job.cache} if job.cache is not None else {}),
            **BATCH_JOB_OPTIONS,
        }
        try:
            return self.complete(call)
        except RateLimitedError as exc:
            if self.on_limited is not None:
                self.on_limited(exc, call)  # raises celery's Retry to defer the task
            raise

    def document(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Map step: summarize a document that fits, or start the chord for its parts."""
        try:
            request = DocumentRequest.model_validate(raw)
        except ValidationError as exc:
            return _invalid(raw, exc)
        sizes: list[int] = []
        try:
            chunker = self.chunker(request)
            parts = chunker.split(request.text)
            if not parts:
                return DocumentSummary.failed(
                    request, "The document is empty; nothing to summarize.", totals=Totals()
                )
            sizes = [chunker.count(part) for part in parts]
            self.check_run(request, chunker, sizes)
            if len(parts) == 1:
                result = self.call(
                    request,
                    summarize_instruction(request.words),
                    parts[0],
                    self.call_id(request),
                )
                return DocumentSummary(
                    document_id=request.document_id,
                    summary=result.text,
                    provider=result.provider,
                    model=result.model,
                    chunk_sizes=sizes,
                    **Totals.of(result).model_dump(),
                ).model_dump()
        except LLMQError as exc:
            return DocumentSummary.failed(
                request, _error(exc), totals=Totals(), chunks=len(sizes) or 1, chunk_sizes=sizes
            )
        state = ReduceState(
            **request.model_dump(exclude={"text"}), level=0, chunks=len(parts), chunk_sizes=sizes
        )
        return {"continue": launch(parts, state), "chunks": len(parts)}

    def part(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One part's summary, or its error as a value so the chord still completes."""
        index = raw["index"] if isinstance(raw.get("index"), int) else 0
        try:
            request = PartRequest.model_validate(raw)
            instruction = (
                part_instruction(request.words, request.index, request.total)
                if request.level == 0
                else combine_instruction(request.words)
            )
            result = self.call(
                request,
                instruction,
                request.text,
                self.call_id(request, f"-L{request.level}-P{request.index}"),
            )
        except (LLMQError, ValidationError) as exc:
            return PartSummary(index=index, error=_error(exc)).model_dump()
        except Retry:
            raise  # deferred by a rate limit: the task runs again later
        except Exception as exc:
            # Not an error llmq expects: still a value, so the chord reaches its reduce
            # step and the document is reported failed instead of hanging as a ChordError.
            logs.logger.exception("llm.batch.part failed unexpectedly")
            return PartSummary(index=index, error=_error(exc)).model_dump()
        return PartSummary(
            index=request.index,
            summary=result.text,
            provider=result.provider,
            model=result.model,
            totals=Totals.of(result),
        ).model_dump()

    def reduce(self, results: list[Any], raw: dict[str, Any]) -> dict[str, Any]:
        """Combine the parts' summaries, or go one level up if they are still too long."""
        state = ReduceState.model_validate(raw)
        parts = sorted(
            (PartSummary.model_validate(r) for r in results if isinstance(r, dict)),
            key=lambda p: p.index,
        )
        totals = state.totals
        for part in parts:
            totals = totals.add(part.totals)
        failed = [p for p in parts if p.error is not None or p.summary is None]
        if failed or len(parts) != len(results):
            first = failed[0].error if failed else "a part returned no result"
            return DocumentSummary.failed(
                state,
                f"{len(failed) or len(results) - len(parts)} of {len(results)} parts failed "
                f"(level {state.level}), so the document has no summary. First error: {first}",
                totals=totals,
                chunks=state.chunks,
                chunk_sizes=state.chunk_sizes,
            )
        combined = SEPARATOR.join(p.summary or "" for p in parts)
        try:
            chunker = self.chunker(state)
            if not chunker.fits(combined):
                groups = chunker.split(combined)
                if len(groups) >= len(parts) or state.level + 1 >= MAX_LEVELS:
                    return DocumentSummary.failed(
                        state,
                        f"{len(parts)} part summaries do not shrink into fewer groups of "
                        f"{chunker.budget} tokens (level {state.level}). Fix: ask for fewer "
                        "words or raise LLM_BATCH_CHUNK_TOKENS.",
                        totals=totals,
                        chunks=state.chunks,
                        chunk_sizes=state.chunk_sizes,
                    )
                up = state.model_copy(update={"level": state.level + 1, "totals": totals})
                return {"continue": launch(groups, up), "chunks": state.chunks}
            result = self.call(
                state,
                combine_instruction(state.words),
                combined,
                self.call_id(state, f"-R{state.level}"),
            )
        except LLMQError as exc:
            return DocumentSummary.failed(
                state,
                _error(exc),
                totals=totals,
                chunks=state.chunks,
                chunk_sizes=state.chunk_sizes,
            )
        totals = totals.add(Totals.of(result))
        return DocumentSummary(
            document_id=state.document_id,
            summary=result.text,
            provider=result.provider,
            model=result.model,
            chunks=state.chunks,
            chunk_sizes=state.chunk_sizes,
            levels=state.level + 1,
            **totals.model_dump(),
        ).model_dump()


def launch(parts: list[str], state: ReduceState) -> str:
    """Start the chord of `parts` with its reduce step; returns the reduce task's id."""
    job = state.model_dump(exclude={"level", "chunks", "chunk_sizes", "totals"})
    header = [
        app.signature(
            "llm.batch.part",
            kwargs={**job, "text": text, "index": i, "total": len(parts), "level": state.level},
        )
        for i, text in enumerate(parts, start=1)
    ]
    body = app.signature("llm.batch.reduce", kwargs={"state": state.model_dump()})
    return str(chord(header)(body).id)


def _invalid(raw: dict[str, Any], exc: ValidationError) -> dict[str, Any]:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
    )
    document_id = raw.get("document_id")
    return DocumentSummary(
        document_id=document_id if isinstance(document_id, str) else "?",
        error=f"InvalidJobError: invalid llm.batch.summarize job: {problems}",
    ).model_dump()
