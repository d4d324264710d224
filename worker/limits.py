"""Global rate limits in Redis (per user, per provider), atomic across all workers.

Not yet enforced: the Redis check-and-reserve lands with the rate-limit issue.
Celery's per-worker `rate_limit` is already set on the task from
LLM_TASK_RATE_LIMIT (see worker/tasks.py).
"""
