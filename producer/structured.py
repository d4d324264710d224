"""Structured results on the producer side: a strict schema from a Pydantic model, and back."""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from worker.errors import RefusalError

M = TypeVar("M", bound=BaseModel)
_NAME = re.compile(r"[^A-Za-z0-9_-]")


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema in the strict form OpenAI and Anthropic require.

    Every object closes (`additionalProperties: false`) and lists all its properties as
    required (an optional field is still sent, as null); defaults are dropped, since
    strict mode does not take them and the model fills its own on validation.
    """
    schema: dict[str, Any] = _strict(model.model_json_schema())
    return schema


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs"):
            # Names, not keywords: a property may well be called "default".
            out[key] = {name: _strict(schema) for name, schema in value.items()}
        elif key != "default":
            out[key] = _strict(value)
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
        out["required"] = list(out["properties"])
    return out


def response_format_for(model: type[BaseModel]) -> dict[str, Any]:
    """The job's `response_format` for answers that validate as `model`."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": _NAME.sub("_", model.__name__)[:64] or "answer",
            "schema": strict_schema(model),
            "strict": True,
        },
    }


class ParsedResult(Generic[M]):
    """A job's handle (Celery's AsyncResult, or a CachedResult) that also parses its answer."""

    def __init__(self, handle: Any, response_model: type[M]) -> None:
        self.handle = handle
        self.response_model = response_model

    @property
    def id(self) -> str:
        """The task id."""
        return str(self.handle.id)

    def get(self, timeout: float | None = None, **options: Any) -> Any:
        """The result dict, as `AsyncResult.get` returns it (raises the job's typed error)."""
        return self.handle.get(timeout=timeout, **options)

    def get_parsed(self, timeout: float | None = None) -> M:
        """The answer as a `response_model` instance; RefusalError if the model declined."""
        result = self.get(timeout=timeout)
        if result.get("refusal") is not None:
            raise RefusalError(
                f"The model declined to answer: {result['refusal']}",
                {"refusal": result["refusal"], "request_id": result.get("request_id")},
            )
        return self.response_model.model_validate(result["parsed"])

    def __getattr__(self, name: str) -> Any:
        # ready(), state, successful(), forget()...: the handle's own.
        return getattr(self.handle, name)

    def __repr__(self) -> str:
        return f"<ParsedResult[{self.response_model.__name__}]: {self.id}>"
