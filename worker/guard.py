"""The cost guard: exact pre-flight token count and worst-case cost, before any call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from worker import tokens
from worker.errors import BudgetExceededError, ContextWindowExceededError, InvalidJobError
from worker.models import Message
from worker.prices import ModelPrice, PriceTable

# tiktoken is exact for OpenAI models only. Anthropic and Gemini use their own
# tokenizers, which on English prose and code run up to ~20% above o200k_base;
# we count with o200k_base and add this margin so the estimate stays an upper bound.
NON_OPENAI_MARGIN = 1.25


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """The pre-flight numbers for one job on one model."""

    model: str
    input_tokens: int
    max_output_tokens: int
    cost_usd: Decimal
    price: ModelPrice


def count_input_tokens(messages: list[Message], *, model: str, price: ModelPrice) -> int:
    """Exact for OpenAI models; an upper-bound estimate for the others."""
    if price.provider == "openai":
        return tokens.count_messages(messages, model=model)
    counted = tokens.count_messages(messages, model="gpt-4o")
    return counted if price.provider == "extractive" else math.ceil(counted * NON_OPENAI_MARGIN)


class CostGuard:
    """Prices a job before the call and rejects what the limits do not allow."""

    def __init__(self, prices: PriceTable, *, max_cost_per_request: float) -> None:
        self.prices = prices
        self.max_cost_per_request = Decimal(str(max_cost_per_request))

    def output_budget(self, model: str, requested: int | None, default: int) -> int:
        """max_tokens for the call: the job's, else the default capped by the model."""
        price = self.prices.get(model)
        if requested is not None and requested > price.max_output_tokens:
            raise InvalidJobError(
                f"max_tokens={requested} exceeds {model}'s maximum output of "
                f"{price.max_output_tokens} tokens. Fix: ask for at most "
                f"{price.max_output_tokens}."
            )
        return min(requested or default, price.max_output_tokens)

    def check(self, messages: list[Message], *, model: str, max_tokens: int) -> Estimate:
        """The worst-case estimate, or a typed error stating the numbers and the fix."""
        price = self.prices.get(model)
        input_tokens = count_input_tokens(messages, model=model, price=price)
        if input_tokens + max_tokens > price.context_window:
            raise ContextWindowExceededError(
                f"Prompt of {input_tokens} tokens plus max_tokens={max_tokens} exceeds "
                f"{model}'s context window of {price.context_window} tokens by "
                f"{input_tokens + max_tokens - price.context_window}. Fix: shorten the "
                "prompt, lower max_tokens, or split the document."
            )
        # The worst case is the model writing all `max_tokens` it may: the output
        # length is not knowable in advance, and max_tokens is the bound the provider
        # enforces, so it is the only estimate that can never be exceeded.
        cost = (input_tokens * price.input + max_tokens * price.output) / Decimal(1_000_000)
        if cost > self.max_cost_per_request:
            raise BudgetExceededError(
                f"Estimated worst-case cost ${cost:.6f} ({input_tokens} input + {max_tokens} "
                f"output tokens on {model}) exceeds the per-request budget "
                f"${self.max_cost_per_request} (LLM_MAX_COST_PER_REQUEST). Fix: shorten the "
                "prompt, lower max_tokens, use a cheaper model, or raise the budget."
            )
        return Estimate(
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_tokens,
            cost_usd=cost,
            price=price,
        )
