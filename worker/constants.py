"""Names shared by producers and workers: queues, task names and message headers."""

from __future__ import annotations

# Interactive jobs, batch summarization, and Celery's own default queue (a producer that
# brings its own Celery app and sends `llm.complete` by name lands there unless it routes).
QUEUE = "llm"
BATCH_QUEUE = "batch"
CELERY_DEFAULT_QUEUE = "celery"

COMPLETE_TASK = "llm.complete"
TASK_PREFIX = "llm."

# Set on every message llmq's own producers publish: when it was sent (queue wait).
SENT_AT_HEADER = "llmq_sent_at"
# Redis time (seconds) of a deferred job's first deferral, carried across re-schedules.
DEFERRED_SINCE_HEADER = "llmq_deferred_since"
