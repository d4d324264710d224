"""Privacy is the worker's: whatever sent a job, its text never reaches logs, events or Flower."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakes import FakeProvider
from tests.harness import ROOT, Flower, Isolated, wait_for
from worker.privacy import PrivacyFilter, args_repr, result_repr

# A web app's producer: its own Celery app, llm.* sent by name, Celery's default routing.
PLAIN_PRODUCER = """
import hashlib, json, sys
from celery import Celery

url, user, marker, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
app = Celery("webapp", broker=url, backend=url)
sent = [
    app.send_task(
        "llm.complete",
        kwargs={
            "messages": [{"role": "user", "content": f"{marker} question {i}?"}],
            "user_id": user,
            "max_tokens": 50,
        },
    )
    for i in range(jobs)
]
paragraphs = [f"Paragraph {i} about {marker}: " + "otters float. " * 30 for i in range(6)]
document = app.send_task(
    "llm.batch.summarize",
    kwargs={
        "document_id": "plain-doc",
        "text": "\\n\\n".join(paragraphs),
        "words": 20,
        "user_id": user,
        "request_id": "plain-" + hashlib.sha256(marker.encode()).hexdigest()[:12],
        "chunk_tokens": 200,
    },
)
results = [job.get(timeout=60) for job in sent]
summary = document.get(timeout=60)
ids = [job.id for job in sent] + [document.id]
while "continue" in summary:
    ids.append(summary["continue"])
    summary = app.AsyncResult(summary["continue"]).get(timeout=60)
assert not [m for m in sys.modules if m == "worker" or m.startswith(("worker.", "producer"))]
print(json.dumps({"ids": ids, "results": results, "summary": summary}))
"""


def plain_producer(url: str, user_id: str, marker: str, jobs: int) -> dict[str, Any]:
    """Run the web app's producer in its own interpreter; return what it got back."""
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_PRODUCER, url, user_id, marker, str(jobs)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd="/",  # nothing of llmq's on its path
    )
    assert done.returncode == 0, done.stderr
    output: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return output


class EventLog:
    """Every task event on the broker, as Flower would receive them."""

    def __init__(self, app: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._app = app
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        with self._app.connection_for_read() as connection:
            receiver = self._app.events.Receiver(
                connection, handlers={"*": self.events.append}, node_id=uuid.uuid4().hex
            )
            self._ready.set()
            while not self._stop.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)
                except (TimeoutError, OSError):
                    continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def flower_for(run_dir: Path) -> Iterator[Any]:
    started: list[Flower] = []

    def start(isolated: Isolated) -> Flower:
        server = Flower({**isolated.env, "FLOWER_UNAUTHENTICATED_API": "true"}, run_dir)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_plain_celery_producer_leaks_nothing(
    isolated: Isolated, start_worker: Any, flower_for: Any, fake: FakeProvider, user_id: str
) -> None:
    marker = f"MARKER{uuid.uuid4().hex[:10]}"
    # Started as `celery -A worker worker`: no -Q, so Celery's default queue is served too.
    worker = start_worker(queues=None, isolated=isolated)
    flower = flower_for(isolated)
    events = EventLog(isolated.app)
    try:
        # Flower subscribes to events as it starts: wait until it sees a job at all.
        def warmed_up() -> bool:
            warm = plain_producer(isolated.url, user_id, f"warm{uuid.uuid4().hex[:6]}", 1)
            return warm["ids"][0] in flower.tasks()

        wait_for(warmed_up, timeout=60, what="flower to receive events", interval=0.5)
        got = plain_producer(isolated.url, user_id, marker, 20)
        wait_for(
            lambda: all(
                flower.tasks().get(i, {}).get("state") == "SUCCESS" for i in got["ids"][20:]
            ),
            timeout=30,
            what="flower to see the batch tasks",
        )
    finally:
        events.stop()

    # Every job ran from Celery's default queue and was answered.
    assert [r["text"] for r in got["results"]] == [fake.text] * 20
    assert got["summary"]["summary"] == fake.text and got["summary"]["chunks"] > 1
    seen = {record["task_id"] for record in worker.records("llm_job")}
    assert set(got["ids"][:20]) <= seen

    secrets_of_the_job = (marker, fake.text)
    log = worker.output()
    for text in secrets_of_the_job:
        assert text not in log
    # Flower: its task list, each task's API entry and page, and the result API.
    api = json.dumps(flower.tasks())
    assert all(i in api for i in got["ids"][:20])
    names = {task["name"] for task in flower.tasks().values()}
    assert {"llm.complete", "llm.batch.summarize", "llm.batch.part", "llm.batch.reduce"} <= names
    for task_id in got["ids"]:
        page = requests.get(f"{flower.url}/task/{task_id}", timeout=5).text
        info = requests.get(f"{flower.url}/api/task/info/{task_id}", timeout=5).text
        result = requests.get(f"{flower.url}/api/task/result/{task_id}", timeout=5).text
        for text in secrets_of_the_job:
            assert text not in page and text not in info and text not in result
        assert "llm." in page
    for text in secrets_of_the_job:
        assert text not in api
    # The events themselves, as any monitor receives them.
    assert {e["type"] for e in events.events} >= {"task-received", "task-succeeded"}
    for text in secrets_of_the_job:
        assert text not in json.dumps(events.events, default=str)


def test_logged_prompts_appear_in_job_records_only(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    marker = f"MARKER{uuid.uuid4().hex[:10]}"
    worker = start_worker(queues=None, isolated=isolated, LLM_LOG_PROMPTS="true")
    plain_producer(isolated.url, user_id, marker, 3)
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    with_marker = [r for r in lines if marker in json.dumps(r)]
    with_text = [r for r in lines if fake.text in json.dumps(r)]
    assert with_marker and with_text
    assert {r.get("event") for r in with_marker + with_text} == {"llm_job"}


def test_delay_from_the_app_object(
    isolated: Isolated, start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    start_worker(queues=None, isolated=isolated)
    code = (
        "import json, sys; from worker import app; "
        "job = app.tasks['llm.complete'].delay("
        "messages=[{'role': 'user', 'content': 'Hello?'}], user_id=sys.argv[1]); "
        "print(json.dumps(job.get(timeout=60)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, user_id],
        env=isolated.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == fake.text


def test_imports_configure_nothing() -> None:
    code = (
        "import sys, celery._state as state, worker.errors, worker.models; "
        "assert not list(state._apps), 'a Celery app was created'; "
        "assert 'worker.tasks' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": "not-a-url://", "LLMQ_ENV_FILE": "/dev/null"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --- the pieces --------------------------------------------------------------------


def test_reprs_show_ids_and_counts_never_text() -> None:
    messages = [{"role": "user", "content": "SECRET-PROMPT"}]
    args, kwargs = args_repr(
        "llm.complete", (), {"messages": messages, "user_id": "u1", "max_tokens": 5, "x": "y"}
    )
    assert args == "()" and "SECRET" not in kwargs
    assert "user_id='u1'" in kwargs and "messages=<1 messages>" in kwargs and "x=<str>" in kwargs
    args, kwargs = args_repr(
        "llm.batch.reduce", ([{"summary": "SECRET-SUMMARY"}],), {"state": {"document_id": "d"}}
    )
    assert "SECRET" not in args + kwargs and "<1 part results>" in args
    assert "document_id='d'" in kwargs
    # Celery truncates long reprs; the numbers before the text survive, the text never.
    truncated = "{'request_id': 'r', 'provider': 'openai', 'cost_usd': 0.25, 'text': 'SECRET TE..."
    shown = result_repr(truncated)
    assert "SECRET" not in shown
    assert "provider='openai'" in shown and "cost_usd=0.25" in shown
    assert "SECRET" not in result_repr({"summary": "SECRET", "calls": 3})


def test_filter_hides_celery_records_of_llm_tasks() -> None:
    context = {
        "id": "t1",
        "name": "llm.complete",
        "return_value": "{'provider': 'openai', 'text': 'SECRET-ANSWER'}",
        "runtime": 0.1,
        "args": "()",
        "kwargs": "{'messages': [{'content': 'SECRET-PROMPT'}]}",  # a sender's own repr
    }
    record = logging.LogRecord(
        "celery.app.trace",
        logging.INFO,
        __file__,
        1,
        "Task %(name)s: %(return_value)s %(kwargs)s",
        context,
        None,
    )
    record.data = context
    assert PrivacyFilter().filter(record)
    assert "SECRET" not in record.getMessage() and "SECRET" not in json.dumps(record.data)
    unregistered = logging.LogRecord(
        "celery.worker.consumer.consumer",
        logging.ERROR,
        __file__,
        1,
        "Received unregistered task of type %s.\nbody: %s\nheaders: %s",
        ("llm.x", "SECRET", "S"),
        None,
    )
    PrivacyFilter().filter(unregistered)
    assert "SECRET" not in unregistered.getMessage() and "llm.x" in unregistered.getMessage()
