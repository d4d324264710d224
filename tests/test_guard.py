"""The cost guard: exact pre-flight counts, worst-case cost, per-request budget, context window."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from producer import submit
from tests import corpus
from tests.fakes import FakeProvider
from tests.harness import Worker
from worker import tokens
from worker.errors import BudgetExceededError, ContextWindowExceededError
from worker.guard import NON_OPENAI_MARGIN, CostGuard, count_input_tokens, sliding_window
from worker.models import Message
from worker.prices import load_prices


def _long_documents() -> tuple[str, str]:
    """Two long real documents with non-ASCII text, from the generated corpus."""
    first, second = corpus.longest(2, non_ascii=True)
    return first.text, second.text


# Case names, known without building the corpus (parametrize needs them at collection).
CASES = [
    "one user turn",
    "system and user",
    "multi-turn",
    "unicode",
    "special-token look-alikes are text",
    "empty system content",
    "long document",
    "two long documents",
]


def _payloads() -> dict[str, list[dict[str, str]]]:
    long_text, second_text = _long_documents()
    return {
        "one user turn": [{"role": "user", "content": "Hello, world!"}],
        "system and user": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Explain CRDTs in one paragraph."},
        ],
        "multi-turn": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "What is a monad?"},
            {"role": "assistant", "content": "Une monade est un motif de composition."},
            {"role": "user", "content": "Shorter, please."},
        ],
        "unicode": [
            {"role": "user", "content": "naïve café — déjà vu, Привет мир, こんにちは世界, 你好"},
            {"role": "assistant", "content": "🚀🔥👩‍💻 emoji ZWJ sequences, \u200b zero-width"},
            {"role": "user", "content": "Ελληνικά, עברית, العربية, हिन्दी, 한국어 \t\n tabs"},
        ],
        "special-token look-alikes are text": [
            {"role": "user", "content": "Ignore <|endoftext|> and <|im_start|>system<|im_sep|>"},
        ],
        "empty system content": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "x"},
        ],
        "long document": [
            {"role": "system", "content": "Summarize the document in 80 words."},
            {"role": "user", "content": long_text},
        ],
        "two long documents": [
            {"role": "user", "content": second_text},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": long_text},
        ],
    }


def _rendered_count(payload: list[dict[str, str]], encoding_name: str) -> int:
    """Tokens of the chat exactly as OpenAI's chat format renders it, special tokens included."""
    import tiktoken

    base = tokens.get_encoding(encoding_name)
    chat = tiktoken.Encoding(
        name=f"{encoding_name}_chat",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={
            **base._special_tokens,
            "<|im_start|>": base.n_vocab + 10,
            "<|im_end|>": base.n_vocab + 11,
            "<|im_sep|>": base.n_vocab + 12,
        },
    )
    framing = {"<|im_start|>", "<|im_end|>", "<|im_sep|>"}
    priming = "<|im_start|>assistant<|im_sep|>"  # the reply is primed with these 3 tokens
    # Framing is special; content is plain text even where it looks like a special token.
    count = len(chat.encode(priming, allowed_special=framing))
    for m in payload:
        count += len(chat.encode(f"<|im_start|>{m['role']}<|im_sep|>", allowed_special=framing))
        count += len(chat.encode(m["content"], disallowed_special=()))
        count += len(chat.encode("<|im_end|>", allowed_special=framing))
    if not any("<|" in m["content"] for m in payload):
        # Rendered as one string, no BPE merge crosses a message boundary.
        whole = "".join(
            f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in payload
        )
        assert len(chat.encode(whole + priming, allowed_special=framing)) == count
    return count


def _messages(payload: list[dict[str, str]]) -> list[Message]:
    return [Message(**m) for m in payload]  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4"])
@pytest.mark.parametrize("case", CASES)
def test_openai_input_tokens_exact_against_rendered_chat(case: str, model: str) -> None:
    payload = _payloads()[case]
    expected = _rendered_count(payload, tokens.encoding_name_for(model))
    assert tokens.count_messages(_messages(payload), model=model) == expected


def test_rendered_chat_check_counts_the_framing() -> None:
    # The reference above is not vacuous: framing is 3 per message plus 3 for the reply.
    payload = _payloads()["system and user"]
    encoding = tokens.get_encoding("o200k_base")
    content = sum(
        len(encoding.encode(m["role"])) + len(encoding.encode(m["content"])) for m in payload
    )
    assert _rendered_count(payload, "o200k_base") == content + 3 * len(payload) + 3


def test_long_document_count_matches_plain_tiktoken() -> None:
    import tiktoken

    text, _ = _long_documents()
    assert not text.isascii()
    plain = len(tiktoken.get_encoding("o200k_base").encode(text, disallowed_special=()))
    count = tokens.count_messages(_messages([{"role": "user", "content": text}]))
    assert count == plain + len(tiktoken.get_encoding("o200k_base").encode("user")) + 3 + 3
    assert count > 10_000


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-sonnet-4-5", "gemini-2.5-flash"])
def test_non_openai_estimate_adds_the_documented_margin(model: str) -> None:
    prices = load_prices()
    messages = _messages(_payloads()["long document"])
    o200k = tokens.count_messages(messages, model="gpt-4o")
    counted = count_input_tokens(messages, model=model, price=prices.get(model))
    assert counted == math.ceil(o200k * NON_OPENAI_MARGIN)


def test_worst_case_is_input_plus_max_tokens_at_list_price() -> None:
    guard = CostGuard(load_prices(), max_cost_per_request=1.0)
    messages = _messages(_payloads()["multi-turn"])
    estimate = guard.check(messages, model="gpt-4o", max_tokens=700)
    n = tokens.count_messages(messages, model="gpt-4o")
    assert estimate.input_tokens == n and estimate.max_output_tokens == 700
    # gpt-4o: $2.50 in, $10 out per 1M tokens; exact in Decimal.
    assert estimate.cost_usd == (Decimal(n) * Decimal("2.50") + 700 * Decimal(10)) / 10**6
    assert estimate.messages == messages and estimate.messages_dropped == 0


def test_max_tokens_is_capped_by_the_models_output_limit() -> None:
    guard = CostGuard(load_prices(), max_cost_per_request=1.0)
    assert guard.output_budget("gemini-2.0-flash", None, 100_000) == 8192
    assert guard.output_budget("gpt-4o-mini", 300, 2048) == 300


def test_per_request_budget_error_states_estimate_and_budget() -> None:
    guard = CostGuard(load_prices(), max_cost_per_request=0.01)
    with pytest.raises(BudgetExceededError) as raised:
        guard.check(_messages(_payloads()["one user turn"]), model="gpt-4o", max_tokens=2000)
    message = str(raised.value)
    n = tokens.count_messages(_messages(_payloads()["one user turn"]), model="gpt-4o")
    estimate = (Decimal(n) * Decimal("2.5") + 2000 * 10) / 10**6
    assert f"${estimate:.6f}" in message and "$0.01" in message
    assert "LLM_MAX_COST_PER_REQUEST" in message and "Fix:" in message


def _conversation(turns: int, words: int) -> list[Message]:
    messages = [Message(role="system", content="Be brief.")]
    for n in range(turns):
        role = "user" if n % 2 == 0 else "assistant"
        messages.append(Message(role=role, content=f"turn {n}: " + "lorem ipsum " * words))
    return messages


def _small_window_guard(tmp_path: Path, window: int) -> CostGuard:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models."tiny-gpt"]\nprovider = "openai"\ninput = 1.0\noutput = 2.0\n'
        f"context_window = {window}\nmax_output_tokens = 500\n"
    )
    return CostGuard(load_prices(str(prices)), max_cost_per_request=1.0)


def test_context_window_exceeded_names_the_numbers(tmp_path: Path) -> None:
    guard = _small_window_guard(tmp_path, 1000)
    messages = _conversation(9, 40)
    n = tokens.count_messages(messages, model="tiny-gpt")
    with pytest.raises(ContextWindowExceededError) as raised:
        guard.check(messages, model="tiny-gpt", max_tokens=200)
    message = str(raised.value)
    assert f"Prompt of {n} tokens plus max_tokens=200" in message
    assert "context window of 1000" in message and f"by {n + 200 - 1000}" in message
    assert "trim=True" in message


def test_trim_keeps_system_and_the_newest_turns_that_fit(tmp_path: Path) -> None:
    guard = _small_window_guard(tmp_path, 1000)
    messages = _conversation(9, 40)  # system + user/assistant alternating, user last
    estimate = guard.check(messages, model="tiny-gpt", max_tokens=200, trim=True)
    kept = estimate.messages
    assert kept[0] == messages[0]  # the system message stays
    assert kept[1].role == "user"  # the window opens on a user turn
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a suffix: the newest turns
    assert estimate.messages_dropped == len(messages) - len(kept) > 0
    # It fits, and is the largest window that fits and opens on a user turn.
    assert estimate.input_tokens == tokens.count_messages(kept, model="tiny-gpt")
    assert estimate.input_tokens + 200 <= 1000
    bigger = [messages[0], *messages[len(messages) - len(kept) - 1 :]]
    assert tokens.count_messages(bigger, model="tiny-gpt") + 200 > 1000


def test_trim_drops_a_leading_assistant_turn(tmp_path: Path) -> None:
    system = Message(role="system", content="S")
    old = Message(role="user", content="old " * 300)
    answer = Message(role="assistant", content="short answer")
    last = Message(role="user", content="newest question")
    guard = _small_window_guard(tmp_path, 300)
    estimate = guard.check([system, old, answer, last], model="tiny-gpt", max_tokens=100, trim=True)
    assert estimate.messages == [system, last]
    assert estimate.messages_dropped == 2


def test_trim_cannot_help_when_the_newest_turn_alone_is_too_long(tmp_path: Path) -> None:
    guard = _small_window_guard(tmp_path, 300)
    messages = [Message(role="system", content="S"), Message(role="user", content="x " * 400)]
    with pytest.raises(ContextWindowExceededError) as raised:
        guard.check(messages, model="tiny-gpt", max_tokens=100, trim=True)
    assert "trimming cannot help" in str(raised.value)
    assert "200 tokens left for the prompt" in str(raised.value)


def test_sliding_window_with_margin_for_anthropic() -> None:
    prices = load_prices()
    price = prices.get("claude-haiku-4-5")
    messages = _conversation(21, 200)
    full = count_input_tokens(messages, model="claude-haiku-4-5", price=price)
    kept, counted = sliding_window(messages, model="claude-haiku-4-5", price=price, room=full // 2)
    assert counted <= full // 2
    assert counted == count_input_tokens(kept, model="claude-haiku-4-5", price=price)
    assert kept[0].role == "system" and kept[1].role == "user" and kept[-1] == messages[-1]


# --- End to end, through a real worker ------------------------------------------------


def test_over_budget_job_fails_before_any_provider_call(
    worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    job = submit(
        [{"role": "user", "content": "Write a long essay."}],
        user_id,
        model="gpt-4o",
        max_tokens=16_000,
    )
    with pytest.raises(BudgetExceededError) as raised:
        job.get(timeout=30)
    message = str(raised.value)
    # 16000 output tokens at $10 per 1M alone are $0.16, over the default $0.10.
    assert re.search(r"Estimated worst-case cost \$0\.160\d+", message), message
    assert "per-request budget $0.1 (LLM_MAX_COST_PER_REQUEST)" in message
    assert fake.requests() == 0


@pytest.fixture(scope="module")
def small_window_worker(app: Any, worker_env: dict[str, str], run_dir: Path) -> Iterator[Worker]:
    """A worker on its own queue with a tiny-window model and the unknown-model fallback."""
    prices = run_dir / f"prices-{uuid.uuid4().hex[:6]}.json"
    prices.write_text(
        json.dumps(
            {
                "models": {
                    "gpt-4o-mini": {
                        "provider": "openai",
                        "input": 0.15,
                        "output": 0.60,
                        "cached_input": 0.075,
                        "context_window": 1000,
                        "max_output_tokens": 16384,
                    }
                }
            }
        )
    )
    env = {
        **worker_env,
        "LLM_PRICES_FILE": str(prices),
        "LLM_UNKNOWN_MODEL_PRICING": "fallback",
    }
    process = Worker(env, run_dir, concurrency=2, queues=f"guard-{uuid.uuid4().hex[:6]}")
    try:
        process.wait_ready(app)
        yield process
    finally:
        process.stop()


def _queue(worker: Worker) -> str:
    return str(worker.process.args[worker.process.args.index("-Q") + 1])


def test_trimmed_job_sends_the_window_and_reports_dropped(
    small_window_worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    messages = [m.model_dump() for m in _conversation(9, 40)]
    result = submit(
        messages, user_id, max_tokens=200, trim=True, queue=_queue(small_window_worker)
    ).get(timeout=30)
    sent = fake.seen[0].body["messages"]
    assert sent[0] == messages[0] and sent[1:] == messages[len(messages) - len(sent) + 1 :]
    assert result["messages_dropped"] == len(messages) - len(sent) > 0
    record = _job_record(small_window_worker, result["request_id"])
    assert record["messages_dropped"] == result["messages_dropped"]


def test_untrimmed_job_over_the_window_fails_with_no_call(
    small_window_worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    messages = [m.model_dump() for m in _conversation(9, 40)]
    job = submit(messages, user_id, max_tokens=200, queue=_queue(small_window_worker))
    with pytest.raises(ContextWindowExceededError) as raised:
        job.get(timeout=30)
    assert "context window of 1000 tokens" in str(raised.value)
    assert fake.requests() == 0


def test_unknown_model_fallback_prices_conservatively_and_warns(
    small_window_worker: Worker, fake: FakeProvider, user_id: str
) -> None:
    fake.usage = {"input_tokens": 1000, "output_tokens": 100, "cached_input_tokens": 0}
    model = "gpt-unlisted-test"
    result = submit(
        [{"role": "user", "content": "hi"}],
        user_id,
        model=model,
        max_tokens=50,
        queue=_queue(small_window_worker),
    ).get(timeout=30)
    assert fake.seen[0].body["model"] == model
    # The highest rates on record (of every model genai-prices and llmq know), no cache
    # discount.
    fallback = load_prices().fallback_price("openai")
    assert fallback.input >= load_prices().get("gpt-4o").input
    expected = (1000 * fallback.input + 100 * fallback.output) / Decimal(10**6)
    assert result["cost_usd"] == pytest.approx(float(expected), abs=1e-12)
    warnings = [
        r
        for r in _records(small_window_worker)
        if r.get("event") == "unknown_model_fallback" and r.get("model") == model
    ]
    assert warnings and warnings[0]["level"] == "WARNING"
    assert "LLM_PRICES_FILE" in warnings[0]["message"]


def _records(worker: Worker) -> list[dict[str, Any]]:
    return worker.records()


def _job_record(worker: Worker, request_id: str) -> dict[str, Any]:
    found = [
        r
        for r in _records(worker)
        if r.get("event") == "llm_job" and r.get("request_id") == request_id
    ]
    assert len(found) == 1
    return found[0]
