"""What to do when a provider stops at max_tokens: fail, retry larger once, or accept."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from worker import logs
from worker.errors import LLMQError, TruncatedResponseError
from worker.guard import CostGuard, Estimate
from worker.models import Message
from worker.resilience import Outcome
from worker.settings import TruncationPolicy

Retry = Callable[[Estimate], Outcome]


class TruncationHandler:
    """Applies a job's truncation policy; a truncated answer is never returned as complete."""

    def __init__(self, guard: CostGuard, *, factor: float) -> None:
        self.guard = guard
        self.factor = factor

    def enforce(
        self,
        outcome: Outcome,
        *,
        policy: TruncationPolicy,
        messages: list[Message],
        estimate: Estimate,
        retry: Retry,
        **log_fields: Any,
    ) -> Outcome:
        """The outcome to return (`accept`, or a larger retry that finished), else raise."""
        if outcome.completion.finish_reason != "length":
            return outcome
        alert(outcome, policy=policy, max_tokens=estimate.max_output_tokens, **log_fields)
        if policy == "accept":
            return outcome
        if policy == "fail":
            raise TruncatedResponseError(
                f"{outcome.provider} ({outcome.model}) stopped at max_tokens="
                f"{estimate.max_output_tokens} (finish_reason 'length'); the answer is "
                "incomplete and was not returned. Fix: raise max_tokens, shorten the prompt, "
                "or set on_truncation='retry_larger' or 'accept'."
            )
        larger = self.larger(messages, estimate)
        again = retry(larger)
        merged = Outcome(
            provider=again.provider,
            model=again.model,
            completion=again.completion,
            attempts=[*outcome.attempts, *again.attempts],
            discarded=[*outcome.discarded, outcome.completion, *again.discarded],
        )
        if again.completion.finish_reason != "length":
            return merged
        alert(merged, policy=policy, max_tokens=larger.max_output_tokens, **log_fields)
        raise TruncatedResponseError(
            f"{again.provider} ({again.model}) stopped at max_tokens={larger.max_output_tokens} "
            f"even after retrying with {self.factor:g}x the first max_tokens="
            f"{estimate.max_output_tokens}; the answer is incomplete and was not returned. "
            "Fix: shorten the prompt or ask for a shorter answer."
        )

    def larger(self, messages: list[Message], estimate: Estimate) -> Estimate:
        """A priced estimate with more max_tokens, or TruncatedResponseError saying why not."""
        # The answer's max_tokens grows; a thinking budget stays what the job asked.
        current = estimate.answer_tokens
        room = estimate.price.max_output_tokens - estimate.thinking_tokens
        wanted = min(math.ceil(current * self.factor), room)
        if wanted <= current:
            raise TruncatedResponseError(
                f"{estimate.model} stopped at max_tokens={current}, already its maximum "
                "output, so on_truncation='retry_larger' cannot ask for more. Fix: shorten "
                "the prompt or ask for a shorter answer."
            )
        try:
            return self.guard.check(
                messages, model=estimate.model, max_tokens=wanted, options=estimate.options
            )
        except LLMQError as exc:
            raise TruncatedResponseError(
                f"{estimate.model} stopped at max_tokens={current}, and the larger retry "
                f"(max_tokens={wanted}) is not allowed: {exc}"
            ) from None


def alert(outcome: Outcome, *, policy: TruncationPolicy, max_tokens: int, **fields: Any) -> None:
    """The TRUNCATED_RESPONSE alert record, whatever the policy does next."""
    logs.job_logger.warning(
        "llm_alert",
        extra={
            "event": "llm_alert",
            "alert": logs.TRUNCATED_ALERT,
            "provider": outcome.provider,
            "model": outcome.model,
            "max_tokens": max_tokens,
            "output_tokens": outcome.completion.usage.output_tokens,
            "on_truncation": policy,
            **fields,
        },
    )
