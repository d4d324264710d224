"""Typed public models: the job a producer sends and the result a worker returns."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictStr,
    field_validator,
)

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "other"]

# Far above any model's output limit; anything larger is a typo, not a request.
MAX_TOKENS_CEILING = 200_000
MAX_MESSAGES = 1_000
# Job fields that say how to run a job, not what to answer: a retry may change them.
NOT_IN_FINGERPRINT = frozenset({"user_id", "request_id", "cache", "on_limit"})


def valid_text(value: str) -> str:
    """`value` if it encodes as UTF-8; a lone surrogate is named by position, never quoted."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains an unpaired surrogate (U+{ord(value[exc.start]):04X} at character "
            f"{exc.start}), which is not valid Unicode text; send UTF-8 text"
        ) from None
    return value


def has_text(value: str) -> bool:
    """Whether `value` holds anything but whitespace and control characters (NUL and the like)."""
    return any(ch.isprintable() and not ch.isspace() for ch in value)


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    role: Role
    content: StrictStr

    @field_validator("content")
    @classmethod
    def _utf8(cls, content: str) -> str:
        return valid_text(content)


class CompletionJob(BaseModel):
    """The keyword arguments of `llm.complete`, validated before anything else runs."""

    # Strict: `max_tokens: true`, `temperature: "0.5"` or `cache: "no"` are mistakes to
    # report, not values to coerce; inf and NaN are never a temperature.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    _prompt_hash: str | None = PrivateAttr(default=None)
    _fingerprint: str | None = PrivateAttr(default=None)

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    user_id: StrictStr = Field(min_length=1, max_length=200)
    model: StrictStr | None = Field(None, min_length=1, max_length=200)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    # What to do on finish_reason "length"; None: LLM_ON_TRUNCATION.
    on_truncation: Literal["fail", "retry_larger", "accept"] | None = None
    request_id: StrictStr = Field(
        default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=200
    )
    # None: cache when temperature is 0; True: cache at any temperature; False: never.
    cache: StrictBool | None = None
    # Over the context window: drop the oldest turns (True) instead of failing.
    trim: StrictBool = False
    # When a rate limit is hit: fail now, or defer until it frees up (None: LLM_ON_LIMIT,
    # or LLM_BATCH_ON_LIMIT for jobs on the batch queue).
    on_limit: Literal["fail", "defer"] | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("at least one message must have role 'user'")
        if not any(has_text(m.content) for m in messages if m.role == "user"):
            raise ValueError(
                "every 'user' message is empty (whitespace or control characters only); "
                "send the text to complete"
            )
        return messages

    @field_validator("user_id", "request_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("must be a non-blank printable string (no control characters)")
        return valid_text(value)

    def prompt_hash(self) -> str:
        """sha256 of the canonical JSON of the messages: stable across processes."""
        # Planned and logged for every job: hash a long document once, not twice.
        if self._prompt_hash is None:
            self._prompt_hash = prompt_hash(self.messages)
        return self._prompt_hash

    def fingerprint(self) -> str:
        """sha256 of everything that decides the answer: what a request_id is bound to."""
        if self._fingerprint is None:
            options = self.model_dump(exclude={"messages", *NOT_IN_FINGERPRINT})
            canonical = json.dumps(
                [self.prompt_hash(), options], sort_keys=True, separators=(",", ":")
            )
            self._fingerprint = hashlib.sha256(canonical.encode("ascii")).hexdigest()
        return self._fingerprint


def prompt_hash(messages: list[Message]) -> str:
    """sha256 of the canonical JSON of `messages`."""
    canonical = json.dumps(
        [m.model_dump() for m in messages],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Usage(BaseModel):
    """Token usage as the provider reported it."""

    model_config = ConfigDict(strict=True)

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cached_input_tokens: int = Field(default=0, ge=0)


class Completion(BaseModel):
    """A provider's answer, normalized across providers."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str


class CompletionResult(BaseModel):
    """What `llm.complete` returns (dumped to a dict in the result backend)."""

    request_id: str
    provider: str
    model: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cost_usd: float
    latency_ms: float
    provider_latency_ms: float = 0.0
    queue_wait_ms: float | None = None
    cached: bool = False
    truncated: bool = False
    attempts: int = 1
    messages_dropped: int = 0
    # "worst_case" when an answer's usage was unknown and its reservation was kept as spent.
    charged_as: Literal["usage", "worst_case"] = "usage"
    # Last, so Celery's truncated repr of a result still shows every number before it.
    text: str
