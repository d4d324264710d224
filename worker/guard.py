"""The cost guard: exact pre-flight token count and worst-case cost, before any call."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

from worker import media, tokens
from worker.errors import BudgetExceededError, ContextWindowExceededError, InvalidJobError
from worker.models import Message
from worker.options import RequestOptions, check_supported, schema_tokens, tools_tokens
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
    # What is sent: the job's messages, or the sliding window a `trim` job kept.
    messages: list[Message]
    messages_dropped: int = 0
    # What else the job asks of the provider (sampling options, response format).
    options: RequestOptions = field(default_factory=RequestOptions)
    # Of max_output_tokens: the extended-thinking budget on top of the answer's max_tokens.
    thinking_tokens: int = 0
    # Of input_tokens: what the response format's schema adds to the prompt.
    schema_tokens: int = 0
    # Of input_tokens: the tool definitions, and the images by the provider's formula.
    tools_tokens: int = 0
    media_tokens: int = 0

    @property
    def answer_tokens(self) -> int:
        """max_tokens for the answer itself (the job's, without a thinking budget)."""
        return self.max_output_tokens - self.thinking_tokens


def count_input_tokens(messages: list[Message], *, model: str, price: ModelPrice) -> int:
    """Exact for OpenAI models; an upper-bound estimate for the others."""
    return _prompt_tokens(sum(_message_tokens(messages, model=model, price=price)), price)


def _message_tokens(messages: list[Message], *, model: str, price: ModelPrice) -> list[int]:
    counted_as = model if price.provider == "openai" else "gpt-4o"
    return tokens.count_each_message(messages, model=counted_as)


def _prompt_tokens(message_tokens: int, price: ModelPrice) -> int:
    counted = message_tokens + tokens.TOKENS_PER_REPLY
    if price.provider in ("openai", "extractive"):
        return counted
    return math.ceil(counted * NON_OPENAI_MARGIN)


def sliding_window(
    messages: list[Message], *, model: str, price: ModelPrice, room: int
) -> tuple[list[Message], int]:
    """The system messages and the newest turns whose prompt fits `room` tokens.

    The window opens on a user turn (providers reject a conversation that starts
    with the assistant) and keeps the messages in their original order. Returns
    the kept messages and their prompt tokens; an empty list if nothing fits.
    """
    counts = _message_tokens(messages, model=model, price=price)
    system = [i for i, m in enumerate(messages) if m.role == "system"]
    used = sum(counts[i] for i in system)
    turns: list[int] = []
    for i in reversed([i for i, m in enumerate(messages) if m.role != "system"]):
        if _prompt_tokens(used + counts[i], price) > room:
            break
        used += counts[i]
        turns.insert(0, i)
    while turns and messages[turns[0]].role != "user":
        used -= counts[turns.pop(0)]
    if not turns:
        return [], 0
    kept = sorted(system + turns)
    return [messages[i] for i in kept], _prompt_tokens(used, price)


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

    def check(
        self,
        messages: list[Message],
        *,
        model: str,
        max_tokens: int,
        trim: bool = False,
        options: RequestOptions | None = None,
    ) -> Estimate:
        """The worst-case estimate, or a typed error stating the numbers and the fix.

        With `trim`, a prompt too long for the context window is cut to a sliding
        window (system messages plus the newest turns that fit) instead of rejected.
        `options` the model cannot honour fail with UnsupportedOptionError; a schema
        counts as input, a thinking budget as output.
        """
        price = self.prices.get(model)
        options = options or RequestOptions()
        check_supported(options, model=model, price=price)
        media.check_provider(messages, provider=price.provider)
        thinking = options.thinking_budget or 0
        if max_tokens + thinking > price.max_output_tokens:
            raise InvalidJobError(
                f"max_tokens={max_tokens} plus thinking.budget_tokens={thinking} exceeds "
                f"{model}'s maximum output of {price.max_output_tokens} tokens. Fix: lower "
                "either, so that they add up to at most that."
            )
        answer_tokens = max_tokens
        max_tokens += thinking
        # Images are counted by the provider's own formula, no margin; they stay counted
        # when trimming drops their turn, which only overestimates.
        images = sum(media.image_tokens(m, provider=price.provider, model=model) for m in messages)
        tool_tokens = tools_tokens(options, price=price)
        extra = schema_tokens(options, price=price) + tool_tokens + images
        input_tokens = count_input_tokens(messages, model=model, price=price) + extra
        sent = messages
        if input_tokens + max_tokens > price.context_window:
            over = input_tokens + max_tokens - price.context_window
            if not trim:
                raise ContextWindowExceededError(
                    f"Prompt of {input_tokens} tokens plus max_tokens={max_tokens} exceeds "
                    f"{model}'s context window of {price.context_window} tokens by {over}. "
                    "Fix: shorten the prompt, lower max_tokens, split the document, or "
                    "send trim=True to drop the oldest turns."
                )
            room = price.context_window - max_tokens - extra
            sent, input_tokens = sliding_window(messages, model=model, price=price, room=room)
            input_tokens += extra
            if not sent:
                raise ContextWindowExceededError(
                    f"Prompt of {count_input_tokens(messages, model=model, price=price)} "
                    f"tokens plus max_tokens={max_tokens} exceeds {model}'s context window "
                    f"of {price.context_window} tokens by {over}, and trimming cannot help: "
                    f"the system message(s) and the newest user turn alone exceed the "
                    f"{room} tokens left for the prompt. Fix: shorten the system message "
                    "or the last user message, or lower max_tokens."
                )
        if media.has_pdf(sent):
            # A PDF's tokens are unknowable beforehand: the most the provider can bill is
            # the whole window beside max_tokens (a larger prompt it rejects unbilled).
            input_tokens = max(input_tokens, price.context_window - max_tokens)
        # The worst case is the model writing all `max_tokens` it may: the output
        # length is not knowable in advance, and max_tokens is the bound the provider
        # enforces, so it is the only estimate that can never be exceeded.
        # Priced as the bill would be (tiers included), all output at the output rate:
        # reasoning and thinking tokens are billed as output.
        cost = price.worst_case(input_tokens=input_tokens, output_tokens=max_tokens)
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
            messages=sent,
            messages_dropped=len(messages) - len(sent),
            options=options,
            thinking_tokens=max_tokens - answer_tokens,
            schema_tokens=extra - tool_tokens - images,
            tools_tokens=tool_tokens,
            media_tokens=images,
        )
