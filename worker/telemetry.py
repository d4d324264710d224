"""Telemetry: Prometheus metrics and OpenTelemetry GenAI spans, fed by the job and call records.

Off unless configured. With LLM_METRICS_PORT unset and no OTEL_EXPORTER_OTLP_ENDPOINT,
every hook returns at once, and this module imports neither prometheus_client's server nor
the OpenTelemetry SDK.
The hooks read the same fields as the `llm_job` and `llm_call` log records, and only
whitelisted ones: no prompt or completion text reaches a metric or a span.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from worker.settings import Settings

# Long enough for a reasoning model's minutes-long answer, fine enough for a cache hit.
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
OTHER_TENANT = "other"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# gen_ai.provider.name values of the GenAI semantic conventions.
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
TRACER_NAME = "llmq"


class Metrics:
    """The worker's Prometheus series, in a registry of their own."""

    def __init__(self, *, tenants: list[str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        # The process's CPU, memory and open files, next to what it did with them.
        ProcessCollector(registry=self.registry)
        self.tenants = frozenset(tenants)
        tenant = ["tenant"] if tenants else []
        model = ["provider", "model"]
        r = self.registry

        def counter(name: str, doc: str, labels: list[str] | None = None) -> Any:
            return Counter(name, doc, labels or [], registry=r)

        self.jobs = counter(
            "llmq_jobs", "Job runs by outcome (a deferred job runs again).", ["outcome", *tenant]
        )
        self.calls = counter(
            "llmq_provider_calls", "Provider calls by outcome.", [*model, "outcome"]
        )
        self.input_tokens = counter("llmq_input_tokens", "Input tokens charged.", model)
        self.output_tokens = counter("llmq_output_tokens", "Output tokens charged.", model)
        self.cached_tokens = counter(
            "llmq_cached_input_tokens", "Input tokens read from the provider's cache.", model
        )
        self.reasoning_tokens = counter(
            "llmq_reasoning_tokens", "Reasoning tokens (within output tokens).", model
        )
        self.cost = counter("llmq_cost_usd", "USD charged for provider answers.", [*model, *tenant])
        self.cache_hits = counter("llmq_cache_hits", "Jobs answered from the response cache.")
        self.cache_misses = counter(
            "llmq_cache_misses", "Cacheable jobs the response cache could not answer."
        )
        self.cache_saved = counter("llmq_cache_saved_usd", "USD the response cache saved.")
        self.limit_rejections = counter(
            "llmq_rate_limit_rejections", "Jobs rejected by a rate limit.", ["limit"]
        )
        self.limit_deferrals = counter(
            "llmq_rate_limit_deferrals", "Rate-limited jobs deferred to run later.", ["limit"]
        )
        self.budget_rejections = counter(
            "llmq_budget_rejections", "Jobs rejected by a budget.", ["budget"]
        )
        self.breaker_state = Gauge(
            "llmq_breaker_state",
            "Circuit state this worker last saw: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
        )
        self.breaker_transitions = counter(
            "llmq_breaker_transitions",
            "Circuit state changes this worker's calls caused.",
            ["provider", "to"],
        )

        def histogram(name: str, doc: str, labels: list[str] | None = None) -> Any:
            return Histogram(name, doc, labels or [], buckets=LATENCY_BUCKETS, registry=r)

        self.queue_wait = histogram("llmq_queue_wait_seconds", "Seconds a job waited queued.")
        self.provider_latency = histogram(
            "llmq_provider_latency_seconds", "Seconds of one provider call.", model
        )
        self.total_latency = histogram(
            "llmq_job_latency_seconds", "Seconds a worker spent on a job, end to end."
        )

    def tenant(self, user_id: Any) -> dict[str, str]:
        """The tenant label, if the settings enable one: the user if listed, else 'other'."""
        if not self.tenants:
            return {}
        return {"tenant": user_id if user_id in self.tenants else OTHER_TENANT}

    def job(self, fields: Mapping[str, Any]) -> None:
        """Count one `llm_job` record."""
        kind = fields.get("error_kind")
        reused = fields.get("reused")
        outcome = kind or {"cache": "cache_hit", "replay": "replayed"}.get(str(reused), "completed")
        self.jobs.labels(outcome=outcome, **self.tenant(fields.get("user_id"))).inc()
        if reused == "cache":
            self.cache_hits.inc()
            self.cache_saved.inc(float(fields.get("cost_saved_usd") or 0.0))
        elif reused is None and fields.get("cacheable"):
            self.cache_misses.inc()
        if kind == "RateLimitedError":
            limit = (fields.get("rate_limit") or {}).get("limit") or "unknown"
            self.limit_rejections.labels(limit=limit).inc()
        elif kind in ("BudgetExceededError", "DailyBudgetExceededError"):
            budget = "daily" if kind == "DailyBudgetExceededError" else "request"
            self.budget_rejections.labels(budget=budget).inc()
        if fields.get("queue_wait_ms") is not None:
            self.queue_wait.observe(float(fields["queue_wait_ms"]) / 1000)
        if fields.get("latency_ms") is not None:
            self.total_latency.observe(float(fields["latency_ms"]) / 1000)

    def call(self, fields: Mapping[str, Any]) -> None:
        """Count one `llm_call` record: its outcome, tokens, cost and latency."""
        model = {"provider": str(fields.get("provider")), "model": str(fields.get("model"))}
        self.calls.labels(**model, outcome=fields.get("error_kind") or "ok").inc()
        for series, name in (
            (self.input_tokens, "input_tokens"),
            (self.output_tokens, "output_tokens"),
            (self.cached_tokens, "cached_input_tokens"),
            (self.reasoning_tokens, "reasoning_tokens"),
        ):
            series.labels(**model).inc(int(fields.get(name) or 0))
        self.cost.labels(**model, **self.tenant(fields.get("user_id"))).inc(
            float(fields.get("cost_usd") or 0.0)
        )
        if fields.get("latency_ms") is not None:
            self.provider_latency.labels(**model).observe(float(fields["latency_ms"]) / 1000)


_metrics: Metrics | None = None
_tracer: Any = None
_spans: dict[str, tuple[Any, Any]] = {}


def enabled() -> bool:
    """Whether any telemetry is on in this process."""
    return _metrics is not None or _tracer is not None


def metrics() -> Metrics | None:
    """The worker's metrics, if LLM_METRICS_PORT turned them on."""
    return _metrics


def enable_metrics(*, tenants: list[str]) -> Metrics:
    """Count into a new registry from now on (the worker serves it on LLM_METRICS_PORT)."""
    global _metrics
    _metrics = Metrics(tenants=tenants)
    return _metrics


def disable_metrics() -> None:
    """Stop counting: every hook returns at once again."""
    global _metrics
    _metrics = None


def tracing_configured() -> bool:
    """Whether the standard OTel environment asks for OTLP export."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def start_worker(settings: Settings) -> None:
    """Serve /metrics and export traces, as the settings and OTel environment ask."""
    if settings.metrics_port is not None and _metrics is None:
        from prometheus_client import start_http_server

        registry = enable_metrics(tenants=settings.metrics_tenants).registry
        try:
            start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
        except OSError as exc:
            disable_metrics()
            from worker.errors import ConfigurationError

            raise ConfigurationError(
                f"Cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port} "
                f"({exc.strerror}). Fix: give each worker on a host its own LLM_METRICS_PORT, "
                "or unset it to run without metrics."
            ) from None
    if tracing_configured():
        configure_tracing("llmq-worker")
        from celery import signals

        signals.task_prerun.connect(_task_started, weak=False)
        signals.task_postrun.connect(_task_finished, weak=False)
        signals.worker_shutdown.connect(_shutdown_tracing, weak=False)


def configure_tracing(service: str) -> None:
    """Export this process's spans over OTLP/HTTP (endpoint and options from OTEL_*)."""
    global _tracer
    if _tracer is not None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from worker.errors import ConfigurationError

        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is missing "
            f"({exc.name}). Fix: pip install 'llmq[telemetry]', or unset the endpoint."
        ) from None

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer(TRACER_NAME)


def _shutdown_tracing(**_: Any) -> None:
    from opentelemetry import trace

    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()  # flushes the spans still batched


def _otel_loaded() -> bool:
    # A producer traces only if its application set up OpenTelemetry (or llmq did):
    # otherwise tracing would cost every submit() for nothing. The API module alone
    # proves nothing: redis-py imports it whenever the SDK is installed.
    if _tracer is not None:
        return True
    api = sys.modules.get("opentelemetry.trace")
    return api is not None and not isinstance(api.get_tracer_provider(), api.ProxyTracerProvider)


@contextmanager
def publish_span(task_name: str, task_id: str) -> Iterator[None]:
    """The producer's span around sending one job; its context travels in the headers."""
    if not _otel_loaded():
        yield
        return
    from opentelemetry import trace

    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"send {task_name}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"messaging.system": "celery", "messaging.message.id": task_id},
    ):
        yield


def inject(headers: dict[str, Any]) -> None:
    """Put the current trace context (W3C traceparent) into a task's headers."""
    if not _otel_loaded():
        return
    from opentelemetry.propagate import inject as inject_context

    carrier: dict[str, str] = {}
    inject_context(carrier)
    for name in (TRACEPARENT, TRACESTATE):
        if name in carrier:
            headers.setdefault(name, carrier[name])


def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Start the job's worker span as a child of the producer's, and make it current."""
    if _tracer is None or task_id is None or task is None:
        return
    from opentelemetry import context, trace
    from opentelemetry.propagate import extract

    request = task.request
    carrier = {
        name: str(value)
        for name in (TRACEPARENT, TRACESTATE)
        if (value := getattr(request, name, None)) is not None
    }
    span = _tracer.start_span(
        str(task.name),
        context=extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes={"messaging.system": "celery", "messaging.message.id": task_id},
    )
    token = context.attach(trace.set_span_in_context(span))
    _spans[task_id] = (span, token)


def _task_finished(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    if task_id is None or task_id not in _spans:
        return
    from opentelemetry import context

    span, token = _spans.pop(task_id)
    if state:
        span.set_attribute("celery.state", state)
    span.end()
    context.detach(token)


def on_job(fields: Mapping[str, Any]) -> None:
    """One `llm_job` record: counted, and its llmq.* figures set on the worker span."""
    if _metrics is not None:
        _metrics.job(fields)
    if _tracer is not None:
        from opentelemetry import trace

        span = trace.get_current_span()
        span.set_attributes(
            _clean(
                {
                    "llmq.cost_usd": fields.get("cost_usd"),
                    "llmq.cached": bool(fields.get("cached")),
                    "llmq.queue_wait_ms": fields.get("queue_wait_ms"),
                    "llmq.reused": fields.get("reused"),
                    "gen_ai.request.model": fields.get("model"),
                    "error.type": fields.get("error_kind"),
                }
            )
        )


def on_call(fields: Mapping[str, Any]) -> None:
    """One `llm_call` record: counted, and one GenAI client span for the attempt."""
    if _metrics is not None:
        _metrics.call(fields)
    if _tracer is not None:
        _attempt_span(fields)


def on_deferred(limit: str | None) -> None:
    """A rate-limited job re-scheduled on the deferred queue."""
    if _metrics is not None:
        _metrics.limit_deferrals.labels(limit=limit or "unknown").inc()


def on_breaker(provider: str, state: str, *, transition: bool) -> None:
    """A circuit state this worker saw (closed, half_open, open), and whether it changed it."""
    if _metrics is None:
        return
    _metrics.breaker_state.labels(provider=provider).set(BREAKER_STATES[state])
    if transition:
        _metrics.breaker_transitions.labels(provider=provider, to=state).inc()


def _attempt_span(fields: Mapping[str, Any]) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    end = time.time_ns()
    start = end - int(float(fields.get("latency_ms") or 0.0) * 1_000_000)
    provider, model = str(fields.get("provider")), str(fields.get("model"))
    finish = fields.get("finish_reason")
    span = _tracer.start_span(
        f"chat {model}",
        kind=trace.SpanKind.CLIENT,
        start_time=start,
        attributes=_clean(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": GENAI_PROVIDERS.get(provider, f"llmq.{provider}"),
                "gen_ai.request.model": model,
                "gen_ai.response.model": model if fields.get("error_kind") is None else None,
                "gen_ai.response.finish_reasons": [str(finish)] if finish else None,
                "gen_ai.usage.input_tokens": fields.get("input_tokens"),
                "gen_ai.usage.output_tokens": fields.get("output_tokens"),
                "gen_ai.usage.cache_read.input_tokens": fields.get("cached_input_tokens"),
                "llmq.cost_usd": fields.get("cost_usd"),
                "llmq.cached": bool(fields.get("cached")),
                "llmq.queue_wait_ms": fields.get("queue_wait_ms"),
                "llmq.attempt": fields.get("attempt"),
                "error.type": fields.get("error_kind"),
            }
        ),
    )
    if fields.get("error_kind"):
        # The kind only: an error message may quote what the provider said about the prompt.
        span.set_status(Status(StatusCode.ERROR, str(fields["error_kind"])))
    span.end(end_time=end)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OTel attributes without the unknown (None) ones."""
    return {key: value for key, value in attributes.items() if value is not None}


def instrument_front(front: FastAPI) -> None:
    """The HTTP front's own /metrics: requests by route and status, and their latency."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
    from starlette.requests import Request
    from starlette.responses import Response

    registry = CollectorRegistry()
    requests = Counter(
        "llmq_http_requests",
        "HTTP requests by method, route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "llmq_http_request_seconds",
        "Seconds to answer an HTTP request.",
        ["method", "route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )

    @front.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        # The route's template, never the path: job ids would make a series each.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    @front.get("/metrics", include_in_schema=False)
    def serve_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
