"""The price table: per-model prices and limits, kept as data."""

from __future__ import annotations

import json
import logging
import re
import tomllib
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import ConfigurationError, UnknownModelError
from worker.models import Usage

PACKAGED = "worker/prices.toml"
UnknownModelPolicy = Literal["reject", "fallback"]
logger = logging.getLogger("llmq.prices")
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_PER_TOKEN = Decimal(1_000_000)


class ModelPrice(BaseModel):
    """USD per 1M tokens and the model's limits."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    batch_input: Decimal | None = Field(None, ge=0)
    batch_output: Decimal | None = Field(None, ge=0)
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)

    def cost(self, usage: Usage) -> Decimal:
        """Exact USD for `usage`, cached input tokens at the cached rate."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        total = (
            (usage.input_tokens - cached) * self.input
            + cached * cached_rate
            + usage.output_tokens * self.output
        )
        return total / _PER_TOKEN

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
    """Prices by model name, from the packaged file plus the user's overrides."""

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
            or self._fallbacks.get(model)
        )
        if price is not None:
            return price
        owner = next((p for prefix, p in _PROVIDER_PREFIXES if model.startswith(prefix)), provider)
        if self.unknown == "reject" or owner is None:
            raise UnknownModelError(
                f"Unknown model {model!r}: no price or context window on record. "
                f"Fix: add a [models.{json.dumps(model)}] entry to your prices file "
                f"(LLM_PRICES_FILE; now {self.sources[-1]}), or use one of: "
                f"{', '.join(sorted(self.models))}"
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
            batch_input=None,
            batch_output=None,
            context_window=min(p.context_window for p in known),
            max_output_tokens=min(p.max_output_tokens for p in known),
        )


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return data


def _parse(data: dict[str, Any], source: str) -> dict[str, ModelPrice]:
    try:
        return {name: ModelPrice(**entry) for name, entry in data.get("models", {}).items()}
    except (ValidationError, TypeError) as exc:
        raise ConfigurationError(f"Invalid price file {source}: {exc}") from None


@lru_cache(maxsize=8)
def load_prices(
    user_file: str | None = None, *, unknown: UnknownModelPolicy = "reject"
) -> PriceTable:
    """The packaged table, extended and overridden by `user_file` (TOML or JSON)."""
    packaged = tomllib.loads(resources.files("worker").joinpath("prices.toml").read_text())
    models = _parse(packaged, PACKAGED)
    sources = [PACKAGED]
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
        models.update(_parse(data, user_file))
        sources.append(user_file)
        as_of = str(data.get("prices_as_of", as_of))
    return PriceTable(models, sources=sources, as_of=as_of, unknown=unknown)
