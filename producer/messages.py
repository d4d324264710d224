"""Messages as the official SDKs shape them, made into job data without importing any SDK."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Fields an SDK's response message carries that are not part of a request message.
RESPONSE_ONLY = ("refusal", "annotations", "audio", "function_call", "reasoning")


def job_messages(messages: Iterable[Any]) -> list[Any]:
    """`messages` as JSON data: dicts (TypedDicts) as they are, SDK models dumped.

    A web app can pass the list it already sends its SDK, the model's reply included
    (`response.choices[0].message`); unset fields and response-only ones are left out,
    anything else is sent as it is, for the worker to validate.
    """
    shaped: list[Any] = []
    for message in messages:
        dump = getattr(message, "model_dump", None)
        if callable(dump) and not isinstance(message, Mapping):
            message = dump(exclude_none=True, mode="json")
        if isinstance(message, Mapping):
            message = {
                k: v
                for k, v in message.items()
                if v is not None and not (k in RESPONSE_ONLY and not v)
            }
            if message.get("role") == "assistant" and message.get("tool_calls"):
                message.setdefault("content", None)
        shaped.append(message)
    return shaped
