"""Typed public models: the job a producer sends and the result a worker returns."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated, Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.content import ContentPart, TextPart, part_text
from worker.tools import Tool, ToolCall, ToolChoice

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "other"]

# Far above any model's output limit; anything larger is a typo, not a request.
MAX_TOKENS_CEILING = 200_000
MAX_MESSAGES = 1_000
# Job fields that say how to run a job, not what to answer: a retry may change them.
# `metadata` is tags for the logs: it never reaches a provider, so it decides nothing.
NOT_IN_FINGERPRINT = frozenset({"user_id", "request_id", "cache", "on_limit", "metadata"})
# Job fields added with the sampling options (issue 14): keyed only when set.
SAMPLING_OPTIONS = frozenset(
    {
        "stop",
        "seed",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "reasoning_effort",
        "thinking",
        "response_format",
        "user",
        "metadata",
        # Tools (issue 15), keyed only when set too.
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
# OpenAI's limits on stop sequences and metadata, the strictest of the providers'.
MAX_STOP_SEQUENCES = 4
MAX_METADATA_KEYS = 16
# A 64-bit signed seed, what OpenAI takes.
SEED_BOUND = 2**63


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
    """One chat message: text or content parts; an assistant's tool calls; a tool's result."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    role: Role
    # A string, or parts (text, images, documents); None only beside tool_calls.
    content: StrictStr | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=128)
    tool_call_id: StrictStr | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("content")
    @classmethod
    def _utf8(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(content, list) and not content:
            raise _content_error("an empty list of parts; send at least one part")
        return valid_text(content) if isinstance(content, str) else content

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.content is None and not self.tool_calls:
            raise _content_error("content is missing; only an assistant's tool_calls stand alone")
        if self.tool_calls is not None and self.role != "assistant":
            raise _content_error("only an 'assistant' message has tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise PydanticCustomError(
                "llmq_tool_call",
                "a 'tool' message needs the tool_call_id of the call it answers, and "
                "only a 'tool' message has one",
            )
        if (
            self.role != "user"
            and isinstance(self.content, list)
            and any(not isinstance(p, TextPart) for p in self.content)
        ):
            raise _content_error(
                f"a {self.role!r} message takes text parts only; send images and "
                "documents in a 'user' message"
            )
        return self

    @property
    def text(self) -> str:
        """The message's text: its string, or its parts' text joined."""
        if isinstance(self.content, list):
            return "\n".join(t for t in (part_text(p) for p in self.content) if t)
        return self.content or ""

    @property
    def parts(self) -> list[ContentPart]:
        """The content as parts (a string is one text part)."""
        if isinstance(self.content, list):
            return list(self.content)
        return [TextPart(type="text", text=self.content)] if self.content else []

    @model_serializer(mode="wrap")
    def _plain(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A plain message dumps as it always did, {role, content}: unset tool fields left out.
        data: dict[str, Any] = handler(self)
        for key in ("tool_calls", "tool_call_id"):
            if data.get(key, ...) is None:
                del data[key]
        return data

    def wire(self) -> dict[str, Any]:
        """The message as JSON data, unset fields left out (a plain message: role, content)."""
        return self.model_dump(exclude_none=True)


def _content_error(problem: str) -> PydanticCustomError:
    return PydanticCustomError("llmq_content", problem)


class JsonSchemaSpec(BaseModel):
    """The `json_schema` of a `json_schema` response format, as OpenAI names its parts."""

    # `schema` is a BaseModel attribute, hence the alias; dumped as `schema` always, and
    # read as either, so a job dumped by name (model_dump()) validates again.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # The JSON Schema the answer must validate against; its root must be an object.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = Field(None, max_length=2000)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "its root"
            raise ValueError(
                f"is not a valid JSON Schema (at {where}: fails {exc.validator!r} of the "
                "metaschema); fix the schema, e.g. check it with jsonschema's check_schema"
            ) from None
        if schema.get("type") != "object":
            raise ValueError(
                'must have "type": "object" at its root, as OpenAI and Anthropic require; '
                "wrap a list or a scalar in an object property"
            )
        return schema


class JsonSchemaFormat(BaseModel):
    """`{"type": "json_schema", "json_schema": {name, schema, strict}}`: JSON of that schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class JsonObjectFormat(BaseModel):
    """`{"type": "json_object"}`: any JSON object."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_object"]


ResponseFormat = Annotated[JsonSchemaFormat | JsonObjectFormat, Field(discriminator="type")]


class Thinking(BaseModel):
    """Anthropic extended thinking: tokens the model may think in before it answers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Anthropic's minimum; they come on top of max_tokens, which stays the answer's.
    budget_tokens: StrictInt = Field(ge=1024, le=MAX_TOKENS_CEILING)


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
    # Sampling options: each reaches the provider in its own shape, or the job fails with
    # UnsupportedOptionError when its provider or model cannot honour it.
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-SEED_BOUND, lt=SEED_BOUND)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    reasoning_effort: ReasoningEffort | None = None
    thinking: Thinking | None = None
    # Structured output: the answer is validated and returned parsed.
    response_format: ResponseFormat | None = None
    # The end user, passed on where the API has a field for it (OpenAI's
    # safety_identifier, Anthropic's metadata.user_id); 64 characters is OpenAI's limit.
    user: StrictStr | None = Field(None, min_length=1, max_length=64)
    # Tags for the logs (llm_call, llm_job); never sent to a provider.
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=MAX_METADATA_KEYS)
    # Function calling: JSON-schema tools, which (if any) to call, several at once or not.
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop
        if sequences is None:
            return None
        if not 1 <= len(sequences) <= MAX_STOP_SEQUENCES:
            raise ValueError(f"takes 1 to {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > 200 for s in sequences):
            raise ValueError("every stop sequence must be 1 to 200 characters")
        return [valid_text(s) for s in sequences]

    @field_validator("top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        # Strict floats, yet an int (1, 0) is a number too, as in JSON; a bool is not.
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _tags(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if any(not k or len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise ValueError("keys must be 1 to 64 characters and values at most 512")
        for key, value in metadata.items():
            valid_text(key)
            valid_text(value)
        return metadata

    @field_validator("user")
    @classmethod
    def _end_user(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be a non-blank printable string (no control characters)")
        return value if value is None else valid_text(value)

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must validate against, if the job has one."""
        if isinstance(self.response_format, JsonSchemaFormat):
            return self.response_format.json_schema.schema_
        return None

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("at least one message must have role 'user'")
        if not any(
            has_text(m.text) or any(not isinstance(p, TextPart) for p in m.parts)
            for m in messages
            if m.role == "user"
        ):
            raise ValueError(
                "every 'user' message is empty (whitespace or control characters only); "
                "send the text to complete"
            )
        _check_tool_turns(messages)
        return messages

    @model_validator(mode="after")
    def _tool_options(self) -> CompletionJob:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: every function name must be unique")
        if self.tools is None and (
            self.tool_choice is not None or self.parallel_tool_calls is not None
        ):
            raise ValueError("tool_choice and parallel_tool_calls need tools; send tools too")
        choice = self.tool_choice
        if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
            raise ValueError("tool_choice names a function that is not in tools")
        return self

    @field_validator("user_id", "request_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("must be a non-blank printable string (no control characters)")
        return valid_text(value)

    def options_dump(self, *, exclude: set[str] | frozenset[str]) -> dict[str, Any]:
        """The job's fields as JSON data, the sampling options only when set.

        Unset options are left out, so a job that sets none keeps the fingerprint and
        cache key it had before they existed (a mixed fleet, or a deploy, still agrees).
        """
        dumped = self.model_dump(exclude=set(exclude), by_alias=True)
        return {k: v for k, v in dumped.items() if not (k in SAMPLING_OPTIONS and v is None)}

    def prompt_hash(self) -> str:
        """sha256 of the canonical JSON of the messages: stable across processes."""
        # Planned and logged for every job: hash a long document once, not twice.
        if self._prompt_hash is None:
            self._prompt_hash = prompt_hash(self.messages)
        return self._prompt_hash

    def fingerprint(self) -> str:
        """sha256 of everything that decides the answer: what a request_id is bound to."""
        if self._fingerprint is None:
            options = self.options_dump(exclude={"messages", *NOT_IN_FINGERPRINT})
            canonical = json.dumps(
                [self.prompt_hash(), options], sort_keys=True, separators=(",", ":")
            )
            self._fingerprint = hashlib.sha256(canonical.encode("ascii")).hexdigest()
        return self._fingerprint


def _check_tool_turns(messages: list[Message]) -> None:
    """Every tool message answers a call of the assistant turn just before, every call once."""
    pending: set[str] = set()
    for message in messages:
        if message.role == "tool":
            if message.tool_call_id not in pending:
                raise PydanticCustomError(
                    "llmq_tool_call",
                    "a 'tool' message's tool_call_id matches no unanswered call of the "
                    "assistant message before it; send the id of the call it answers",
                )
            pending.discard(message.tool_call_id)
            continue
        if pending:
            raise PydanticCustomError(
                "llmq_tool_call",
                "an assistant message's tool call has no 'tool' message answering it "
                "before the next turn; answer every call (role 'tool', its tool_call_id)",
            )
        pending = {call.id for call in message.tool_calls or ()}
    if pending:
        raise PydanticCustomError(
            "llmq_tool_call",
            "the last assistant message's tool calls are unanswered; send a 'tool' message "
            "with the result of each before asking for the next answer",
        )


def prompt_hash(messages: list[Message]) -> str:
    """sha256 of the canonical JSON of `messages`."""
    canonical = json.dumps(
        [m.wire() for m in messages],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Usage(BaseModel):
    """Token usage as the provider reported it."""

    model_config = ConfigDict(strict=True)

    # Every input token, cache reads and writes included.
    input_tokens: int = Field(default=0, ge=0)
    # Every output token, reasoning (thinking) tokens included: priced as output.
    output_tokens: int = Field(default=0, ge=0)
    # Of the input: read from the provider's prompt cache (the cache-read rate).
    cached_input_tokens: int = Field(default=0, ge=0)
    # Of the input: written to it (Anthropic; the cache-write rate).
    cache_write_input_tokens: int = Field(default=0, ge=0)
    # Of the output: spent reasoning (OpenAI's completion_tokens_details).
    reasoning_tokens: int = Field(default=0, ge=0)


class Completion(BaseModel):
    """A provider's answer, normalized across providers."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str
    # The model declined to answer (OpenAI's message.refusal, Anthropic's "refusal").
    refusal: str | None = None
    # The answer's JSON value, once validated against the job's schema.
    parsed: Any = None
    # The functions the model called (finish_reason "tool_calls").
    tool_calls: list[ToolCall] = Field(default_factory=list)


class CompletionResult(BaseModel):
    """What `llm.complete` returns (dumped to a dict in the result backend)."""

    request_id: str
    provider: str
    model: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_tokens: int = 0
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
    # A structured-output job's answer as JSON (validated against its schema).
    parsed: Any = None
    # Why the model declined, when it did (then `text` is empty and nothing is parsed).
    refusal: str | None = None
    # The functions the model called, arguments parsed and validated (finish_reason
    # "tool_calls"); None when it called none.
    tool_calls: list[ToolCall] | None = None
    # Last, so Celery's truncated repr of a result still shows every number before it.
    text: str
