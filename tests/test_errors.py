"""Typed errors cross Celery's JSON result backend with their fields intact."""

from __future__ import annotations

import math
from typing import Any

import pytest

from worker import errors


def round_trip(app: Any, error: Exception) -> Exception:
    """What a producer gets back for `error`, through the backend's JSON codec."""
    backend = app.backend
    stored = backend.decode(backend.encode(backend.prepare_exception(error)))
    rebuilt: Exception = backend.exception_to_python(stored)
    return rebuilt


@pytest.mark.parametrize("retry", ["12.300s", "never"])
def test_rate_limited_error_keeps_its_numbers(app: Any, retry: str) -> None:
    error = errors.RateLimitedError(
        "User u42 is over their token limit. "
        f"[limit=user_tokens usage=98000 requested=2100 limit_value=100000 retry_after={retry}]"
    )
    rebuilt = round_trip(app, error)
    assert isinstance(rebuilt, errors.RateLimitedError) and str(rebuilt) == str(error)
    assert (rebuilt.limit_name, rebuilt.usage, rebuilt.requested, rebuilt.limit) == (
        "user_tokens",
        98000,
        2100,
        100000,
    )
    assert rebuilt.retry_after == (math.inf if retry == "never" else 12.3)


def test_an_older_workers_one_arg_error_is_still_read(app: Any) -> None:
    message = "x [limit=provider_rpm usage=5 requested=1 limit_value=5 retry_after=0.500s]"
    rebuilt = errors.RateLimitedError(*(message,))
    assert rebuilt.limit_name == "provider_rpm" and rebuilt.retry_after == 0.5


def test_schema_and_option_errors_keep_their_fields(app: Any) -> None:
    schema_error = round_trip(
        app, errors.SchemaValidationError("bad", {"errors": ["$.a: fails 'type'"], "attempts": 2})
    )
    assert isinstance(schema_error, errors.SchemaValidationError)
    assert (schema_error.errors, schema_error.attempts, str(schema_error)) == (
        ["$.a: fails 'type'"],
        2,
        "bad",
    )
    option_error = round_trip(
        app,
        errors.UnsupportedOptionError(
            "no", {"options": ["seed"], "provider": "anthropic", "model": "claude-haiku-4-5"}
        ),
    )
    assert isinstance(option_error, errors.UnsupportedOptionError)
    assert (option_error.options, option_error.provider) == (["seed"], "anthropic")
    # A plain one-message error is stored as before: one arg.
    plain = errors.InvalidJobError("just a message")
    assert plain.args == ("just a message",) and str(round_trip(app, plain)) == "just a message"
