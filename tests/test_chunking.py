"""Token-aware splitting: exact budgets, coarsest boundaries first, nothing lost."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import tiktoken

from tests import corpus
from tests.harness import ROOT
from worker import tokens
from worker.chunking import MIN_BUDGET, Chunker, chunk_budget
from worker.errors import InvalidJobError
from worker.prices import load_prices


def exact(text: str) -> int:
    """tiktoken's own count, independent of the chunker."""
    tokens.install_offline_encodings()
    return len(tiktoken.get_encoding("o200k_base").encode(text, disallowed_special=()))


def squashed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_text_that_fits_is_one_chunk() -> None:
    chunker = Chunker.for_model("gpt-4o-mini", budget=100)
    assert chunker.split("  A short note.\n\n") == ["A short note."]
    assert chunker.split(" \n ") == []


def test_paragraphs_are_kept_whole_and_packed() -> None:
    paragraphs = [f"Paragraph {i} says something plain about topic {i}. " * 4 for i in range(12)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunker = Chunker.for_model("gpt-4o-mini", budget=150)

    chunks = chunker.split(text)

    assert len(chunks) > 1
    assert all(exact(chunk) <= 150 for chunk in chunks)
    # Every chunk is a run of whole paragraphs, in order, and together they are the text.
    whole = {p.strip() for p in paragraphs}
    assert all(set(chunk.split("\n\n")) <= whole for chunk in chunks)
    assert "\n\n".join(chunks) == text
    # Greedy packing: no two neighbours would have fitted together.
    assert all(exact(a + "\n\n" + b) > 150 for a, b in itertools.pairwise(chunks))


def test_long_paragraph_splits_at_sentences() -> None:
    sentences = [f"Sentence number {i} carries a little meaning." for i in range(60)]
    text = " ".join(sentences)
    chunker = Chunker.for_model("gpt-4o-mini", budget=80)

    chunks = chunker.split(text)

    assert len(chunks) >= math.ceil(exact(text) / 80)
    assert all(exact(chunk) <= 80 for chunk in chunks)
    assert all(chunk.endswith(".") and chunk[0].isupper() for chunk in chunks)
    assert " ".join(chunks) == text


def test_text_without_boundaries_splits_into_token_windows() -> None:
    text = "x" + "".join(f"{i:x}" for i in range(3000))  # one "word", no spaces or punctuation
    chunker = Chunker.for_model("gpt-4o-mini", budget=100)

    chunks = chunker.split(text)

    assert all(0 < exact(chunk) <= 100 for chunk in chunks)
    assert "".join(chunks) == text
    assert len(chunks) == pytest.approx(exact(text) / 100, abs=2)


def test_every_chunk_of_real_documents_fits_and_nothing_is_lost() -> None:
    chunker = Chunker.for_model("gpt-4o-mini", budget=700)
    # Every source and length, and the longest documents with non-ASCII text.
    documents = [*corpus.sample(16), *corpus.longest(2, non_ascii=True)]
    assert any(exact(d.text) > 700 * 10 for d in documents)
    for document in documents:
        text = document.text
        chunks = chunker.split(text)
        total = exact(text)
        assert all(exact(chunk) <= 700 for chunk in chunks), document.name
        assert len(chunks) >= math.ceil(total / 700), document.name
        assert squashed("".join(chunks)) == squashed(text), document.name


def test_budget_is_the_context_window_minus_prompt_and_output() -> None:
    prices = load_prices()
    mini = prices.get("gpt-4o-mini")
    budget = chunk_budget(mini, prompt_tokens=40, max_output_tokens=120, max_cost_usd=0.10)
    assert budget == 128_000 - 120 - 40
    # A configured chunk size lowers it; it never raises it.
    assert (
        chunk_budget(
            mini, prompt_tokens=40, max_output_tokens=120, max_cost_usd=0.10, configured=6000
        )
        == 6000
    )
    assert (
        chunk_budget(
            mini, prompt_tokens=40, max_output_tokens=120, max_cost_usd=0.10, configured=10**6
        )
        == budget
    )


def test_budget_respects_the_per_request_cost_guard_and_tokenizer_margin() -> None:
    prices = load_prices()
    # gpt-4o: $2.50 in, $10 out per 1M; $0.10 buys (100000 - 120*10) / 2.5 input tokens.
    gpt4o = chunk_budget(
        prices.get("gpt-4o"), prompt_tokens=40, max_output_tokens=120, max_cost_usd=0.10
    )
    assert gpt4o == (100_000 - 1200) * 10 // 25 - 40
    # Claude is counted with a 1.25 margin by the cost guard: the budget divides by it.
    haiku = chunk_budget(
        prices.get("claude-haiku-4-5"), prompt_tokens=40, max_output_tokens=120, max_cost_usd=1.0
    )
    assert haiku == math.floor((200_000 - 120) / 1.25) - 40


def test_budget_too_small_is_a_typed_error_with_the_numbers() -> None:
    price = load_prices().get("gpt-4o-mini")
    with pytest.raises(InvalidJobError) as raised:
        chunk_budget(price, prompt_tokens=40, max_output_tokens=16_384, max_cost_usd=0.0001)
    message = str(raised.value)
    assert f"at least {MIN_BUDGET}" in message and "Fix:" in message


def test_generated_corpus_is_varied_and_the_same_on_every_build() -> None:
    documents = corpus.documents()
    assert len(documents) >= 300
    assert {d.name.split("-")[0] for d in documents} == {"stdlib", "topic", "dist"}
    assert sum(d.non_ascii for d in documents) >= 30
    assert sum(exact(d.text) > 6000 for d in documents) >= 10
    assert len({d.name for d in documents}) == len({d.text for d in documents}) == len(documents)
    # Built afresh in another process, with another hash seed: the same bytes.
    code = (
        "import hashlib, json; from tests import corpus; "
        "print(hashlib.sha256(json.dumps([vars(d) for d in corpus._build()]).encode())"
        ".hexdigest())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    here = hashlib.sha256(json.dumps([vars(d) for d in documents]).encode()).hexdigest()
    assert done.stdout.strip() == here
