"""One exception class per failure kind.

Every class takes a single message argument so Celery's JSON result backend can
rebuild it on the producer side (it stores the class name, module and args).
Messages never quote prompt text, and configured secrets are masked in every one
(a provider may echo the API key in its error body).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.models import Usage


class LLMQError(Exception):
    """Base class of every error llmq raises on purpose."""

    def __init__(self, message: str = "", *args: Any) -> None:
        from worker.secrets import scrub

        super().__init__(scrub(str(message)), *args)


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
    """A global rate limit rejected the job; the message carries the numbers.

    Celery rebuilds this from its message alone, so the numbers are parsed back
    out of it: `limit_name`, `usage`, `requested`, `limit`, `retry_after` (seconds,
    `math.inf` when the job can never fit: `retry_after=never`).
    """

    _FIELDS = re.compile(
        r"\[limit=(?P<limit_name>\S+) usage=(?P<usage>\d+) requested=(?P<requested>\d+) "
        r"limit_value=(?P<limit>\d+) retry_after=(?:(?P<retry_after>[\d.]+)s|never)\]"
    )

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = self._FIELDS.search(message)
        self.limit_name: str | None = found["limit_name"] if found else None
        self.usage: int | None = int(found["usage"]) if found else None
        self.requested: int | None = int(found["requested"]) if found else None
        self.limit: int | None = int(found["limit"]) if found else None
        self.retry_after: float | None = None
        if found:
            seconds = found["retry_after"]
            self.retry_after = math.inf if seconds is None else float(seconds)


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
