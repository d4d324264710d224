"""Tool arguments, tool results and image bytes are prompt content: never in logs or Flower."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakes import FakeProvider
from tests.harness import Flower, Isolated, wait_for
from tests.test_content import png
from tests.test_privacy import EventLog
from worker.privacy import result_repr

# A web app's producer that never imports llmq: a tools job with an image, then the
# tool loop's second step with the call's arguments and the tool's result.
PLAIN_PRODUCER = """
import json, sys
from celery import Celery

url, user, marker, image = sys.argv[1:5]
app = Celery("webapp", broker=url, backend=url)
tool = {"type": "function", "function": {
    "name": "lookup", "description": "Look it up.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
first = app.send_task("llm.complete", kwargs={
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}],
    "user_id": user, "tools": [tool], "tool_choice": "required", "max_tokens": 50})
answer = first.get(timeout=60)
call = answer["tool_calls"][0]
second = app.send_task("llm.complete", kwargs={
    "messages": [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call["id"], "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps(call["arguments"])}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "RESULT-" + marker}],
    "user_id": user, "tools": [tool], "max_tokens": 50})
final = second.get(timeout=60)
assert not [m for m in sys.modules if m == "worker" or m.startswith(("worker.", "producer"))]
print(json.dumps({"ids": [first.id, second.id], "answer": answer, "final": final}))
"""


@pytest.fixture
def flower(isolated: Isolated, run_dir: Path) -> Iterator[Flower]:
    server = Flower({**isolated.env, "FLOWER_UNAUTHENTICATED_API": "true"}, run_dir)
    yield server
    server.stop()


def test_tool_and_image_jobs_leak_nothing(
    isolated: Isolated, start_worker: Any, flower: Flower, fake: FakeProvider, user_id: str
) -> None:
    marker = f"MARKER{uuid.uuid4().hex[:10]}"
    image = base64.b64encode(png(64, 64, pad=64) + marker.encode() * 20).decode()
    worker = start_worker(queues=None, isolated=isolated)
    events = EventLog(isolated.app)

    def warmed_up() -> bool:
        # Flower subscribes to events as it starts: wait until it sees a job at all.
        warm = isolated.app.send_task(
            "llm.complete",
            kwargs={"messages": [{"role": "user", "content": "warm"}], "user_id": user_id},
        )
        warm.get(timeout=30)
        return wait_for(lambda: warm.id in flower.tasks(), timeout=2, what="warm job") or False

    try:
        wait_for(lambda: _try(warmed_up), timeout=60, what="flower to receive events", interval=0.5)
        fake.tool_calls = [{"name": "lookup", "arguments": {"q": f"ARG-{marker}"}}]
        done = subprocess.run(
            [sys.executable, "-c", PLAIN_PRODUCER, isolated.url, user_id, marker, image],
            capture_output=True,
            text=True,
            timeout=240,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout.strip().splitlines()[-1])
        wait_for(
            lambda: all(flower.tasks().get(i, {}).get("state") == "SUCCESS" for i in got["ids"]),
            timeout=30,
            what="flower to see both jobs succeed",
        )
    finally:
        events.stop()
    # The jobs did what they were sent for: the call came back, the result went out.
    assert got["answer"]["tool_calls"][0]["arguments"] == {"q": f"ARG-{marker}"}
    assert fake.seen[-2].body["messages"][0]["content"][1]["image_url"]["url"].endswith(image)
    assert fake.seen[-1].body["messages"][2]["content"] == f"RESULT-{marker}"

    # Not the marker (tool arguments, tool result, bytes in the image) nor the image's base64.
    private = (marker, image[:40], image[200:260])
    log = worker.output()
    assert [r for r in worker.records("llm_job") if r.get("user_id") == user_id]
    for text in private:
        assert text not in log
    api = json.dumps(flower.tasks())
    assert all(i in api for i in got["ids"])
    for task_id in got["ids"]:
        page = requests.get(f"{flower.url}/task/{task_id}", timeout=5).text
        info = requests.get(f"{flower.url}/api/task/info/{task_id}", timeout=5).text
        result = requests.get(f"{flower.url}/api/task/result/{task_id}", timeout=5).text
        for text in private:
            assert text not in page and text not in info and text not in result and text not in api
    assert {e["type"] for e in events.events} >= {"task-received", "task-succeeded"}
    for text in private:
        assert text not in json.dumps(events.events, default=str)


def _try(check: Any) -> bool:
    try:
        return bool(check())
    except TimeoutError:
        return False


def test_result_repr_reads_the_results_own_fields_never_a_tool_calls() -> None:
    result = {
        "request_id": "r1",
        "provider": "openai",
        "cost_usd": 0.25,
        "tool_calls": [
            {"id": "c", "name": "f", "arguments": {"provider": "SECRET-1", "model": "SECRET-2"}}
        ],
        "parsed": {"cached": "SECRET-3"},
        "text": "it's {'provider': 'SECRET-4', 'x': 1}",
    }
    for shown in (result_repr(repr(result)), result_repr(repr(result)[:150] + "...")):
        assert "SECRET" not in shown
        assert "request_id='r1'" in shown and "provider='openai'" in shown
        assert "cost_usd=0.25" in shown
