"""An offline provider: a deterministic extractive summary, no key and no network.

It picks the most significant sentences of the last user message (sumy's Luhn
summarizer, which needs neither NumPy nor NLTK data). It is not an LLM, and its
results say `provider: "extractive"` so nobody mistakes them for one.
"""

from __future__ import annotations

import re

from sumy.nlp.stemmers import Stemmer
from sumy.parsers.plaintext import PlaintextParser
from sumy.summarizers.luhn import LuhnSummarizer
from sumy.utils import get_stop_words

from worker import plaintext, tokens
from worker.models import Completion, Usage
from worker.providers.base import ProviderRequest

MAX_SENTENCES = 5
MAX_SENTENCE_CHARS = 240
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_WORD = re.compile(r"\w+(?:'\w+)?")
# Lines that are markup, code or tables rather than prose.
_NOT_PROSE = re.compile(r"^(\s{2,}|\.\.|[=\-~^#*+`|:]{3,}|>>>|\$ )")


class RegexTokenizer:
    """Sentence and word splitting without NLTK's downloadable punkt data."""

    language = "english"

    def to_sentences(self, paragraph: str) -> list[str]:
        """Split a paragraph into sentences on terminal punctuation (run-ons into pieces)."""
        sentences: list[str] = []
        for sentence in _SENTENCE_END.split(paragraph):
            # A listing, a table or a run of URLs has no full stops: as one "sentence" it
            # would never fit a summary, so it is read in pieces of a long sentence's size.
            piece: list[str] = []
            for word in sentence.split():
                piece.append(word)
                if sum(len(w) + 1 for w in piece) >= MAX_SENTENCE_CHARS:
                    sentences.append(" ".join(piece))
                    piece = []
            if piece:
                sentences.append(" ".join(piece))
        return sentences

    def to_words(self, sentence: str) -> list[str]:
        """Split a sentence into words."""
        return _WORD.findall(sentence)


def prose(text: str) -> str:
    """The document's paragraphs without front matter or markup (else its prose-like lines)."""
    paragraphs = plaintext.prose(text)
    if paragraphs:
        return paragraphs
    lines = [line for line in text.splitlines() if not _NOT_PROSE.match(line)]
    return "\n".join(lines)


class ExtractiveProvider:
    """Summarizes the last user message by extracting its key sentences."""

    name = "extractive"

    def __init__(self) -> None:
        self._summarizer = LuhnSummarizer(Stemmer("english"))
        self._summarizer.stop_words = get_stop_words("english")
        self._tokenizer = RegexTokenizer()

    def complete(self, request: ProviderRequest) -> Completion:
        """Summarize; stop at `max_tokens` with finish_reason `length` like an LLM would."""
        source = next(m.text for m in reversed(request.messages) if m.role == "user")
        document = PlaintextParser.from_string(prose(source) or source, self._tokenizer).document
        picked = [str(s) for s in self._summarizer(document, MAX_SENTENCES)]
        text, finish = "", "stop"
        for sentence in picked or [source.strip()]:
            candidate = f"{text} {sentence}".strip()
            # Whole sentences that fit make a complete, shorter summary: one too long
            # (a table or code read as a sentence) is left out, not cut.
            if tokens.count_text(candidate) <= request.max_tokens:
                text = candidate
        if not text:
            # None of the key sentences fits: the first other sentence that does.
            others = (str(s) for s in document.sentences)
            text = next((s for s in others if tokens.count_text(s) <= request.max_tokens), "")
        if not text:
            # Not one sentence fits: a first sentence cut mid-way is a truncated answer.
            finish = "length"
            encoding = tokens.get_encoding("o200k_base")
            first = (picked or [source.strip()])[0]
            text = encoding.decode(encoding.encode(first)[: request.max_tokens])
        return Completion(
            text=text,
            finish_reason="length" if finish == "length" else "stop",
            usage=Usage(
                input_tokens=tokens.count_messages(request.messages),
                output_tokens=tokens.count_text(text),
            ),
            model="extractive",
        )
