"""The price table: genai-prices' maintained data, plus llmq's own overrides, kept as data.

Prices and context windows come from the `genai-prices` package's offline snapshot
(Decimal prices, cache read and write rates, tiers), read as installed and never
updated from the network. `worker/prices.toml` adds what genai-prices does not carry
(maximum output tokens, reasoning capabilities, local models such as `extractive`) and
corrects what it gets wrong; `LLM_PRICES_FILE` extends and overrides both.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import genai_prices
from genai_prices import types as genai
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from worker.errors import ConfigurationError, UnknownModelError
from worker.models import Usage

PACKAGED = "worker/prices.toml"
GENAI_PRICES = f"genai-prices {version('genai-prices')}"
UnknownModelPolicy = Literal["reject", "fallback"]
logger = logging.getLogger("llmq.prices")
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_PER_TOKEN = Decimal(1_000_000)
# genai-prices' provider ids for llmq's providers (Gemini is Google's).
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}
# Fields an override may set that change what a call costs: setting any of them prices
# the model by llmq's own formula instead of genai-prices' (a correction wins).
PRICE_FIELDS = frozenset({"input", "output", "cached_input", "cache_write_input", "provider"})


class ModelPrice(BaseModel):
    """USD per 1M tokens, the model's limits and what it can be asked."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    # A tiered price's base rate (below its first threshold); `cost` applies the tiers.
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    # Anthropic's prompt-cache writes (5-minute), dearer than plain input.
    cache_write_input: Decimal | None = Field(None, ge=0)
    batch_input: Decimal | None = Field(None, ge=0)
    batch_output: Decimal | None = Field(None, ge=0)
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    # An OpenAI reasoning model (o-series, gpt-5): max_completion_tokens, default
    # temperature only, no top_p, penalties or stop.
    reasoning: bool = False
    # The reasoning_effort values the model takes; empty: it takes none.
    reasoning_efforts: list[str] = Field(default_factory=list)
    # Anthropic extended thinking (thinking.budget_tokens).
    thinking: bool = False
    # Native structured outputs (Anthropic output_config.format); others use tool use.
    structured_outputs: bool = False
    # Where the rates come from: "genai-prices X.Y.Z" or "llmq".
    source: str = "llmq"
    _exact: genai.ModelPrice | None = PrivateAttr(default=None)

    def cost(self, usage: Usage) -> Decimal:
        """Exact USD for `usage`: cached input at the cache-read rate, cache writes at theirs."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        written = min(usage.cache_write_input_tokens, usage.input_tokens - cached)
        if self._exact is not None:
            # genai-prices' own arithmetic, tiers included; its input_tokens count every
            # input token, cache reads and writes among them, as llmq's do.
            calculation = self._exact.calc_price(
                genai_prices.Usage(
                    input_tokens=usage.input_tokens,
                    cache_read_tokens=cached,
                    cache_write_tokens=written,
                    output_tokens=usage.output_tokens,
                )
            )
            return Decimal(calculation["total_price"])
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write_input is None else self.cache_write_input
        total = (
            (usage.input_tokens - cached - written) * self.input
            + cached * cached_rate
            + written * write_rate
            + usage.output_tokens * self.output
        )
        return total / _PER_TOKEN

    def worst_case(self, *, input_tokens: int, output_tokens: int) -> Decimal:
        """USD of a call at most this large, uncached: tiers applied as the bill would."""
        return self.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens))

    def cache_discount(self, usage: Usage) -> Decimal:
        """USD the cached input tokens saved against the full input price."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return cached * (self.input - cached_rate) / _PER_TOKEN


# Who serves a model we have no entry for, guessed from its name.
_PROVIDER_PREFIXES = (
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("claude-", "anthropic"),
    ("gemini-", "gemini"),
)


class PriceTable:
    """Prices by model name, from genai-prices, the packaged file and the user's overrides."""

    def __init__(
        self,
        models: dict[str, ModelPrice],
        *,
        sources: list[str],
        as_of: str,
        unknown: UnknownModelPolicy = "reject",
    ) -> None:
        self.models = models
        self.sources = sources
        self.as_of = as_of
        self.unknown = unknown
        # Unknown models already priced at the fallback, so later look-ups agree.
        self._fallbacks: dict[str, ModelPrice] = {}

    def get(self, model: str, *, provider: str | None = None) -> ModelPrice:
        """The price of `model` (dated snapshots fall back to their base name).

        An unknown model is rejected, unless the policy is "fallback": then it gets
        the conservative `fallback_price`, served by the provider its name implies
        (else `provider`, the one asked to serve it), and a warning is logged.
        """
        price = (
            self.models.get(model)
            or self.models.get(_DATE_SUFFIX.sub("", model))
            or self.models.get(genai_id(model) or "")
            or self._fallbacks.get(model)
        )
        if price is not None:
            return price
        owner = next((p for prefix, p in _PROVIDER_PREFIXES if model.startswith(prefix)), provider)
        if self.unknown == "reject" or owner is None:
            raise UnknownModelError(
                f"Unknown model {model!r}: no price or context window on record "
                f"({GENAI_PRICES} has none for llmq's providers either). "
                f"Fix: add a [models.{json.dumps(model)}] entry to your prices file "
                f"(LLM_PRICES_FILE; now {self.sources[-1]}) with provider, input, output, "
                "context_window and max_output_tokens"
                + (
                    ", or set LLM_UNKNOWN_MODEL_PRICING=fallback to price unknown models "
                    "conservatively."
                    if self.unknown == "reject"
                    else ". Its provider cannot be told from its name, so even "
                    "LLM_UNKNOWN_MODEL_PRICING=fallback cannot price it."
                )
            )
        fallback = self._fallbacks.setdefault(model, self.fallback_price(owner))
        logger.warning(
            "unknown model %r priced at the fallback (the highest rates on record: "
            "$%s in, $%s out per 1M tokens; the smallest context window, %d tokens). "
            "Add it to LLM_PRICES_FILE to price it exactly.",
            model,
            fallback.input,
            fallback.output,
            fallback.context_window,
            extra={"event": "unknown_model_fallback", "model": model, "provider": owner},
        )
        return fallback

    def fallback_price(self, provider: str) -> ModelPrice:
        """A conservative price: the highest rates and the tightest limits on record."""
        known = [p for p in self.models.values() if p.provider != "extractive"] or list(
            self.models.values()
        )
        return ModelPrice(
            provider=provider,
            input=max(p.input for p in known),
            output=max(p.output for p in known),
            # No cache discount: an unknown model's cache may not exist.
            cached_input=None,
            cache_write_input=None,
            batch_input=None,
            batch_output=None,
            context_window=min(p.context_window for p in known),
            max_output_tokens=min(p.max_output_tokens for p in known),
        )


def _base(price: Decimal | genai.TieredPrices | None) -> Decimal | None:
    """A flat rate, or a tiered price's base rate."""
    if price is None:
        return None
    return Decimal(price.base if isinstance(price, genai.TieredPrices) else price)


@dataclass
class _Entries:
    """Model fields by name as the sources are merged, before they are validated."""

    fields: dict[str, dict[str, Any]]
    # genai-prices' own rates, for the models priced by them.
    exact: dict[str, genai.ModelPrice]
    # The models some file named (every field must then be there).
    named: set[str] = field(default_factory=set)


def genai_models(now: datetime | None = None) -> _Entries:
    """llmq's providers' text models in genai-prices' bundled snapshot, by genai-prices id.

    Read from the package's data module, not `genai_prices.calc_price`, whose snapshot an
    `UpdatePrices` started anywhere in the process would replace with one from the network.
    """
    from genai_prices.data import providers

    when = now or datetime.now(tz=UTC)
    entries = _Entries(fields={}, exact={})
    for ours, theirs in GENAI_PROVIDERS.items():
        provider = next(p for p in providers if p.id == theirs)
        for info in provider.models:
            rates = info.get_prices(when)
            price_in, price_out = _base(rates.input_mtok), _base(rates.output_mtok)
            # Embedding, image and audio models have no text-in/text-out price; Google
            # also lists the Claude models Vertex resells, which Gemini's API does not serve.
            if price_in is None or price_out is None or info.id in entries.fields:
                continue
            if ours == "gemini" and not info.id.startswith(("gemini", "gemma")):
                continue
            entries.fields[info.id] = {
                "provider": ours,
                "input": price_in,
                "output": price_out,
                "cached_input": _base(rates.cache_read_mtok),
                "cache_write_input": _base(rates.cache_write_mtok),
                # Some have no window on record: a file must add it, or it stays unknown.
                **({"context_window": info.context_window} if info.context_window else {}),
                "source": GENAI_PRICES,
                **capabilities(ours, info.id),
            }
            tiered = (rates.input_mtok, rates.output_mtok, rates.cache_read_mtok)
            if any(isinstance(rate, genai.TieredPrices) for rate in tiered):
                # Flat rates give the same Decimal by llmq's formula, ~50x faster than
                # genai-prices' unit registry; tiers need its arithmetic.
                entries.exact[info.id] = rates
    return entries


@lru_cache(maxsize=1024)
def genai_id(model: str) -> str | None:
    """The genai-prices model that `model` names (a dated snapshot, an alias), if any."""
    from genai_prices.data import providers

    for theirs in GENAI_PROVIDERS.values():
        provider = next(p for p in providers if p.id == theirs)
        found = provider.find_model(model)
        if found is not None:
            return found.id
    return None


def capabilities(provider: str, model: str) -> dict[str, Any]:
    """What a model can be asked, told from its family's name (the files may correct it)."""
    if provider == "openai" and re.match(r"(o\d|gpt-5)(?!.*-chat)", model):
        efforts = ["low", "medium", "high"]
        if model.startswith("gpt-5"):
            efforts = ["minimal", *efforts]
        return {"reasoning": True, "reasoning_efforts": efforts}
    if provider == "gemini" and re.match(r"gemini-(2\.5|[3-9])", model):
        return {"reasoning_efforts": ["low", "medium", "high"]}
    if provider == "anthropic" and re.match(r"claude-(3-7|(opus|sonnet|haiku)-[4-9]|[4-9])", model):
        # Native structured outputs arrived with the 4.5 generation (and Opus 4.1).
        native = bool(re.match(r"claude-((opus|sonnet|haiku)-4-[5-9]|opus-4-1|[5-9])", model))
        return {"thinking": True, "structured_outputs": native}
    return {}


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return data


def _merge(entries: _Entries, data: dict[str, Any], source: str) -> None:
    """Apply a file's entries: new models in full, known ones field by field."""
    for name, entry in data.get("models", {}).items():
        if not isinstance(entry, dict):
            raise ConfigurationError(f"Invalid price file {source}: [models.{name}] is no table")
        known = name if name in entries.fields else genai_id(name)
        base = entries.fields.get(known or "", {})
        entries.fields[name] = {**base, **entry}
        entries.named.add(name)
        if PRICE_FIELDS & entry.keys():
            # A correction of a price: llmq's fields, not genai-prices' rates, price it.
            entries.exact.pop(name, None)
            entries.fields[name]["source"] = "llmq"
        elif known in entries.exact:
            entries.exact[name] = entries.exact[known]


def _build(entries: _Entries, sources: list[str]) -> dict[str, ModelPrice]:
    models: dict[str, ModelPrice] = {}
    for name, fields in entries.fields.items():
        if name not in entries.named and "context_window" not in fields:
            continue  # genai-prices alone cannot size its window: unknown until a file does
        # Without a known output limit, the window bounds it; the provider enforces its own.
        fields = {"max_output_tokens": fields.get("context_window", 1), **fields}
        try:
            price = ModelPrice(**fields)
        except (ValidationError, TypeError) as exc:
            raise ConfigurationError(
                f"Invalid price file entry [models.{json.dumps(name)}] (from "
                f"{' + '.join(sources)}): {exc}"
            ) from None
        price._exact = entries.exact.get(name)
        models[name] = price
    return models


@lru_cache(maxsize=8)
def load_prices(
    user_file: str | None = None, *, unknown: UnknownModelPolicy = "reject"
) -> PriceTable:
    """genai-prices' models, then the packaged file, then `user_file` (TOML or JSON)."""
    entries = genai_models()
    packaged = tomllib.loads(resources.files("worker").joinpath("prices.toml").read_text())
    _merge(entries, packaged, PACKAGED)
    sources = [GENAI_PRICES, PACKAGED]
    as_of = str(packaged.get("prices_as_of", "unknown"))
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise ConfigurationError(
                f"LLM_PRICES_FILE={user_file}: no such file. Fix the path or unset it."
            )
        try:
            data = _read(path)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"LLM_PRICES_FILE={user_file}: {exc}") from None
        _merge(entries, data, user_file)
        sources.append(user_file)
        as_of = str(data.get("prices_as_of", as_of))
    return PriceTable(_build(entries, sources), sources=sources, as_of=as_of, unknown=unknown)
