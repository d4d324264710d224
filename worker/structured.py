"""Structured outputs: an answer validated against the job's JSON schema, re-asked once.

An answer that is not JSON, or does not validate, is sent back to the same model once
with what is wrong (the re-ask is a provider attempt like any other: admitted, charged,
counted in `attempts`); if that one fails too, the job fails with SchemaValidationError
carrying the errors. The errors name where in the answer and which schema keyword
failed, never the answer's values, which may echo the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jsonschema import ValidationError
from jsonschema.validators import validator_for

from worker.errors import LLMQError, SchemaValidationError
from worker.guard import CostGuard, Estimate
from worker.models import Message
from worker.resilience import Outcome

Retry = Callable[[Estimate], Outcome]
# The most errors reported (to the model and in the exception).
MAX_ERRORS = 10
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def problems(text: str, schema: dict[str, Any]) -> tuple[Any, list[str]]:
    """The answer's JSON value and what is wrong with it against `schema` ([] if nothing)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        # json's message gives a position only, never the text.
        reason = str(exc).split(":", 1)[0]
        return None, [f"the answer is not JSON ({reason} at line {getattr(exc, 'lineno', 1)})"]
    validator = validator_for(schema)(schema)
    found = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    return value, [describe(error) for error in found[:MAX_ERRORS]]


def describe(error: ValidationError) -> str:
    """Where and why an answer fails its schema, quoting the schema, not the answer."""
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    required = error.validator_value
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = (
            [k for k in required if k not in error.instance] if isinstance(required, list) else []
        )
        return f"{where}: missing required properties {missing}"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        return f"{where}: has properties the schema does not allow (additionalProperties)"
    rule = json.dumps(error.validator_value, ensure_ascii=False)
    if len(rule) > 200:
        rule = rule[:197] + "..."
    return f"{where}: fails {error.validator!r} ({rule})"


def reask(errors: list[str]) -> str:
    """The message that sends the errors back to the model."""
    return (
        "Your previous answer does not validate against the required JSON schema:\n- "
        + "\n- ".join(errors)
        + "\nAnswer again with only the corrected JSON, valid against the schema."
    )


class SchemaEnforcer:
    """Validates a structured answer, re-asks once, or fails with SchemaValidationError."""

    def __init__(self, guard: CostGuard) -> None:
        self.guard = guard

    def enforce(self, outcome: Outcome, *, estimate: Estimate, retry: Retry) -> Outcome:
        """The outcome with `parsed` set, after at most one re-ask; raises if both fail."""
        options = estimate.options
        if options.response_format is None:
            return outcome
        completion = outcome.completion
        # A refusal is returned as one; a truncated answer (accepted) is not complete JSON.
        if completion.refusal is not None or completion.finish_reason == "length":
            return outcome
        schema = options.schema if options.schema is not None else ANY_OBJECT
        value, errors = problems(completion.text, schema)
        if not errors:
            return _parsed(outcome, value)
        messages: list[Message] = [
            *estimate.messages,
            Message(role="assistant", content=completion.text or "(no answer)"),
            Message(role="user", content=reask(errors)),
        ]
        try:
            larger = self.guard.check(
                messages,
                model=estimate.model,
                max_tokens=estimate.answer_tokens,
                options=options,
            )
        except LLMQError as exc:
            raise self.failed(errors, attempts=len(outcome.attempts), why=str(exc)) from None
        again = retry(larger)
        merged = Outcome(
            provider=again.provider,
            model=again.model,
            completion=again.completion,
            attempts=[*outcome.attempts, *again.attempts],
            discarded=[*outcome.discarded, outcome.completion, *again.discarded],
        )
        if again.completion.refusal is not None:
            return merged
        value, errors = problems(again.completion.text, schema)
        if not errors:
            return _parsed(merged, value)
        raise self.failed(errors, attempts=len(merged.attempts))

    def failed(self, errors: list[str], *, attempts: int, why: str = "") -> SchemaValidationError:
        """The error of an answer that did not validate, with its errors as fields."""
        again = (
            f"the re-ask was not allowed: {why}"
            if why
            else "and again after one re-ask with the errors"
        )
        return SchemaValidationError(
            f"The answer does not validate against the job's JSON schema, {again} "
            f"({len(errors)} error{'s' if len(errors) != 1 else ''}: {'; '.join(errors)}). "
            "Every answer was charged. Fix: simplify the schema, describe the fields in the "
            "prompt, use a model with native structured outputs, or raise max_tokens.",
            {"errors": errors, "attempts": attempts},
        )


def _parsed(outcome: Outcome, value: Any) -> Outcome:
    completion = outcome.completion.model_copy(update={"parsed": value})
    return Outcome(
        provider=outcome.provider,
        model=outcome.model,
        completion=completion,
        attempts=outcome.attempts,
        discarded=outcome.discarded,
    )
