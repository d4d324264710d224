"""What Celery, its events and Flower may show of a job: never a prompt, a completion or a key.

Privacy is a property of the worker, not of the producer: a job sent by any Celery
app carries its sender's `argsrepr`/`kwargsrepr`, which hold the whole prompt. The
worker's request class replaces them before anything logs or emits them, its task
events carry results without their text, and a log filter hides the return values,
bodies and secrets that Celery formats into its own records.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from celery.app.amqp import AMQP
from celery.worker.request import Request

from worker.constants import TASK_PREFIX
from worker.secrets import scrub, scrub_value

MARK = "<llmq "
HIDDEN = "<hidden>"
# Job and batch fields shown as they are: ids, knobs and counts, never content.
SHOWN_FIELDS = (
    "user_id",
    "request_id",
    "model",
    "temperature",
    "max_tokens",
    "document_id",
    "words",
    "index",
    "total",
    "level",
    "chunks",
    "chunk_tokens",
)
# Result fields shown in events and logs; `text` and `summary` never are.
RESULT_FIELDS = (
    "request_id",
    "document_id",
    "provider",
    "model",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "latency_ms",
    "provider_latency_ms",
    "queue_wait_ms",
    "cached",
    "truncated",
    "attempts",
    "chunks",
    "levels",
    "calls",
    "continue",
)
_SCALAR = r"'[^'\\]{0,300}'|-?[\d.]+(?:e[-+]?\d+)?|True|False|None"
_RESULT_FIELD = re.compile(rf"'({'|'.join(RESULT_FIELDS)})': ({_SCALAR})(?=[,}}])")
_CONTENT_LOGS = (
    "Received unregistered task",
    "Received invalid task message",
    "Can't decode message body",
)
MAX_SHOWN = 200


def _shown(value: object) -> str:
    if isinstance(value, str):
        return scrub(repr(value[:MAX_SHOWN]))
    if value is None or isinstance(value, (int, float, bool)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _describe(name: str, value: object) -> str:
    if name == "messages" and isinstance(value, list):
        return f"<{len(value)} messages>"
    if name in ("text", "summary") and isinstance(value, str):
        return f"<{len(value)} chars>"
    if name == "parts" and isinstance(value, list):
        return f"<{len(value)} part results>"
    return f"<{type(value).__name__}>"


def fields_repr(values: Mapping[str, Any]) -> str:
    """`<llmq k=v ...>`: the safe fields of a job as they are, the rest by size or type only."""
    items = []
    for key in sorted(values, key=lambda k: (k not in SHOWN_FIELDS, str(k))):
        value = values[key]
        if key in SHOWN_FIELDS and (value is None or isinstance(value, (str, int, float, bool))):
            items.append(f"{key}={_shown(value)}")
        elif key == "state" and isinstance(value, Mapping):
            items.append(f"state={fields_repr(value)}")
        else:
            items.append(f"{scrub(str(key))[:60]}={_describe(str(key), value)}")
    return MARK + " ".join(items) + ">"


def args_repr(task: str, args: Any, kwargs: Any) -> tuple[str, str]:
    """The (argsrepr, kwargsrepr) Celery may show for an llm.* message."""
    if not task.startswith(TASK_PREFIX):
        return repr(args), repr(kwargs)
    positional = list(args) if isinstance(args, (list, tuple)) else [args]
    shown_args = "()" if not positional else f"{MARK}{_describe('parts', positional[0])}>"
    shown_kwargs = fields_repr(kwargs) if isinstance(kwargs, Mapping) else f"{MARK}{HIDDEN}>"
    return shown_args, shown_kwargs


def result_repr(value: object) -> str:
    """A task result, or Celery's repr of one, reduced to its counting fields."""
    if isinstance(value, Mapping):
        kept = {k: value[k] for k in RESULT_FIELDS if k in value}
        value = repr(kept)
    if not isinstance(value, str):
        return f"{MARK}{HIDDEN}>"
    # Celery truncates long reprs, so the fields are read one by one, not parsed whole;
    # only the result's own: a key inside tool arguments, a parsed answer or a text
    # (`{'provider': ...}` in a tool call) is content, not a field.
    top = _top_level(value)
    kept_fields = [
        f"{found[1]}={scrub(found[2])}"
        for found in _RESULT_FIELD.finditer(value)
        if found.start() in top
    ]
    return MARK + " ".join(kept_fields or [HIDDEN]) + ">"


def _top_level(text: str) -> set[int]:
    """Positions of `text` (a dict's repr) where a top-level key may start."""
    positions: set[int] = set()
    depth, quote, escaped = 0, "", False
    for index, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            continue
        if char in "'\"":
            if depth == 1:
                positions.add(index)
            quote = char
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
    return positions


def is_redacted(text: object) -> bool:
    """Whether `text` is a repr this module made (or an empty argument list)."""
    return isinstance(text, str) and (text.startswith(MARK) or text in ("()", "{}", "[]"))


class PrivateAMQP(AMQP):  # type: ignore[misc]
    """Messages llmq publishes (submit, retries, chords) carry redacted reprs from the start.

    Celery builds a message's `argsrepr`/`kwargsrepr` and its task-sent event here,
    before any publish signal runs, so this is where they must be made safe.
    """

    def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Celery's message, with safe reprs for llm.* tasks."""
        if str(name).startswith(TASK_PREFIX):
            positional = kwargs.get("args", args[0] if args else ())
            keywords = kwargs.get("kwargs", args[1] if len(args) > 1 else {})
            kwargs["argsrepr"], kwargs["kwargsrepr"] = args_repr(
                name, positional or (), keywords or {}
            )
        return super().as_task_v2(task_id, name, *args, **kwargs)


class PrivateRequest(Request):  # type: ignore[misc]
    """A request whose reprs and events never carry prompt or completion text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shown_args, shown_kwargs = args_repr(self._type, self._args, self._kwargs)
        self._argsrepr, self._kwargsrepr = shown_args, shown_kwargs
        # The tracer logs what the message's headers say, unless we overwrite them here.
        self._request_dict["argsrepr"] = shown_args
        self._request_dict["kwargsrepr"] = shown_kwargs

    def send_event(self, type: str, **fields: Any) -> None:
        """Emit the event with results reduced and every secret masked."""
        if "result" in fields:
            fields["result"] = result_repr(fields["result"])
        for name in ("args", "kwargs"):
            if name in fields and not is_redacted(fields[name]):
                fields[name] = f"{MARK}{HIDDEN}>"
        super().send_event(type, **scrub_value(fields))


class PrivacyFilter(logging.Filter):
    """Hides what Celery's own records would show of an llm.* job, and every secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drop it."""
        args = record.args
        if isinstance(args, dict) and str(args.get("name", "")).startswith(TASK_PREFIX):
            context = dict(args)
            if "return_value" in context:
                context["return_value"] = result_repr(context["return_value"])
            for key in ("args", "kwargs"):
                if key in context and not is_redacted(context[key]):
                    context[key] = f"{MARK}{HIDDEN}>"
            record.args = context
            if isinstance(getattr(record, "data", None), dict):
                record.data = context
        elif (
            isinstance(args, tuple)
            and isinstance(record.msg, str)
            and record.msg.startswith(_CONTENT_LOGS)
        ):
            # A message llmq cannot run: its type and error, never its body or headers.
            record.args = (args[0], *([HIDDEN] * (len(args) - 1))) if args else args
        _scrub_record(record)
        return True


def _scrub_record(record: logging.LogRecord) -> None:
    """Mask secrets in the message, its arguments, the traceback and every extra field."""
    message = record.getMessage()
    scrubbed = scrub(message)
    if scrubbed != message:
        record.msg, record.args = scrubbed, ()
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = scrub(record.exc_text)
    for key, value in list(vars(record).items()):
        if key not in _STANDARD and isinstance(value, (str, dict, list, tuple)):
            setattr(record, key, scrub_value(value))


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
