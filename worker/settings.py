"""All configuration, read once from the environment and `.env`."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.errors import ConfigurationError

ProviderName = Literal["openai", "anthropic", "gemini", "extractive"]
TruncationPolicy = Literal["fail", "retry_larger", "accept"]
PROVIDERS: tuple[ProviderName, ...] = ("openai", "anthropic", "gemini", "extractive")

# Which variable holds each provider's key; `extractive` runs offline and needs none.
API_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GOOGLE_API_KEY",
}

GEMINI_OPENAI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"

# A cache version names a key prefix in Redis: no glob characters, so `llmq cache clear
# --version` can never match other versions.
CACHE_VERSION_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


OnLimit = Literal["fail", "defer"]
# A deferred job waits for its countdown and then runs for up to the job deadline while its
# worker holds it unacknowledged; this much of the visibility timeout is left as slack.
DEFER_MARGIN_SECONDS = 5.0
DEFAULT_CHUNK_TOKENS = 3000


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class UserLimits(BaseModel):
    """One user's overrides of the per-user limits (0 turns a limit off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens_per_hour: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=0)


class ProviderLimits(BaseModel):
    """A provider's (or one model's) account limits: requests and tokens per minute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    """Every llmq setting; field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=os.environ.get("LLMQ_ENV_FILE", ".env"),
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
    )

    # Providers
    provider: ProviderName = Field("extractive", validation_alias=_env("LLM_PROVIDER"))
    fallbacks: Annotated[list[ProviderName], NoDecode] = Field(
        default_factory=list, validation_alias=_env("LLM_FALLBACKS")
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("OPENAI_API_KEY"))
    anthropic_api_key: SecretStr | None = Field(None, validation_alias=_env("ANTHROPIC_API_KEY"))
    google_api_key: SecretStr | None = Field(None, validation_alias=_env("GOOGLE_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_env("OPENAI_BASE_URL"))
    anthropic_base_url: str | None = Field(None, validation_alias=_env("ANTHROPIC_BASE_URL"))
    gemini_base_url: str = Field(GEMINI_OPENAI_BASE_URL, validation_alias=_env("GEMINI_BASE_URL"))

    # Models: LLM_MODEL overrides the primary provider's model; fallbacks use their own.
    model: str | None = Field(None, validation_alias=_env("LLM_MODEL"))
    openai_model: str = Field("gpt-4o-mini", validation_alias=_env("LLM_OPENAI_MODEL"))
    anthropic_model: str = Field("claude-haiku-4-5", validation_alias=_env("LLM_ANTHROPIC_MODEL"))
    gemini_model: str = Field("gemini-2.0-flash", validation_alias=_env("LLM_GEMINI_MODEL"))

    # Request defaults
    max_tokens: int = Field(2048, ge=1, le=200_000, validation_alias=_env("LLM_MAX_TOKENS"))
    temperature: float = Field(0.7, ge=0.0, le=2.0, validation_alias=_env("LLM_TEMPERATURE"))
    timeout_seconds: float = Field(30.0, gt=0, le=600, validation_alias=_env("LLM_TIMEOUT_SECONDS"))
    # Images and documents (issue 15): OpenAI's documented 20 MB per image and 50 MB per
    # request; each provider's own, lower limits apply on top (worker/media.py).
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, validation_alias=_env("LLM_MAX_IMAGE_BYTES")
    )
    max_job_media_bytes: int = Field(
        50 * 1024 * 1024, ge=1, validation_alias=_env("LLM_MAX_JOB_MEDIA_BYTES")
    )

    # Cost
    max_cost_per_request: float = Field(
        0.10, gt=0, validation_alias=_env("LLM_MAX_COST_PER_REQUEST")
    )
    prices_file: str | None = Field(None, validation_alias=_env("LLM_PRICES_FILE"))

    # Spend tracking and budgets (cost issue)
    unknown_model_pricing: Literal["reject", "fallback"] = Field(
        "reject", validation_alias=_env("LLM_UNKNOWN_MODEL_PRICING")
    )
    user_daily_budget_usd: float | None = Field(
        None, gt=0, validation_alias=_env("LLM_USER_DAILY_BUDGET_USD")
    )
    daily_spend_alert_usd: float | None = Field(
        None, gt=0, validation_alias=_env("LLM_DAILY_SPEND_ALERT_USD")
    )
    budget_reservation_ttl: int = Field(
        600, ge=1, le=86_400, validation_alias=_env("LLM_BUDGET_RESERVATION_TTL")
    )
    spend_namespace: str = Field(
        "llmq", min_length=1, max_length=100, validation_alias=_env("LLM_SPEND_NAMESPACE")
    )

    # Rate limits (rate-limit issue)
    user_tokens_per_hour: int = Field(
        100_000, ge=0, validation_alias=_env("LLM_USER_TOKENS_PER_HOUR")
    )
    user_token_window_seconds: float = Field(
        3600.0, gt=0, le=86_400, validation_alias=_env("LLM_USER_TOKEN_WINDOW_SECONDS")
    )
    user_requests_per_minute: int = Field(
        0, ge=0, validation_alias=_env("LLM_USER_REQUESTS_PER_MINUTE")
    )
    user_request_window_seconds: float = Field(
        60.0, gt=0, le=86_400, validation_alias=_env("LLM_USER_REQUEST_WINDOW_SECONDS")
    )
    user_limits: dict[str, UserLimits] = Field(
        default_factory=dict, validation_alias=_env("LLM_USER_LIMITS")
    )
    provider_limits: dict[str, ProviderLimits] = Field(
        default_factory=dict, validation_alias=_env("LLM_PROVIDER_LIMITS")
    )
    provider_window_seconds: float = Field(
        60.0, gt=0, le=86_400, validation_alias=_env("LLM_PROVIDER_WINDOW_SECONDS")
    )
    rate_limit_prefix: str = Field(
        "llmq:rl", min_length=1, validation_alias=_env("LLM_RATE_LIMIT_PREFIX")
    )
    on_limit: OnLimit = Field("fail", validation_alias=_env("LLM_ON_LIMIT"))
    batch_on_limit: OnLimit = Field("defer", validation_alias=_env("LLM_BATCH_ON_LIMIT"))
    defer_max_wait_seconds: float = Field(
        600.0, gt=0, le=7 * 86_400, validation_alias=_env("LLM_DEFER_MAX_WAIT_SECONDS")
    )
    deferred_queue: str = Field(
        "llm.deferred", min_length=1, validation_alias=_env("LLM_DEFERRED_QUEUE")
    )

    # Response cache and idempotency (cache issue)
    cache_enabled: bool = Field(True, validation_alias=_env("LLM_CACHE_ENABLED"))
    cache_version: str = Field(
        "1", pattern=CACHE_VERSION_PATTERN, validation_alias=_env("LLM_CACHE_VERSION")
    )
    cache_ttl: int = Field(86_400, ge=1, validation_alias=_env("LLM_CACHE_TTL"))
    cache_wait_seconds: float = Field(
        60.0, ge=0, le=3600, validation_alias=_env("LLM_CACHE_WAIT_SECONDS")
    )

    # Retries, fallback, circuit breaker, truncation (resilience issue)
    retry_attempts: int = Field(3, ge=1, le=20, validation_alias=_env("LLM_RETRY_ATTEMPTS"))
    retry_initial_wait: float = Field(
        0.5, gt=0, le=60, validation_alias=_env("LLM_RETRY_INITIAL_WAIT_SECONDS")
    )
    retry_max_wait: float = Field(
        20.0, gt=0, le=600, validation_alias=_env("LLM_RETRY_MAX_WAIT_SECONDS")
    )
    job_deadline_seconds: float = Field(
        60.0, gt=0, le=3600, validation_alias=_env("LLM_JOB_DEADLINE_SECONDS")
    )
    breaker_failures: int = Field(5, ge=1, le=10_000, validation_alias=_env("LLM_BREAKER_FAILURES"))
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, validation_alias=_env("LLM_BREAKER_FAILURE_RATE")
    )
    breaker_min_calls: int = Field(20, ge=1, validation_alias=_env("LLM_BREAKER_MIN_CALLS"))
    breaker_window_seconds: int = Field(
        60, ge=1, le=86_400, validation_alias=_env("LLM_BREAKER_WINDOW_SECONDS")
    )
    breaker_cooldown_seconds: float = Field(
        30.0, gt=0, le=86_400, validation_alias=_env("LLM_BREAKER_COOLDOWN_SECONDS")
    )
    on_truncation: TruncationPolicy = Field("fail", validation_alias=_env("LLM_ON_TRUNCATION"))
    truncation_retry_factor: float = Field(
        2.0, gt=1, le=16, validation_alias=_env("LLM_TRUNCATION_RETRY_FACTOR")
    )

    # Latency metrics and health (observability issue)
    p95_alert_ms: float = Field(5000.0, gt=0, validation_alias=_env("LLM_P95_ALERT_MS"))
    metrics_window_seconds: int = Field(
        300, ge=10, le=86_400, validation_alias=_env("LLM_METRICS_WINDOW_SECONDS")
    )

    # Batch summarization (batch issue)
    # A few thousand tokens per call summarize well: models keep the detail of a short
    # text (long inputs lose their middle), and the calls of one document run in parallel.
    batch_chunk_tokens: int = Field(
        DEFAULT_CHUNK_TOKENS, ge=64, le=2_000_000, validation_alias=_env("LLM_BATCH_CHUNK_TOKENS")
    )
    batch_concurrency: int = Field(
        16, ge=1, le=10_000, validation_alias=_env("LLM_BATCH_CONCURRENCY")
    )
    # The providers' Batch APIs (issue 16): half price, up to 24 h (worker/batchapi/).
    batch_api: bool = Field(False, validation_alias=_env("LLM_BATCH_API"))
    # Between polls of one provider batch; capped below the visibility timeout.
    batch_api_poll_seconds: float = Field(
        60.0, gt=0, le=3600, validation_alias=_env("LLM_BATCH_API_POLL_SECONDS")
    )
    # Smaller batches than the providers' own limits (None: the provider's limit).
    batch_api_max_requests: int | None = Field(
        None, ge=1, le=100_000, validation_alias=_env("LLM_BATCH_API_MAX_REQUESTS")
    )
    batch_api_max_bytes: int | None = Field(
        None, ge=1024, validation_alias=_env("LLM_BATCH_API_MAX_BYTES")
    )
    # How long a submitted batch's worst case stays reserved in the daily budget.
    batch_api_reservation_ttl: int = Field(
        26 * 3600, ge=60, validation_alias=_env("LLM_BATCH_API_RESERVATION_TTL")
    )

    # Redis, Celery
    redis_url: str = Field("redis://localhost:6379/0", validation_alias=_env("REDIS_URL"))
    broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))
    result_backend: str | None = Field(None, validation_alias=_env("CELERY_RESULT_BACKEND"))
    sentinel_master: str = Field("mymaster", validation_alias=_env("REDIS_SENTINEL_MASTER"))
    visibility_timeout: int = Field(
        90, ge=5, le=3600, validation_alias=_env("LLM_VISIBILITY_TIMEOUT")
    )
    result_expires: int = Field(86_400, ge=60, validation_alias=_env("LLM_RESULT_EXPIRES"))
    worker_concurrency: int = Field(
        32, ge=1, le=1000, validation_alias=_env("LLM_WORKER_CONCURRENCY")
    )
    task_rate_limit: str | None = Field(None, validation_alias=_env("LLM_TASK_RATE_LIMIT"))

    # Logs
    log_prompts: bool = Field(False, validation_alias=_env("LLM_LOG_PROMPTS"))
    log_level: str = Field("INFO", validation_alias=_env("LLM_LOG_LEVEL"))

    # --- HTTP front (issue 18) ---------------------------------------------------
    # API keys on every request (`llmq keys create USER`); false only on a trusted network.
    http_auth: bool = Field(True, validation_alias=_env("LLM_HTTP_AUTH"))
    # Larger request bodies get 413 before they are read in full or parsed.
    http_max_body_bytes: int = Field(
        1_048_576, ge=1, le=1_073_741_824, validation_alias=_env("LLM_HTTP_MAX_BODY_BYTES")
    )
    # --- end HTTP front ------------------------------------------------------------

    # --- Telemetry (issue 17) ------------------------------------------------------
    # Each worker serves Prometheus /metrics on this port (unset: no server, no metrics).
    metrics_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=_env("LLM_METRICS_PORT")
    )
    metrics_host: str = Field("0.0.0.0", validation_alias=_env("LLM_METRICS_HOST"))
    # Users named here get their own `tenant` label (everyone else: "other"); unset, no
    # tenant label at all: user ids are unbounded, and Prometheus keeps a series per value.
    metrics_tenants: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("LLM_METRICS_TENANTS")
    )
    # --- end Telemetry ---------------------------------------------------------------

    @model_validator(mode="after")
    def _deadline_below_visibility_timeout(self) -> Settings:
        # A job still running when its message becomes visible again runs twice; a
        # deferred one also waits out its countdown first, so room must be left for that.
        room = self.visibility_timeout - self.job_deadline_seconds - DEFER_MARGIN_SECONDS
        if room < 1:
            raise ConfigurationError(
                "Invalid llmq configuration:\n  "
                f"LLM_JOB_DEADLINE_SECONDS={self.job_deadline_seconds:g} must be at least "
                f"{DEFER_MARGIN_SECONDS + 1:g}s below LLM_VISIBILITY_TIMEOUT="
                f"{self.visibility_timeout}: a job still running (or still waiting out a "
                "rate-limit deferral) when its message becomes visible again is delivered "
                "to a second worker. Fix: lower LLM_JOB_DEADLINE_SECONDS or raise "
                "LLM_VISIBILITY_TIMEOUT (see .env.example)."
            )
        return self

    @field_validator("fallbacks", "metrics_tenants", mode="before")
    @classmethod
    def _split_fallbacks(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        schemes = ("redis://", "rediss://", "sentinel://", "unix://")
        if not value.startswith(schemes):
            raise ValueError(
                f"must start with one of {', '.join(schemes)} "
                "(for example redis://localhost:6379/0)"
            )
        return value

    @property
    def chain(self) -> list[ProviderName]:
        """The primary provider followed by the fallbacks, without repeats."""
        seen: list[ProviderName] = []
        for name in [self.provider, *self.fallbacks]:
            if name not in seen:
                seen.append(name)
        return seen

    def model_for(self, provider: ProviderName) -> str:
        """The default model a provider serves when a job names none."""
        if provider == self.provider and self.model:
            return self.model
        return {
            "openai": self.openai_model,
            "anthropic": self.anthropic_model,
            "gemini": self.gemini_model,
            "extractive": "extractive",
        }[provider]

    def api_key(self, provider: ProviderName) -> SecretStr | None:
        """The configured key for a provider, or None."""
        return {
            "openai": self.openai_api_key,
            "anthropic": self.anthropic_api_key,
            "gemini": self.google_api_key,
        }.get(provider)

    @property
    def broker(self) -> str:
        """The broker URL: CELERY_BROKER_URL or REDIS_URL."""
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        """The result backend URL: CELERY_RESULT_BACKEND or REDIS_URL."""
        return self.result_backend or self.redis_url

    def check_worker_ready(self) -> None:
        """Fail fast unless every provider in the chain has what it needs to run."""
        problems = []
        for name in self.chain:
            env = API_KEY_ENV.get(name)
            key = self.api_key(name)
            if env and (key is None or not key.get_secret_value().strip()):
                problems.append(
                    f"{env} is not set, but provider '{name}' is in the chain "
                    f"(LLM_PROVIDER={self.provider}, LLM_FALLBACKS={','.join(self.fallbacks)}). "
                    f"Fix: export {env}=<your key>, or remove '{name}' from the chain."
                )
        if problems:
            raise ConfigurationError("Invalid llmq configuration:\n  " + "\n  ".join(problems))

    # --- Redis as deployed, and the fleet (issue 19) ----------------------------------
    # Kept together at the end of the class; read by worker/redis_checks.py and
    # worker/fleet.py.
    allow_evicting_redis: bool = Field(False, validation_alias=_env("LLM_ALLOW_EVICTING_REDIS"))
    fleet_heartbeat_seconds: float = Field(
        10.0, ge=0.5, le=300, validation_alias=_env("LLM_FLEET_HEARTBEAT_SECONDS")
    )
    # --- end of issue 19 settings -------------------------------------------------------


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning pydantic's report into one message per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            info = Settings.model_fields.get(field)
            alias = info.validation_alias if info else None
            env = alias.choices[0] if isinstance(alias, AliasChoices) else field
            value = error.get("input")
            shown = "<hidden>" if "KEY" in str(env) or "PASSWORD" in str(env) else repr(value)
            lines.append(f"{env}={shown}: {error['msg']}")
        from worker.secrets import scrub

        # A Redis URL's password must not reach the message (ConfigurationError scrubs
        # configured secrets, but these settings did not load).
        raise ConfigurationError(
            "Invalid llmq configuration:\n  "
            + "\n  ".join(scrub(line) for line in lines)
            + "\nFix the variables above in the environment or in .env (see .env.example)."
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()
