"""The baseline: a bare Celery task making the same SDK call, and nothing else."""

from __future__ import annotations

import os
from typing import Any

import openai

from worker.app import app

_client = openai.OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "sk-bench"),
    base_url=os.environ.get("OPENAI_BASE_URL"),
    max_retries=0,
    timeout=30,
)


@app.task(name="bench.bare_complete")  # type: ignore[untyped-decorator]
def bare_complete(*, messages: list[dict[str, str]], model: str = "gpt-4o-mini") -> dict[str, Any]:
    """One chat completion, returned as a dict."""
    response = _client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=64,
        temperature=0.7,
    )
    usage = response.usage.model_dump() if response.usage else None
    return {"text": response.choices[0].message.content, "usage": usage}


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> int:
    """Nothing at all: the cost of a Celery round trip."""
    return 1
