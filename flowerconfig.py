"""Flower's configuration for llmq: `celery -A worker flower` reads it from this directory.

Elsewhere, point Flower at it: `celery -A worker flower --conf=/path/to/flowerconfig.py`.
Basic auth and the address come from the environment (FLOWER_BASIC_AUTH, FLOWER_ADDRESS).
"""

from worker.flower import RUNTIME_BUCKETS, install

install()

# Histogram buckets of flower_task_runtime_seconds, to minutes (Flower's stop at 10 s).
task_runtime_metric_buckets = RUNTIME_BUCKETS
