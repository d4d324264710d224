"""JSON log records: one llm_job per job, one llm_call per attempt, nothing private."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from producer import submit
from tests.fakes import FakeProvider, Fault
from tests.harness import TEST_KEYS
from worker.errors import AllProvidersFailedError, InvalidJobError
from worker.models import Message, prompt_hash

SECRET_PROMPT = "Confidential prompt PANGOLIN-93 about the merger."
FIELDS = {
    "timestamp",
    "request_id",
    "task_id",
    "user_id",
    "provider",
    "model",
    "attempt",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
    "queue_wait_ms",
    "finish_reason",
    "cached",
    "error",
    "prompt_hash",
}


def records(output: str) -> list[dict[str, Any]]:
    """Every JSON line of a worker's output (the banner before it is plain text)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return [json.loads(line) for line in lines[start:] if line.strip()]


def by_event(output: str, event: str) -> list[dict[str, Any]]:
    return [r for r in records(output) if r.get("event") == event]


def test_one_job_record_and_one_call_record_per_attempt(
    start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    worker = start_worker(queues="logs-a", concurrency=2)
    messages = [{"role": "user", "content": SECRET_PROMPT}]
    ok = submit(messages, user_id, queue="logs-a").get(timeout=30)
    fake.script("openai", Fault(status=400))
    fell_back = submit(messages, user_id, queue="logs-a").get(timeout=30)
    fake.script("openai", Fault(status=400))
    fake.script("anthropic", Fault(status=400))
    failed = submit(messages, user_id, queue="logs-a")
    with pytest.raises(AllProvidersFailedError):
        failed.get(timeout=30)
    invalid = submit([{"role": "user", "content": 7}], user_id, queue="logs-a")  # type: ignore[dict-item]
    with pytest.raises(InvalidJobError):
        invalid.get(timeout=30)

    output = worker.output()
    jobs, calls = by_event(output, "llm_job"), by_event(output, "llm_call")
    assert [j["request_id"] for j in jobs[:2]] == [ok["request_id"], fell_back["request_id"]]
    assert [j["task_id"] for j in jobs[2:]] == [failed.id, invalid.id]
    per_request = [sum(c["request_id"] == j["request_id"] for c in calls) for j in jobs]
    assert per_request == [ok["attempts"], fell_back["attempts"], 2, 0]
    assert fell_back["attempts"] == 2 and fell_back["provider"] == "anthropic"
    for record in jobs[:3] + calls:
        assert set(record) >= FIELDS, FIELDS - set(record)
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.utcoffset() == UTC.utcoffset(None)
        assert record["prompt_hash"] == prompt_hash([Message(**m) for m in messages])
    assert jobs[0]["cost_usd"] == ok["cost_usd"] and jobs[0]["error"] is None
    assert "fake 400" in jobs[2]["error"] and jobs[2]["level"] == "WARNING"
    assert [c["attempt"] for c in calls if c["request_id"] == fell_back["request_id"]] == [1, 2]
    assert "PANGOLIN" not in output and fake.text not in output


def test_prompt_hash_is_stable_across_worker_processes(
    start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    first = start_worker(queues="logs-b", concurrency=1)
    second = start_worker(queues="logs-c", concurrency=1)
    messages = [
        {"role": "system", "content": "Système: réponds brièvement."},
        {"role": "user", "content": SECRET_PROMPT},
    ]
    submit(messages, user_id, queue="logs-b").get(timeout=30)
    submit(messages, user_id, queue="logs-c").get(timeout=30)
    hashes = {by_event(w.output(), "llm_job")[0]["prompt_hash"] for w in (first, second)}
    assert hashes == {prompt_hash([Message(**m) for m in messages])}


def test_truncation_alert(start_worker: Any, fake: FakeProvider, user_id: str) -> None:
    worker = start_worker(queues="logs-d", concurrency=1)
    fake.script("openai", Fault(finish_reason="length"))
    job = submit([{"role": "user", "content": SECRET_PROMPT}], user_id, queue="logs-d")
    # Whether a truncated answer fails or returns is the job's policy; the alert is not.
    with contextlib.suppress(Exception):
        job.get(timeout=30)
    record = by_event(worker.output(), "llm_job")[0]
    assert record["alert"] == "TRUNCATED_RESPONSE"


def test_prompts_logged_only_when_enabled(
    start_worker: Any, fake: FakeProvider, user_id: str
) -> None:
    worker = start_worker(queues="logs-e", concurrency=1, LLM_LOG_PROMPTS="true")
    submit([{"role": "user", "content": SECRET_PROMPT}], user_id, queue="logs-e").get(timeout=30)
    record = by_event(worker.output(), "llm_job")[0]
    assert record["prompt"] == [{"role": "user", "content": SECRET_PROMPT}]
    assert record["response"] == fake.text


def test_no_key_and_no_prompt_in_any_log_so_far(run_dir: Path) -> None:
    logs = sorted(run_dir.glob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        for key in TEST_KEYS:
            assert key not in text, f"{key} leaked into {path.name}"
        # Prompts other tests sent to workers that do not log prompts.
        assert "ZEPHYR-QUILL" not in text and "QUOKKA-51" not in text
