"""Function calling: a job's tools, its tool choice and the model's tool calls.

A job's tools are JSON-schema function definitions in OpenAI's shape (Anthropic's
`{name, description, input_schema}` is read too). llmq translates them, the choice and
the calls both ways, so a job falls back from OpenAI to Anthropic with the same tools.
The calls an answer makes are parsed and validated against their tool's schema; errors
say where and which keyword failed, never the arguments, which are prompt content.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from worker.errors import ToolCallValidationError

TOOL_NAME = r"^[A-Za-z0-9_-]+$"
# OpenAI's limit on tools per request (Anthropic's is higher).
MAX_TOOLS = 128
# Tokens a request's tools cost beyond their JSON text: Anthropic documents a tool-use
# system prompt of 313-346 tokens; OpenAI publishes none, and its compact rendering of
# a definition is shorter than the JSON counted, so a few per tool cover the framing.
TOOLS_OVERHEAD_TOKENS = {"anthropic": 350}
DEFAULT_TOOLS_OVERHEAD = 12
TOKENS_PER_TOOL = 8
MAX_ERRORS = 10


class FunctionDef(BaseModel):
    """A function the model may call: its name, what it does, its JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: StrictStr = Field(min_length=1, max_length=64, pattern=TOOL_NAME)
    description: StrictStr | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "its root"
            raise ValueError(
                f"is not a valid JSON Schema (at {where}: fails {exc.validator!r} of the "
                "metaschema); fix the tool's parameters"
            ) from None
        if schema.get("type") != "object":
            raise ValueError('must have "type": "object" at its root, as both APIs require')
        return schema


class Tool(BaseModel):
    """`{"type": "function", "function": {name, description, parameters, strict}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["function"]
    function: FunctionDef

    @model_validator(mode="before")
    @classmethod
    def _anthropic_shape(cls, value: Any) -> Any:
        # Anthropic's {name, description, input_schema}: the same definition.
        if isinstance(value, dict) and "input_schema" in value and "type" not in value:
            function = {"name": value.get("name"), "parameters": value["input_schema"]}
            if value.get("description") is not None:
                function["description"] = value["description"]
            extra = set(value) - {"name", "description", "input_schema"}
            return {"type": "function", "function": function, **{k: value[k] for k in extra}}
        return value


class FunctionName(BaseModel):
    """`{"name": ...}` of a named tool choice."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: StrictStr = Field(min_length=1, max_length=64, pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: call this function."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ToolCall(BaseModel):
    """One call of a function: in an assistant message, and in a result's `tool_calls`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: StrictStr = Field(min_length=1, max_length=200)
    name: StrictStr = Field(min_length=1, max_length=64, pattern=TOOL_NAME)
    # The arguments as parsed JSON: an object, as both APIs send them.
    arguments: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _openai_shape(cls, value: Any) -> Any:
        # The OpenAI SDK's {"id", "type": "function", "function": {"name", "arguments"}},
        # its arguments a JSON string: read as the same call.
        if isinstance(value, dict) and isinstance(value.get("function"), dict):
            if value.get("type", "function") != "function":
                raise ValueError("only function tool calls are supported (type 'function')")
            function = value["function"]
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments or "{}")
                except ValueError:
                    raise ValueError(
                        "function.arguments is not valid JSON; send the arguments the "
                        "model returned, unchanged"
                    ) from None
            return {"id": value.get("id"), "name": function.get("name"), "arguments": arguments}
        return value

    def openai(self) -> dict[str, Any]:
        """The call in an OpenAI assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }

    def anthropic(self) -> dict[str, Any]:
        """The call as an Anthropic `tool_use` block."""
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": self.arguments}


def received(call_id: object, name: object, arguments: object) -> ToolCall:
    """A call as a provider sent it, unvalidated (`check_calls` validates it after the chain)."""
    if isinstance(arguments, str):
        # Unparseable arguments stay a string: check_calls reports them, unquoted.
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments or "{}")
    return ToolCall.model_construct(
        id=str(call_id or ""), name=str(name or ""), arguments=arguments
    )


def openai_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The tools in OpenAI's shape (also Gemini's and vLLM's)."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


def openai_tool_choice(choice: ToolChoice) -> Any:
    """The tool choice in OpenAI's shape."""
    return choice if isinstance(choice, str) else choice.model_dump()


def anthropic_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The tools in Anthropic's shape."""
    shaped = []
    for tool in tools:
        definition: dict[str, Any] = {
            "name": tool.function.name,
            "input_schema": tool.function.parameters,
        }
        if tool.function.description is not None:
            definition["description"] = tool.function.description
        shaped.append(definition)
    return shaped


def anthropic_tool_choice(
    choice: ToolChoice | None, parallel: bool | None
) -> dict[str, Any] | None:
    """The tool choice in Anthropic's shape, with `disable_parallel_tool_use` when asked."""
    if choice is None and parallel is None:
        return None
    shaped: dict[str, Any]
    if choice is None or choice == "auto":
        shaped = {"type": "auto"}
    elif choice == "required":
        shaped = {"type": "any"}
    elif choice == "none":
        # Anthropic's "none" takes no parallel flag: no call, nothing in parallel.
        return {"type": "none"}
    else:
        assert not isinstance(choice, str)
        shaped = {"type": "tool", "name": choice.function.name}
    if parallel is not None:
        shaped["disable_parallel_tool_use"] = not parallel
    return shaped


def tools_text(tools: tuple[Tool, ...]) -> str:
    """The canonical JSON of the definitions, as counted by the cost guard."""
    return json.dumps(
        openai_tools(tools), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def check_calls(calls: list[ToolCall], tools: Sequence[Tool] | None) -> None:
    """Nothing, or ToolCallValidationError saying which call fails and where."""
    if not calls:
        return
    from worker.structured import describe

    schemas = {tool.function.name: tool.function.parameters for tool in tools or ()}
    errors: list[str] = []
    for index, call in enumerate(calls):
        where = f"tool_calls[{index}]"
        if not call.id:
            errors.append(f"{where}: has no id")
        schema = schemas.get(call.name)
        if schema is None:
            errors.append(f"{where}: calls a function the job does not define")
            continue
        if not isinstance(call.arguments, dict):
            errors.append(f"{where} ({call.name}): arguments are not a JSON object")
            continue
        validator = validator_for(schema)(schema)
        found = sorted(validator.iter_errors(call.arguments), key=lambda e: list(e.absolute_path))
        errors += [f"{where} ({call.name}): {describe(e)}" for e in found[:MAX_ERRORS]]
    if errors:
        raise ToolCallValidationError(
            f"The model's tool call does not validate against its tool's schema "
            f"({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
            + "; ".join(errors[:MAX_ERRORS])
            + ". The answer was charged. Fix: tighten the tool's description or schema "
            "(strict: true on OpenAI), or resubmit.",
            {"errors": errors[:MAX_ERRORS]},
        )
