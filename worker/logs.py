"""Structured JSON logs: one `llm_call` record per attempt, one `llm_job` per job."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from worker import telemetry

call_logger = logging.getLogger("llmq.calls")
job_logger = logging.getLogger("llmq.jobs")
logger = logging.getLogger("llmq")

TRUNCATED_ALERT = "TRUNCATED_RESPONSE"


class UTCJsonFormatter(JsonFormatter):
    """JSON lines with an ISO 8601 UTC `timestamp`."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """Put timestamp, level and logger first, then the record's fields."""
        log_data["timestamp"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)


def configure(*, level: str = "INFO") -> None:
    """Send every log record, Celery's included, to stderr as one JSON line."""
    from worker.privacy import PrivacyFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UTCJsonFormatter("%(message)s"))
    # On the handler, so no record of any logger reaches stderr unfiltered.
    handler.addFilter(PrivacyFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The HTTP clients log every request at INFO: a line per provider call that llm_call
    # already records (and the cost of formatting it on the hot path).
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def log_call(**fields: Any) -> None:
    """One provider attempt."""
    level = logging.ERROR if fields.get("error_kind") == "AuthenticationError" else logging.INFO
    call_logger.log(level, "llm_call", extra={"event": "llm_call", **fields})
    telemetry.on_call(fields)


def log_job(**fields: Any) -> None:
    """One finished (or failed) job."""
    level = logging.WARNING if fields.get("error") or fields.get("alert") else logging.INFO
    job_logger.log(level, "llm_job", extra={"event": "llm_job", **fields})
    telemetry.on_job(fields)
