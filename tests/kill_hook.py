"""Test-only worker plugin (`celery worker --include tests.kill_hook`).

SIGKILLs the worker once a job has run, before Celery acknowledges its message: the
moment a crash costs the most, since the provider has answered and been paid.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import signals


@signals.task_postrun.connect
def _kill_before_ack(**_: Any) -> None:
    # task_postrun fires inside the task's trace; a late ack happens only after it returns.
    if os.environ.get("LLMQ_TEST_KILL_AFTER_RUN") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
