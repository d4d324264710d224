"""Every configured secret, and the one function that takes them out of a string.

Provider keys, passwords in Redis URLs and Flower's credentials must never reach a log,
a result, an exception, Redis or Flower, even when a provider quotes a key back in an
error body. Every string llmq builds from outside input passes through `scrub`: the
log handler, llmq's exceptions, provider answers and task events all call it.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any
from urllib.parse import unquote, urlparse

MASK = "***"
# Shorter values would match ordinary text; no real key or password we accept is this short.
MIN_SECRET_LENGTH = 6

KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "FLOWER_PASSWORD")
URL_VARIABLES = ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@")

_lock = threading.RLock()
_secrets: tuple[str, ...] | None = None
# Reading the settings can itself raise an llmq error, whose message is scrubbed: that
# nested call gets the environment's secrets instead of recursing.
_collecting = False


def url_passwords(url: str | None) -> list[str]:
    """The passwords in a Redis URL (sentinel URLs list several hosts with ';')."""
    found: list[str] = []
    for part in (url or "").split(";"):
        try:
            password = urlparse(part.strip()).password
        except ValueError:
            continue
        if password:
            found.extend({password, unquote(password)})
    return found


def configured() -> tuple[str, ...]:
    """The secrets of this process: from the settings (and .env) and the environment."""
    global _secrets, _collecting
    with _lock:
        if _secrets is not None:
            return _secrets
        if _collecting:
            return _collect(with_settings=False)
        _collecting = True
        try:
            _secrets = _collect(with_settings=True)
        finally:
            _collecting = False
        return _secrets


def _collect(*, with_settings: bool) -> tuple[str, ...]:
    values: list[str] = [os.environ.get(name, "") for name in KEY_VARIABLES]
    for name in URL_VARIABLES:
        values.extend(url_passwords(os.environ.get(name)))
    basic = os.environ.get("FLOWER_BASIC_AUTH", "")
    values.extend(pair.partition(":")[2] for pair in basic.split(",") if ":" in pair)
    if with_settings:
        try:
            from worker.settings import get_settings

            settings = get_settings()
            for provider in ("openai", "anthropic", "gemini"):
                key = settings.api_key(provider)
                values.append(key.get_secret_value() if key else "")
            for url in (settings.redis_url, settings.broker_url, settings.result_backend):
                values.extend(url_passwords(url))
        except Exception:  # invalid settings must not stop the scrubbing
            pass
    unique = {v.strip() for v in values if len(v.strip()) >= MIN_SECRET_LENGTH}
    # Longest first, so a secret that contains another is removed whole.
    return tuple(sorted(unique, key=len, reverse=True))


def reset() -> None:
    """Forget the collected secrets (tests that change the environment)."""
    global _secrets
    with _lock:
        _secrets = None


def scrub(text: str) -> str:
    """`text` with every configured secret and every password in a URL masked."""
    for secret in configured():
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text and "@" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return text


def scrub_value(value: Any) -> Any:
    """`value` with `scrub` applied to every string inside it (dicts, lists, tuples)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_value(k): scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_value(v) for v in value)
    return value
