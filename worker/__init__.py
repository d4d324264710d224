"""llmq's worker: the Celery app (`celery -A worker worker`) and the completion pipeline."""

from worker.app import app

__all__ = ["app"]
