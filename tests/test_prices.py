"""The price table: genai-prices' data, llmq's overrides, unknown models, exact cache pricing."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest

from tests.harness import Worker
from worker.errors import ConfigurationError, UnknownModelError
from worker.models import Usage
from worker.prices import GENAI_PRICES, GENAI_PROVIDERS, PACKAGED, load_prices

REQUIRED = [
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "claude-haiku-4-5",
    "claude-sonnet-4-5",
    "gemini-2.0-flash",
    "gemini-2.5-flash",
]


def test_packaged_table_covers_the_required_models() -> None:
    prices = load_prices()
    assert prices.as_of and prices.sources == [GENAI_PRICES, PACKAGED]
    for model in REQUIRED:
        price = prices.get(model)
        assert price.input > 0 and price.output > price.input
        assert price.cached_input is not None and price.cached_input < price.input
        assert price.context_window > price.max_output_tokens > 0
        assert price.source == GENAI_PRICES
    free = prices.get("extractive")
    assert (free.input, free.output, free.cached_input) == (0, 0, 0)


def test_dated_snapshot_uses_its_base_price() -> None:
    assert load_prices().get("gpt-4o-2024-08-06") == load_prices().get("gpt-4o")


def _usage(input_tokens: int, output_tokens: int, *, cached: int) -> Usage:
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached)


@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        # gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M tokens.
        ("gpt-4o-mini", _usage(10_000, 500, cached=4_000), Decimal("0.0015")),
        ("gpt-4o-mini", _usage(1_234_567, 7, cached=1_000_001), Decimal("0.110189175")),
        # claude-haiku-4-5: $1 in, $0.10 cached, $5 out.
        ("claude-haiku-4-5", _usage(3_333, 1, cached=3_000), Decimal("0.000638")),
        # gemini-2.0-flash: $0.10 in, $0.025 cached, $0.40 out.
        ("gemini-2.0-flash", _usage(999, 333, cached=998), Decimal("0.00015825")),
    ],
)
def test_cached_input_priced_at_the_cached_rate_exactly(
    model: str, usage: Usage, expected: Decimal
) -> None:
    price = load_prices().get(model)
    assert price.cost(usage) == expected
    # The same usage without the cache discount costs more by exactly the discount.
    uncached = usage.model_copy(update={"cached_input_tokens": 0})
    assert price.cost(uncached) - price.cost(usage) == price.cache_discount(usage) > 0


def test_cached_tokens_never_exceed_input_tokens() -> None:
    price = load_prices().get("gpt-4o")
    odd = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=500)
    assert price.cost(odd) == Decimal(100) * Decimal("1.25") / 10**6


def test_user_file_extends_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        'prices_as_of = "2026-01-01"\n'
        '[models.gpt-4o-mini]\nprovider = "openai"\ninput = 0.2\noutput = 0.8\n'
        "context_window = 64000\nmax_output_tokens = 4096\n"
        '[models."llama-3.1-8b"]\nprovider = "openai"\ninput = 0\noutput = 0\n'
        "context_window = 8192\nmax_output_tokens = 2048\n"
    )
    prices = load_prices(str(path))
    assert prices.get("gpt-4o-mini").input == Decimal("0.2")
    assert prices.get("llama-3.1-8b").context_window == 8192
    assert prices.get("gpt-4o").input == Decimal("2.5")  # the packaged rest stays
    assert prices.as_of == "2026-01-01" and prices.sources[-1] == str(path)
    # A corrected price is llmq's formula now, not genai-prices' rates.
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert prices.get("gpt-4o-mini").cost(usage) == Decimal("1.0")
    assert prices.get("gpt-4o-mini").source == "llmq"


def test_bad_user_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        load_prices(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {"x": {"provider": "openai", "input": -1}}}')
    with pytest.raises(ConfigurationError, match="Invalid price file entry"):
        load_prices(str(bad))


def test_unknown_model_is_rejected_by_default_naming_model_and_file() -> None:
    with pytest.raises(UnknownModelError) as raised:
        load_prices().get("gpt-17-ultra")
    message = str(raised.value)
    assert "'gpt-17-ultra'" in message
    assert f"LLM_PRICES_FILE; now {PACKAGED}" in message
    assert "LLM_UNKNOWN_MODEL_PRICING=fallback" in message


def test_fallback_prices_unknown_models_conservatively_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prices = load_prices(unknown="fallback")
    known = [p for p in prices.models.values() if p.provider != "extractive"]
    with caplog.at_level(logging.WARNING, logger="llmq.prices"):
        price = prices.get("claude-opus-9")
    assert price.provider == "anthropic"  # told from the name
    assert price.input == max(p.input for p in known)
    assert price.output == max(p.output for p in known)
    assert price.input >= load_prices().get("claude-sonnet-4-5").input
    assert price.cached_input is None  # no discount assumed
    assert price.context_window == min(p.context_window for p in known)
    assert price.max_output_tokens == min(p.max_output_tokens for p in known)
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "unknown_model_fallback"]
    assert "claude-opus-9" in record.getMessage() and "LLM_PRICES_FILE" in record.getMessage()
    # Expensive for an unknown model means: never cheaper than any known model.
    usage = Usage(input_tokens=1000, output_tokens=1000, cached_input_tokens=500)
    assert all(price.cost(usage) >= p.cost(usage) for p in known)


def test_fallback_uses_the_serving_provider_when_the_name_says_nothing() -> None:
    prices = load_prices(unknown="fallback")
    assert prices.get("llama-3.1-local", provider="openai").provider == "openai"
    # Later look-ups without a hint agree with the first.
    assert prices.get("llama-3.1-local").provider == "openai"
    with pytest.raises(UnknownModelError, match="cannot be told from its name"):
        prices.get("mystery-model")


def _genai(model: str, provider: str, **usage: int) -> Decimal:
    calculation = genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=GENAI_PROVIDERS[provider]
    )
    return Decimal(calculation.total_price)


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o-mini", "openai"),
        ("gpt-5-mini", "openai"),
        ("o4-mini", "openai"),
        ("claude-haiku-4-5", "anthropic"),
        ("claude-sonnet-4-5", "anthropic"),
        ("gemini-2.5-flash", "gemini"),
    ],
)
def test_every_price_is_genai_prices_own(model: str, provider: str) -> None:
    usage = Usage(
        input_tokens=123_457,
        output_tokens=9_871,
        cached_input_tokens=50_003,
        cache_write_input_tokens=20_011 if provider == "anthropic" else 0,
        reasoning_tokens=4_000,
    )
    expected = _genai(
        model,
        provider,
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_input_tokens,
        output_tokens=usage.output_tokens,
    )
    assert abs(load_prices().get(model).cost(usage) - expected) < Decimal("1e-9")


def test_anthropic_cache_writes_cost_the_cache_write_rate() -> None:
    # claude-haiku-4-5: $1 in, $0.10 cache read, $1.25 cache write, $5 out per 1M.
    price = load_prices().get("claude-haiku-4-5")
    assert (price.cached_input, price.cache_write_input) == (Decimal("0.1"), Decimal("1.25"))
    usage = Usage(
        input_tokens=10_000,
        output_tokens=100,
        cached_input_tokens=6_000,
        cache_write_input_tokens=3_000,
    )
    expected = (1_000 * 1 + 6_000 * Decimal("0.1") + 3_000 * Decimal("1.25") + 100 * 5) / 10**6
    assert price.cost(usage) == expected == Decimal("0.00585")


def test_tiers_apply_past_their_threshold() -> None:
    # gemini-2.5-pro: $1.25 in / $10 out up to 200k input tokens, $2.5 / $15 beyond.
    price = load_prices().get("gemini-2.5-pro")
    assert price.input == Decimal("1.25") and price.context_window == 1_048_576
    small = price.worst_case(input_tokens=200_000, output_tokens=1_000)
    large = price.worst_case(input_tokens=200_001, output_tokens=1_000)
    assert small == (200_000 * Decimal("1.25") + 1_000 * 10) / 10**6
    assert large == (200_001 * Decimal("2.5") + 1_000 * 15) / 10**6


def test_reasoning_capabilities_come_with_the_model_data() -> None:
    prices = load_prices()
    assert (
        prices.get("gpt-5-mini").reasoning
        and "minimal" in prices.get("gpt-5-mini").reasoning_efforts
    )
    assert prices.get("o4-mini").reasoning
    assert (
        not prices.get("gpt-4o-mini").reasoning and not prices.get("gpt-4o-mini").reasoning_efforts
    )
    assert (
        prices.get("claude-haiku-4-5").thinking
        and prices.get("claude-haiku-4-5").structured_outputs
    )
    assert not prices.get("claude-3-5-haiku").thinking


def test_a_model_genai_prices_cannot_size_needs_a_file(tmp_path: Path) -> None:
    # genai-prices prices gemini-2.5-flash-preview but has no context window for it.
    with pytest.raises(UnknownModelError):
        load_prices().get("gemini-2.5-flash-preview")
    path = tmp_path / "window.toml"
    path.write_text('[models."gemini-2.5-flash-preview"]\ncontext_window = 1048576\n')
    price = load_prices(str(path)).get("gemini-2.5-flash-preview")
    assert price.context_window == 1_048_576 and price.source == GENAI_PRICES
    incomplete = tmp_path / "incomplete.toml"
    incomplete.write_text('[models."my-local-llm"]\nprovider = "openai"\ninput = 0\n')
    with pytest.raises(ConfigurationError, match="my-local-llm"):
        load_prices(str(incomplete))


def test_an_unpriced_model_stops_the_worker_at_start_up(
    worker_env: dict[str, str], run_dir: Path, app: Any, tmp_path: Path
) -> None:
    env = {**worker_env, "LLM_OPENAI_MODEL": "gpt-17-ultra"}
    refused = Worker(env, run_dir, queues="unpriced")
    try:
        status = refused.process.wait(timeout=60)
    finally:
        refused.stop()
    assert status == 78
    assert (
        "Unknown model 'gpt-17-ultra'" in refused.output() and "LLM_PRICES_FILE" in refused.output()
    )
    # Priced in the user's file, the same model starts.
    path = tmp_path / "gpt17.toml"
    path.write_text(
        '[models."gpt-17-ultra"]\nprovider = "openai"\ninput = 1\noutput = 2\n'
        "context_window = 32000\nmax_output_tokens = 4000\n"
    )
    started = Worker({**env, "LLM_PRICES_FILE": str(path)}, run_dir, queues="unpriced")
    try:
        started.wait_ready(app)
    finally:
        started.stop()
