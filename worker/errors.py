"""One exception class per failure kind.

Every class takes a message and, optionally, a JSON-able dict of its fields, both kept
in `args`: Celery's JSON result backend stores the class name, module and args, and
rebuilds the error on the producer side as `cls(*args)`, so the fields arrive intact.
Messages never quote prompt text, and configured secrets are masked in every one
(a provider may echo the API key in its error body).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.models import Usage


class LLMQError(Exception):
    """Base class of every error llmq raises on purpose."""

    def __init__(self, message: str = "", details: Mapping[str, Any] | None = None) -> None:
        from worker.secrets import scrub

        # The fields travel as the second arg, and only when there are any, so an error
        # stored by a worker of an older release (one arg) is rebuilt the same way.
        self.details: dict[str, Any] = dict(details or {})
        if self.details:
            super().__init__(scrub(str(message)), self.details)
        else:
            super().__init__(scrub(str(message)))

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigurationError(LLMQError):
    """Settings are missing or invalid; raised at start-up."""


class InvalidJobError(LLMQError):
    """The job's input is invalid; it was rejected before any provider call."""


class UnknownModelError(InvalidJobError):
    """The job names a model with no price or context window on record."""


class BudgetExceededError(LLMQError):
    """The job's estimated cost is over a per-request or per-user budget."""


class DailyBudgetExceededError(BudgetExceededError):
    """The user's spend today, plus jobs in flight, plus this job's worst case is over budget."""


class ContextWindowExceededError(InvalidJobError):
    """The prompt plus max_tokens does not fit the model's context window."""


class RateLimitedError(LLMQError):
    """A global rate limit rejected the job; `limit_name`, `usage`, `requested`, `limit`
    and `retry_after` (seconds, `math.inf` when the job can never fit) say which and when.

    Built from a message that ends with their tag (worker/limits.py writes it), the fields
    also travel as a dict beside the message, so the result backend rebuilds them as they
    were; an error from an older worker (message only) is parsed as before.
    """

    _FIELDS = re.compile(
        r"\[limit=(?P<limit_name>\S+) usage=(?P<usage>\d+) requested=(?P<requested>\d+) "
        r"limit_value=(?P<limit>\d+) retry_after=(?:(?P<retry_after>[\d.]+)s|never)\]"
    )

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        if details is None:
            found = self._FIELDS.search(message)
            details = (
                {
                    "limit_name": found["limit_name"],
                    "usage": int(found["usage"]),
                    "requested": int(found["requested"]),
                    "limit": int(found["limit"]),
                    # JSON has no infinity: a job that can never fit says so.
                    "retry_after": None
                    if found["retry_after"] is None
                    else float(found["retry_after"]),
                    "never": found["retry_after"] is None,
                }
                if found
                else {}
            )
        super().__init__(message, details)
        self.limit_name: str | None = self.details.get("limit_name")
        self.usage: int | None = self.details.get("usage")
        self.requested: int | None = self.details.get("requested")
        self.limit: int | None = self.details.get("limit")
        self.retry_after: float | None = (
            math.inf if self.details.get("never") else self.details.get("retry_after")
        )


class JobInProgressError(LLMQError):
    """Another delivery of the same request_id is still running; its result will follow."""


class IdempotencyConflictError(InvalidJobError):
    """The request_id was first used with a different request; it is never re-bound."""


class TaskIdConflictError(InvalidJobError):
    """The message's task id belongs to another user's job; running it would overwrite theirs."""


class DocumentTooLargeError(InvalidJobError):
    """A batch document needs more than the limits in force allow; nothing was called."""


class StateUnavailableError(LLMQError):
    """Redis, where budgets, limits and results live, could not be reached; nothing was called."""


class UnexpectedError(LLMQError):
    """llmq hit an error it does not expect; the message names its type, never its text."""


class UnsupportedOptionError(InvalidJobError):
    """The job asks for an option its provider or model cannot honour; nothing was called.

    Fields: `options` (the option names), `provider`, `model`.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.options: list[str] = list(self.details.get("options", []))
        self.provider: str | None = self.details.get("provider")
        self.model: str | None = self.details.get("model")


class InvalidContentError(InvalidJobError):
    """A message's content part is malformed (unknown type, bad base64, unsupported media
    type, data that is not what it claims) or one its provider cannot take; nothing was called.
    """


class ContentTooLargeError(InvalidContentError):
    """An image, a document or a job's media is over a size limit; nothing was called.

    Fields: `size_bytes`, `limit_bytes`, `setting` (what sets the limit).
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.size_bytes: int | None = self.details.get("size_bytes")
        self.limit_bytes: int | None = self.details.get("limit_bytes")
        self.setting: str | None = self.details.get("setting")


class ToolCallMismatchError(InvalidJobError):
    """A tool message answers no call of the assistant turn before it, or a call goes
    unanswered; nothing was called."""


class ToolCallValidationError(LLMQError):
    """The model called a tool with arguments that do not validate against its schema.

    Fields: `errors` (where and which keyword failed, never the arguments). The answer
    was charged.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.errors: list[str] = list(self.details.get("errors", []))


class SchemaValidationError(LLMQError):
    """The answer did not validate against the job's JSON schema, even after one re-ask.

    Fields: `errors` (where and how the last answer failed, never its values), `attempts`.
    Every answer was charged.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.errors: list[str] = list(self.details.get("errors", []))
        self.attempts: int = int(self.details.get("attempts", 0))


class RefusalError(LLMQError):
    """The model declined to answer, so there is nothing to parse (producer side).

    Fields: `refusal` (the model's words), `request_id`.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.refusal: str | None = self.details.get("refusal")
        self.request_id: str | None = self.details.get("request_id")


class TruncatedResponseError(LLMQError):
    """The provider stopped at max_tokens and the job's policy is to fail."""


class ProviderError(LLMQError):
    """A provider call failed; `transient` says whether a retry may succeed."""

    transient = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        retry_after: float | None = None,
        answered: bool = False,
        usage: Usage | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.retry_after = retry_after
        # The provider produced an answer (billed), with this usage if it could be read.
        self.answered = answered or usage is not None
        self.usage = usage
        # False when the request never left (connection refused): nothing can be billed.
        self.sent = sent


class RateLimitedByProviderError(ProviderError):
    """The provider answered 429."""

    transient = True


class ProviderUnavailableError(ProviderError):
    """The provider answered 408, 409, 5xx or 529 (overloaded)."""

    transient = True


class ProviderTimeoutError(ProviderError):
    """The call ran past its timeout."""

    transient = True


class ProviderConnectionError(ProviderError):
    """The provider could not be reached, or the connection broke before its answer."""

    transient = True


class AuthenticationError(ProviderError):
    """The provider refused the API key (401/403); retrying cannot help."""


class ProviderRequestError(ProviderError):
    """The provider rejected the request (400/404/422); retrying cannot help."""


class MalformedResponseError(ProviderError):
    """The provider answered with something that is not a usable completion."""


class CircuitOpenError(ProviderError):
    """The provider's shared circuit is open: it failed too often and is cooling down."""


class AllProvidersFailedError(LLMQError):
    """Every provider in the chain failed; the message lists each last error."""


class DeadlineExceededError(AllProvidersFailedError):
    """The job ran out of its overall deadline (LLM_JOB_DEADLINE_SECONDS) before any answer."""


class BatchRequestFailedError(LLMQError):
    """One request of a provider batch failed; the message is the provider's own."""


class BatchNotRunError(LLMQError):
    """A provider batch ended (expired, failed, cancelled) before running this request."""


class BatchAmbiguousError(LLMQError):
    """A batch's creation was interrupted and the provider's list cannot say if it exists."""
