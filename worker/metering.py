"""Admitting and charging each provider call: the budget and the limits before, the bill after.

Every attempt is a request the provider sees, and every answer it gives is billed, so
both ledgers (the user's daily spend and the rate-limit windows) work per attempt, not
per job: an attempt is admitted by the budget and by the limits of the provider it goes
to before it is sent, and settled as soon as it returns, before the job can fail for
any other reason (a truncated answer, a malformed one, the next provider's error).

How an attempt is settled:
- an answer with usage: charged at that usage;
- an answer whose usage cannot be read, or a timeout or broken connection after the
  request was sent: the worst case it reserved is kept as spent (`charged_as:
  "worst_case"`), because the provider may well have billed it;
- an error status (429, 5xx, 4xx) or a connection that never opened: nothing is spent,
  and only the request stays counted against the provider's requests-per-minute.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import redis

from worker.errors import (
    DailyBudgetExceededError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
)
from worker.guard import Estimate
from worker.limits import Limit, LimitReservation, RateLimiter
from worker.models import Completion, Usage
from worker.scripts import Part, Settlement
from worker.spend import BudgetReservation, SpendTracker

ChargedAs = Literal["usage", "worst_case"]
logger = logging.getLogger("llmq")


@dataclass(frozen=True, kw_only=True)
class Charge:
    """What one provider answer cost: its reported usage, or the worst case it reserved."""

    provider: str
    model: str
    usage: Usage
    cost_usd: Decimal
    charged_as: ChargedAs


@dataclass(kw_only=True)
class Ticket:
    """One admitted attempt: what it holds until it is settled."""

    provider: str
    estimate: Estimate
    budget: BudgetReservation | None
    limits: LimitReservation | None
    settled: bool = False
    # False for the job's first attempt until the chain takes it: never sent if not taken.
    taken: bool = True


@dataclass(kw_only=True)
class Prepared:
    """An attempt's admission, to run inside the job's admission script."""

    ticket: Ticket
    parts: list[Part]
    limits: list[Limit]
    tokens: int


class AdmissionRejected(Exception):
    """The budget or a rate limit refused an attempt; `error` says which and why."""

    def __init__(self, error: RateLimitedError | DailyBudgetExceededError) -> None:
        super().__init__(str(error))
        self.error = error

    @property
    def job_wide(self) -> bool:
        """The user's own budget or limit: no other provider can take the job either."""
        return not isinstance(self.error, RateLimitedError) or str(
            self.error.limit_name or ""
        ).startswith("user_")


@dataclass(kw_only=True)
class Meter:
    """One job's admissions and charges, against one user's budget and limits."""

    spend: SpendTracker
    limiter: RateLimiter
    user_id: str
    request_id: str
    # The job's `llm_job` record: the latest rate-limit decision goes here.
    record: dict[str, Any] = field(default_factory=dict)
    # When set, answers' charges are written with the job's one settle script.
    settlement: Settlement | None = None
    charges: list[Charge] = field(default_factory=list)
    _tickets: list[Ticket] = field(default_factory=list)
    # The first attempt, admitted with the job (or refused) before the chain runs.
    _first: Ticket | AdmissionRejected | None = None

    def prepare(self, provider: str, estimate: Estimate) -> Prepared:
        """The first attempt's budget and limit parts, for the job's admission script."""
        free = _free(estimate)
        budget = None
        parts: list[Part] = []
        if not free:
            part, budget = self.spend.reserve_part(
                user_id=self.user_id, worst_case_usd=estimate.cost_usd
            )
            parts.append(part)
        limits = self.limiter.attempt_limits(
            user_id=self.user_id,
            provider=provider,
            model=estimate.model,
            first=True,
            metered=not free,
        )
        tokens = estimate.input_tokens + estimate.max_output_tokens
        reservation = None
        if limits:
            reservation = LimitReservation(
                self.limiter, limits, reservation_id=f"{self.request_id}:{uuid.uuid4().hex[:12]}"
            )
            parts.append(
                self.limiter.reserve_part(
                    limits, tokens=tokens, reservation_id=reservation.reservation_id
                )
            )
        ticket = Ticket(
            provider=provider, estimate=estimate, budget=budget, limits=reservation, taken=False
        )
        return Prepared(ticket=ticket, parts=parts, limits=limits, tokens=tokens)

    def accept(self, prepared: Prepared, replies: list[Any]) -> None:
        """Read the admission's replies to the prepared parts: admitted, or refused (kept)."""
        ticket = prepared.ticket
        replies = list(replies)
        if ticket.budget is not None:
            try:
                self.spend.reserved(replies.pop(0), ticket.budget)
            except DailyBudgetExceededError as exc:
                self._first = AdmissionRejected(exc)
                return
        if ticket.limits is not None and replies:
            decision = self.limiter.decision(
                replies.pop(0), prepared.limits, tokens=prepared.tokens
            )
            self.record["rate_limit"] = decision.log_fields()
            if not decision.admitted:
                self._first = AdmissionRejected(decision.error(user_id=self.user_id))
                return
        self._tickets.append(ticket)
        self._first = ticket

    def admit(self, provider: str, estimate: Estimate) -> Ticket:
        """Reserve one attempt's worst case in the budget and in every limit it must pass."""
        first, self._first = self._first, None
        if isinstance(first, AdmissionRejected) and not self._tickets:
            raise first
        if isinstance(first, Ticket) and first.provider == provider and first.estimate is estimate:
            first.taken = True
            return first
        # Budgets and token allowances guard spend: a call priced at $0 (the offline
        # extractive provider, a local model priced 0) is not metered against them.
        free = _free(estimate)
        budget = None
        if not free:
            try:
                budget = self.spend.reserve(user_id=self.user_id, worst_case_usd=estimate.cost_usd)
            except DailyBudgetExceededError as exc:
                raise AdmissionRejected(exc) from None
        limits = self.limiter.attempt_limits(
            user_id=self.user_id,
            provider=provider,
            model=estimate.model,
            # The user's requests-per-minute counts jobs: only the first attempt.
            first=not self._tickets,
            metered=not free,
        )
        try:
            reservation = self.limiter.reserve(
                limits,
                tokens=estimate.input_tokens + estimate.max_output_tokens,
                reservation_id=f"{self.request_id}:{uuid.uuid4().hex[:12]}",
                user_id=self.user_id,
                record=self.record,
            )
        except RateLimitedError as exc:
            if budget is not None:
                budget.release()
            raise AdmissionRejected(exc) from None
        except BaseException:
            if budget is not None:
                budget.release()
            raise
        ticket = Ticket(provider=provider, estimate=estimate, budget=budget, limits=reservation)
        self._tickets.append(ticket)
        return ticket

    def settle(
        self, ticket: Ticket, *, completion: Completion | None, error: BaseException | None
    ) -> Charge | None:
        """Settle an attempt by what came back; returns its charge, None if nothing was billed."""
        if ticket.settled:
            return None
        ticket.settled = True
        usage, charged_as = billed(completion, error)
        estimate = ticket.estimate
        if charged_as is None:
            sent = _reached_provider(error)
            if ticket.budget is not None:
                ticket.budget.release()
            if ticket.limits is not None:
                # An error status still was a request: it stays in requests-per-minute.
                _quietly(ticket.limits.keep_requests_only if sent else ticket.limits.release)
            return None
        if usage is None:
            usage = Usage(
                input_tokens=estimate.input_tokens, output_tokens=estimate.max_output_tokens
            )
            cost = estimate.cost_usd
        else:
            cost = estimate.price.cost(usage)
        charge = Charge(
            provider=ticket.provider,
            model=estimate.model,
            usage=usage,
            cost_usd=cost,
            charged_as=charged_as,
        )
        tokens = usage.input_tokens + usage.output_tokens
        if self.settlement is not None and charged_as == "usage":
            # Written with the job's settlement (or flushed if the job ends otherwise).
            if ticket.budget is not None:
                reservation = ticket.budget
                self.settlement.defer(
                    self.spend.settle_part(reservation, charge),
                    lambda reply: self.spend.settled(reply, reservation),
                )
            if ticket.limits is not None:
                self.settlement.defer(ticket.limits.settle_part(tokens=tokens))
        else:
            if ticket.budget is not None:
                ticket.budget.settle(charge)
            if ticket.limits is not None:
                _quietly(ticket.limits.settle, tokens=tokens)
        self.charges.append(charge)
        return charge

    def close(self) -> None:
        """Settle whatever an unexpected exception left open, as the worst case: it may be paid."""
        for ticket in self._tickets:
            if not ticket.settled:
                # Taken but never settled: the call may have reached the provider.
                unknown = ProviderTimeoutError("unknown") if ticket.taken else None
                self.settle(ticket, completion=None, error=unknown)

    @property
    def cost_usd(self) -> Decimal:
        """Everything this job was charged, answers it then discarded included."""
        return sum((c.cost_usd for c in self.charges), Decimal(0))

    @property
    def usage(self) -> Usage:
        """Tokens of every charged answer."""
        return Usage(
            input_tokens=sum(c.usage.input_tokens for c in self.charges),
            output_tokens=sum(c.usage.output_tokens for c in self.charges),
            cached_input_tokens=sum(c.usage.cached_input_tokens for c in self.charges),
            cache_write_input_tokens=sum(c.usage.cache_write_input_tokens for c in self.charges),
            reasoning_tokens=sum(c.usage.reasoning_tokens for c in self.charges),
        )

    @property
    def charged_as(self) -> ChargedAs:
        """ "worst_case" when any answer was charged at its reservation."""
        return "worst_case" if any(c.charged_as == "worst_case" for c in self.charges) else "usage"


def _free(estimate: Estimate) -> bool:
    """Priced at $0: not metered against budgets and token allowances."""
    return estimate.price.input == 0 and estimate.price.output == 0


def _quietly(settle: Callable[..., None], **arguments: Any) -> None:
    """Settle a limit; a Redis error must not fail a job whose answer is already paid for."""
    try:
        settle(**arguments)
    except redis.RedisError as exc:
        logger.warning("rate-limit reservation not settled (it ages out of its window): %s", exc)


def billed(
    completion: Completion | None, error: BaseException | None
) -> tuple[Usage | None, ChargedAs | None]:
    """The usage to charge and how it is known; (None, None) when nothing was billed."""
    if completion is not None:
        return completion.usage, "usage"
    if isinstance(error, ProviderError) and error.usage is not None:
        return error.usage, "usage"
    if isinstance(error, ProviderError) and error.answered:
        return None, "worst_case"
    if isinstance(error, (ProviderTimeoutError, ProviderConnectionError)) and error.sent:
        return None, "worst_case"
    if error is not None and not isinstance(error, ProviderError):
        return None, "worst_case"  # an unexpected failure: the call may have been answered
    return None, None


def _reached_provider(error: BaseException | None) -> bool:
    """Whether the provider saw the request (an error status), so it counts as one."""
    if isinstance(error, (ProviderTimeoutError, ProviderConnectionError)):
        return error.sent
    return isinstance(error, ProviderError) and error.status is not None
