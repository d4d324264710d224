"""Providers behind one interface; built lazily so producers never import the SDKs."""

from __future__ import annotations

import threading

from worker.providers.base import Provider, ProviderRequest
from worker.settings import ProviderName, Settings

__all__ = ["Provider", "ProviderRequest", "get_provider"]

_cache: dict[tuple[ProviderName, int], Provider] = {}
_lock = threading.Lock()


def get_provider(name: ProviderName, settings: Settings) -> Provider:
    """The process-wide provider `name` configured from `settings`."""
    key = (name, id(settings))
    with _lock:
        if key not in _cache:
            _cache[key] = _build(name, settings)
        return _cache[key]


def _key(name: ProviderName, settings: Settings) -> str:
    secret = settings.api_key(name)
    return secret.get_secret_value() if secret else ""


def _build(name: ProviderName, settings: Settings) -> Provider:
    if name == "extractive":
        from worker.providers.extractive import ExtractiveProvider

        return ExtractiveProvider()
    if name == "anthropic":
        from worker.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            api_key=_key(name, settings),
            base_url=settings.anthropic_base_url,
            timeout=settings.timeout_seconds,
        )
    from worker.providers.openai import OpenAIProvider

    base_url = settings.gemini_base_url if name == "gemini" else settings.openai_base_url
    return OpenAIProvider(
        name=name,
        api_key=_key(name, settings),
        base_url=base_url,
        timeout=settings.timeout_seconds,
    )
