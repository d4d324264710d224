"""Flower for llmq: runtime buckets sized for LLM calls, and results without their text.

`flowerconfig.py` at the repository root (Flower reads it from its working directory)
calls `install()`. Task events never carry prompt or completion text (the worker
redacts them), but Flower also reads results straight from the result backend for
`/api/task/result/<id>` and `/api/task/apply/<name>`; those are reduced here.
"""

from __future__ import annotations

from typing import Any

# Seconds: LLM calls take from a fraction of a second to minutes.
RUNTIME_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]


def install() -> None:
    """Make Flower's API return results with their counting fields only."""
    from flower.api.tasks import BaseTaskHandler

    from worker.privacy import result_repr
    from worker.secrets import scrub

    if getattr(BaseTaskHandler, "_llmq_private", False):
        return

    def update_response_result(self: Any, response: dict[str, Any], result: Any) -> None:
        response["result"] = result_repr(result.result)
        if result.state == "FAILURE":
            response["traceback"] = scrub(str(result.traceback or ""))

    BaseTaskHandler.update_response_result = update_response_result
    BaseTaskHandler._llmq_private = True
