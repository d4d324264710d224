"""The Celery application: JSON only, late acks, short visibility timeout, events on.

Importing this module configures nothing: `app` is a proxy that builds the Celery app on
first use (reading the settings, adjusting kombu, connecting signals), so importing
`worker.errors` or `worker.models` from a web app never touches the environment or Redis.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, cast

from celery import Celery, signals
from celery.local import Proxy

from worker.constants import (
    BATCH_QUEUE,
    CELERY_DEFAULT_QUEUE,
    COMPLETE_TASK,
    QUEUE,
    SENT_AT_HEADER,
    TASK_PREFIX,
)
from worker.settings import Settings, get_settings

__all__ = ["BATCH_QUEUE", "QUEUE", "SENT_AT_HEADER", "app", "configure", "create_app"]

PUBLISH_RETRY_POLICY = {
    "max_retries": 10,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}
# Queues a worker consumes when started without -Q. Celery's default queue is among them:
# a producer with its own Celery app that sends `llm.complete` without routing lands there.
CONSUMED_BY_DEFAULT = (QUEUE, BATCH_QUEUE, CELERY_DEFAULT_QUEUE)


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options shared by the broker and the result backend."""
    options: dict[str, Any] = {
        # A SIGKILLed worker's unacked jobs run again after this many seconds
        # (kombu's default is an hour); jobs must finish well within it.
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for abandoned messages every few seconds instead of kombu's
        # 10 s x 10 throttle, so redelivery is bounded by the timeout above.
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "health_check_interval": 10,
    }
    if settings.broker.startswith("sentinel://") or settings.backend.startswith("sentinel://"):
        options["master_name"] = settings.sentinel_master
    return options


def ssl_options(url: str) -> dict[str, Any] | None:
    """Verify TLS certificates for rediss:// unless the URL says otherwise."""
    if not url.startswith("rediss://") or "ssl_cert_reqs" in url:
        return None
    import ssl

    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def configure(app: Celery, settings: Settings) -> None:
    """Apply llmq's Celery configuration from `settings`."""
    from worker.connections import pool_size

    options = transport_options(settings)
    app.conf.update(
        broker_url=settings.broker,
        result_backend=settings.backend,
        broker_transport_options=options,
        result_backend_transport_options=options,
        broker_use_ssl=ssl_options(settings.broker),
        redis_backend_use_ssl=ssl_options(settings.backend),
        broker_connection_retry_on_startup=True,
        # Workers reconnect for as long as Redis is away (a restart, a failover).
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # Producers ride out a Redis restart (seconds, with AOF) instead of raising:
        # publishing retries for up to ~15 s (0, 0.5, 1, 1.5, then every 2 s).
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        # Storing and reading results retries through a restart too.
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        # JSON only: pickle would let anyone who can write to Redis run code.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job is acknowledged after it finishes, and redelivered if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # LLM calls wait on HTTP: threads, many of them.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        result_expires=settings.result_expires,
        # redis-py 8 caps a pool at 100 connections; every worker thread may need one.
        redis_max_connections=pool_size(settings),
        task_default_queue=QUEUE,
        # Declared so a worker started without -Q consumes all three; each queue has its
        # own exchange and routing key, as Celery would create them, so no job is
        # delivered twice.
        task_queues={name: {"exchange": name, "routing_key": name} for name in CONSUMED_BY_DEFAULT},
        task_routes={COMPLETE_TASK: {"queue": QUEUE}, "llm.batch.*": {"queue": BATCH_QUEUE}},
        worker_hijack_root_logger=False,
        timezone="UTC",
    )


def create_app(settings: Settings | None = None) -> Celery:
    """A new Celery app configured from `settings` (the environment by default)."""
    from worker import redis_transport

    redis_transport.install()
    # PrivateAMQP: what llmq publishes never carries prompt text in its reprs or events.
    celery_app = Celery(
        "llmq",
        include=["worker.tasks"],
        set_as_current=False,
        amqp="worker.privacy:PrivateAMQP",
    )
    configure(celery_app, settings or get_settings())
    # Celery's signals are process-wide and connecting twice is a no-op.
    _connect_signals()
    return celery_app


_default: Celery | None = None
_default_lock = threading.RLock()


def _default_app() -> Celery:
    """llmq's app, built once per process with its tasks and signal handlers."""
    global _default
    with _default_lock:
        if _default is None:
            _default = create_app()
            _default.set_current()
            # `app.tasks` must hold llm.complete in a web app too, not only in a worker
            # (which imports worker.tasks through `include`).
            _default.on_after_finalize.connect(_register_tasks, weak=False)
        return _default


# Celery's own Proxy: `isinstance(app, Celery)` holds and every attribute is the app's.
app = cast(Celery, Proxy(_default_app))


def _register_tasks(**_: Any) -> None:
    import worker.tasks  # noqa: F401  (decorating registers them on the app)


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Record when a job was sent, for its queue wait."""
    if headers is not None and str(headers.get("task", "")).startswith(TASK_PREFIX):
        headers.setdefault(SENT_AT_HEADER, time.time())
        from worker import telemetry

        telemetry.inject(headers)


def _json_logging(**_: Any) -> None:
    """Celery's own output, like ours, as JSON lines (connecting here stops Celery's setup)."""
    from worker import logs

    settings = get_settings()
    logs.configure(level=settings.log_level)


def _consume_deferred(instance: Any = None, **_: Any) -> None:
    """Every worker also consumes the deferred queue, whatever its -Q says.

    Deferred jobs wait on their own queue (LLM_DEFERRED_QUEUE) so their ETA holds
    never sit in front of fresh work; run `-Q llm.deferred` workers to give them
    their own processes.
    """
    queue = get_settings().deferred_queue
    if instance is not None and queue not in instance.app.amqp.queues.consume_from:
        instance.app.amqp.queues.select_add(queue)


def _check_settings(**_: Any) -> None:
    """Fail at start-up, not mid-request, when the configuration cannot work."""
    from worker import redis_checks
    from worker.tasks import pipeline

    try:
        get_settings().check_worker_ready()
        redis_checks.prepare_worker(get_settings())
        pipeline().warm()
        from worker import telemetry

        telemetry.start_worker(get_settings())
    except Exception as exc:
        from worker.secrets import scrub

        print(f"llmq worker cannot start: {scrub(str(exc))}", file=sys.stderr, flush=True)
        # Celery's signal dispatch logs and swallows exceptions; SystemExit gets through.
        raise SystemExit(78) from None


def _connect_signals() -> None:
    signals.before_task_publish.connect(_stamp, weak=False)
    signals.setup_logging.connect(_json_logging, weak=False)
    signals.worker_init.connect(_check_settings, weak=False)
    signals.celeryd_after_setup.connect(_consume_deferred, weak=False)
