"""Settings: environment names, validation messages, the provider chain."""

from __future__ import annotations

import pytest

from worker.errors import ConfigurationError
from worker.settings import load_settings


def test_defaults_run_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.provider == "extractive"
    assert settings.chain == ["extractive"]
    settings.check_worker_ready()


def test_reads_original_design_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LLM_PROVIDER": "anthropic",
        "ANTHROPIC_API_KEY": "sk-ant-secret-123456",
        "LLM_MODEL": "claude-sonnet-4-5",
        "LLM_MAX_TOKENS": "512",
        "LLM_TEMPERATURE": "0",
        "LLM_TIMEOUT_SECONDS": "12.5",
        "LLM_MAX_COST_PER_REQUEST": "0.5",
        "LLM_FALLBACKS": "openai, gemini",
        "OPENAI_API_KEY": "sk-1234567",
        "GOOGLE_API_KEY": "AIza-1234567",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.chain == ["anthropic", "openai", "gemini"]
    assert settings.model_for("anthropic") == "claude-sonnet-4-5"
    assert settings.model_for("openai") == "gpt-4o-mini"
    assert settings.model_for("gemini") == "gemini-2.0-flash"
    assert (settings.max_tokens, settings.temperature, settings.timeout_seconds) == (512, 0, 12.5)
    assert settings.max_cost_per_request == 0.5
    assert "sk-ant-secret" not in repr(settings)
    settings.check_worker_ready()


@pytest.mark.parametrize(
    ("provider", "fallbacks", "missing"),
    [
        ("openai", "", "OPENAI_API_KEY"),
        ("anthropic", "", "ANTHROPIC_API_KEY"),
        ("gemini", "", "GOOGLE_API_KEY"),
        ("extractive", "anthropic", "ANTHROPIC_API_KEY"),
    ],
)
def test_missing_key_for_any_provider_in_chain_is_named(
    monkeypatch: pytest.MonkeyPatch, provider: str, fallbacks: str, missing: str
) -> None:
    monkeypatch.setenv("LLM_PROVIDER", provider)
    monkeypatch.setenv("LLM_FALLBACKS", fallbacks)
    with pytest.raises(ConfigurationError) as raised:
        load_settings().check_worker_ready()
    assert missing in str(raised.value)
    assert "Fix: export" in str(raised.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_PROVIDER", "openia"),
        ("LLM_MAX_TOKENS", "lots"),
        ("LLM_TEMPERATURE", "7"),
        ("LLM_FALLBACKS", "openai,bard"),
        ("REDIS_URL", "http://localhost:6379"),
        ("LLM_TIMEOUT_SECONDS", "-1"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert name in str(raised.value)
    assert ".env.example" in str(raised.value)


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://h:6380/0", "sentinel://h1:26379;sentinel://h2:26379"]
)
def test_redis_url_schemes_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    settings = load_settings()
    assert settings.broker == settings.backend == url


def test_broker_and_backend_can_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://broker:6379/0")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://backend:6379/1")
    settings = load_settings()
    assert (settings.broker, settings.backend) == (
        "redis://broker:6379/0",
        "redis://backend:6379/1",
    )


def test_job_deadline_must_stay_below_visibility_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_VISIBILITY_TIMEOUT", "30")
    monkeypatch.setenv("LLM_JOB_DEADLINE_SECONDS", "30")
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    message = str(raised.value)
    assert "LLM_JOB_DEADLINE_SECONDS=30 must be at least 6s below LLM_VISIBILITY_TIMEOUT=30" in (
        message
    )
    assert "Fix:" in message
    # Waiting out a deferral plus running must fit: 5 s of margin is left for the sweep.
    monkeypatch.setenv("LLM_JOB_DEADLINE_SECONDS", "25")
    with pytest.raises(ConfigurationError):
        load_settings()
    monkeypatch.setenv("LLM_JOB_DEADLINE_SECONDS", "24")
    assert load_settings().job_deadline_seconds == 24


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_RETRY_ATTEMPTS", "0"),
        ("LLM_BREAKER_FAILURE_RATE", "1.5"),
        ("LLM_ON_TRUNCATION", "ignore"),
        ("LLM_TRUNCATION_RETRY_FACTOR", "1"),
    ],
)
def test_invalid_resilience_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert name in str(raised.value)
