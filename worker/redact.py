"""Summaries of job arguments that are safe to show: no prompt text, no keys."""

from __future__ import annotations

from typing import Any

from worker.models import Message, prompt_hash

SHOWN = ("user_id", "model", "temperature", "max_tokens", "request_id")


def job_repr(kwargs: dict[str, Any]) -> str:
    """A repr of `llm.complete` kwargs with the messages replaced by count and hash."""
    shown = {k: kwargs[k] for k in SHOWN if k in kwargs}
    messages = kwargs.get("messages")
    if isinstance(messages, list):
        try:
            digest = prompt_hash([Message.model_validate(m) for m in messages])[:16]
        except ValueError:
            digest = "invalid"
        shown["messages"] = f"<{len(messages)} messages sha256:{digest}>"
    elif messages is not None:
        shown["messages"] = f"<{type(messages).__name__}>"
    hidden = sorted(set(kwargs) - set(SHOWN) - {"messages"})
    if hidden:
        shown["other"] = f"<{', '.join(hidden)}>"
    return repr(shown)
