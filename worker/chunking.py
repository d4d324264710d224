"""Token-aware splitting: a document into chunks that each fit a model's token budget.

Chunks are exact, contiguous slices of the text, cut at the coarsest boundary that
works: paragraphs first, then sentences and lines inside a paragraph that alone is
too long, then (for a run of text with neither) windows of tokens. Every chunk is
counted with tiktoken before it is returned, so "fits" is exact, not estimated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from worker import tokens
from worker.errors import InvalidJobError
from worker.guard import NON_OPENAI_MARGIN
from worker.prices import ModelPrice

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
# Below this many tokens a chunk holds too little text to summarize usefully.
MIN_BUDGET = 64

Span = tuple[int, int]


def input_margin(price: ModelPrice) -> Decimal:
    """The cost guard's safety margin on tiktoken counts for this model's provider."""
    return Decimal(1) if price.provider in ("openai", "extractive") else Decimal(NON_OPENAI_MARGIN)


def chunk_budget(
    price: ModelPrice,
    *,
    prompt_tokens: int,
    max_output_tokens: int,
    max_cost_usd: float,
    configured: int | None = None,
    max_call_tokens: int | None = None,
    call_limit_setting: str = "LLM_USER_TOKENS_PER_HOUR",
) -> int:
    """Most tokens of text one call may carry: whichever of its limits is least.

    The context window, the cost guard's per-request budget, the smallest token limit one
    call must pass (`max_call_tokens`: the user's and the provider's token allowances)
    and the configured chunk size. `prompt_tokens` is everything in the request but the
    text (instructions, chat framing). For models not counted exactly by tiktoken the
    cost guard adds a safety margin to the count; the budget divides by the same margin
    so a chunk never trips the guard.
    """
    margin = input_margin(price)
    limits = [Decimal(price.context_window - max_output_tokens) / margin]
    if price.input > 0:
        spendable = Decimal(str(max_cost_usd)) * 1_000_000 - max_output_tokens * price.output
        limits.append(spendable / price.input / margin)
    if max_call_tokens is not None:
        limits.append(Decimal(max_call_tokens - max_output_tokens) / margin)
    budget = math.floor(min(limits)) - prompt_tokens
    if configured is not None:
        budget = min(budget, configured)
    if budget < MIN_BUDGET:
        raise InvalidJobError(
            f"Only {budget} tokens of text fit one call (context window "
            f"{price.context_window}, output {max_output_tokens}, prompt {prompt_tokens} "
            f"tokens, LLM_MAX_COST_PER_REQUEST={max_cost_usd}"
            + (f", {call_limit_setting} allows {max_call_tokens}" if max_call_tokens else "")
            + f"); at least {MIN_BUDGET} are needed. Fix: ask for fewer words, use a model "
            "with a larger window, or raise the per-request budget or the token limit."
        )
    return budget


@dataclass(frozen=True, kw_only=True)
class Chunker:
    """Splits text into chunks of at most `budget` tokens of one tiktoken encoding."""

    budget: int
    encoding_name: str = "o200k_base"

    @classmethod
    def for_model(cls, model: str, *, budget: int) -> Chunker:
        """A chunker counting the way the cost guard counts for `model`."""
        return cls(budget=budget, encoding_name=tokens.encoding_name_for(model))

    def count(self, text: str) -> int:
        """Exact tokens in `text`."""
        encoding = tokens.get_encoding(self.encoding_name)
        return len(encoding.encode(text, disallowed_special=()))

    def fits(self, text: str) -> bool:
        """Whether `text` is within the budget."""
        return self.count(text) <= self.budget

    def split(self, text: str) -> list[str]:
        """`text` (stripped) as chunks within the budget, in order; one chunk if it fits."""
        text = text.strip()
        if not text or self.fits(text):
            return [text] if text else []
        units = [
            unit
            for paragraph in _pieces(text, 0, len(text), PARAGRAPH_BREAK)
            for unit in self._units(text, paragraph)
        ]
        return [text[start:end] for start, end in self._pack(text, units)]

    def _units(self, text: str, span: Span) -> list[tuple[Span, int]]:
        """A paragraph as one unit if it fits, else its sentences, else token windows."""
        start, end = span
        count = self.count(text[start:end])
        if count <= self.budget:
            return [(span, count)]
        units: list[tuple[Span, int]] = []
        for sentence in _pieces(text, start, end, SENTENCE_BREAK):
            count = self.count(text[sentence[0] : sentence[1]])
            if count <= self.budget:
                units.append((sentence, count))
            else:
                units.extend(self._windows(text, sentence))
        return units

    def _windows(self, text: str, span: Span) -> list[tuple[Span, int]]:
        """A run of text with no usable boundary, cut into windows of whole tokens."""
        encoding = tokens.get_encoding(self.encoding_name)
        start, end = span
        windows: list[tuple[Span, int]] = []
        while start < end:
            _, offsets = encoding.decode_with_offsets(
                encoding.encode(text[start:end], disallowed_special=())
            )
            size = self.budget
            while True:
                cut = start + offsets[size] if size < len(offsets) else end
                count = self.count(text[start:cut])
                # Re-encoding a slice can merge differently at its edges: shrink until exact.
                if count <= self.budget or size <= 1:
                    break
                size = max(1, size * 9 // 10)
            windows.append(((start, cut), count))
            start = cut
        return windows

    def _pack(self, text: str, units: list[tuple[Span, int]]) -> list[Span]:
        """Greedily join consecutive units into chunks, each counted exactly."""
        chunks: list[Span] = []
        group: list[tuple[Span, int]] = []
        used = 0
        for unit in units:
            (start, _), count = unit
            gap = self.count(text[group[-1][0][1] : start]) if group else 0
            if group and used + gap + count > self.budget:
                chunks.extend(self._exact(text, group))
                group, used, gap = [], 0, 0
            group.append(unit)
            used += gap + count
        if group:
            chunks.extend(self._exact(text, group))
        return chunks

    def _exact(self, text: str, group: list[tuple[Span, int]]) -> list[Span]:
        """The group's span if its exact count fits, else its halves (BPE merges across joins)."""
        span = (group[0][0][0], group[-1][0][1])
        if len(group) == 1 or self.fits(text[span[0] : span[1]]):
            return [span]
        middle = len(group) // 2
        return self._exact(text, group[:middle]) + self._exact(text, group[middle:])


def _pieces(text: str, start: int, end: int, boundary: re.Pattern[str]) -> list[Span]:
    """Spans of `text[start:end]` between matches of `boundary`, without edge whitespace."""
    spans: list[Span] = []
    position = start
    for match in boundary.finditer(text, start, end):
        spans.append((position, match.start()))
        position = match.end()
    spans.append((position, end))
    return [_strip(text, span) for span in spans if text[span[0] : span[1]].strip()]


def _strip(text: str, span: Span) -> Span:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
