"""The price table: per-model prices and limits, kept as data."""

from __future__ import annotations

import json
import re
import tomllib
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import ConfigurationError, UnknownModelError
from worker.models import Usage

PACKAGED = "worker/prices.toml"
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


class PriceTable:
    """Prices by model name, from the packaged file plus the user's overrides."""

    def __init__(self, models: dict[str, ModelPrice], *, sources: list[str], as_of: str) -> None:
        self.models = models
        self.sources = sources
        self.as_of = as_of

    def get(self, model: str) -> ModelPrice:
        """The price of `model` (dated snapshots fall back to their base name)."""
        price = self.models.get(model) or self.models.get(_DATE_SUFFIX.sub("", model))
        if price is None:
            raise UnknownModelError(
                f"Unknown model {model!r}: no price or context window on record. "
                f"Fix: add a [models.{json.dumps(model)}] entry to your prices file "
                f"(LLM_PRICES_FILE; now {self.sources[-1]}), or use one of: "
                f"{', '.join(sorted(self.models))}."
            )
        return price


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
def load_prices(user_file: str | None = None) -> PriceTable:
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
    return PriceTable(models, sources=sources, as_of=as_of)
