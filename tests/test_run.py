"""`./run demo` as a newcomer runs it: it finishes, and stops everything it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import corpus
from worker import tokens
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC_TOKENS = 1500


def demo_env(tmp: Path) -> dict[str, str]:
    """A newcomer's environment: no Redis, no provider, no key; temp files under `tmp`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "REDIS_", "CELERY_"))
    }
    tmp.mkdir(parents=True, exist_ok=True)
    return {**env, "TMPDIR": str(tmp)}


def generated_documents(directory: Path, count: int) -> Path:
    """`count` distinct documents of about DOC_TOKENS tokens each, cut from the corpus."""
    directory.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for d in corpus.documents() for p in d.text.split("\n\n") if p.strip()]
    made, current, at = 0, [], 0
    while made < count:
        current.append(paragraphs[at % len(paragraphs)])
        at += 1
        if tokens.count_text("\n\n".join(current)) >= DOC_TOKENS:
            text = f"Document {made}.\n\n" + "\n\n".join(current)
            (directory / f"doc-{made:03d}.txt").write_text(text, encoding="utf-8")
            made, current = made + 1, []
    return directory


def started_by(run: subprocess.Popen[str], *marks: str) -> list[str]:
    """Live processes of the run's session, or whose command line carries one of `marks`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == run.pid:
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session.
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if state == "Z":
            continue
        if int(session) == run.pid or any(mark in cmdline for mark in marks):
            found.append(f"{entry.name}: {cmdline}")
    return found


def marks_of(run: subprocess.Popen[str], output: str) -> list[str]:
    """What identifies the demo's redis-server and worker (they run in their own sessions)."""
    marks = [f"demo-{run.pid}@localhost"]
    port = re.search(r"private redis-server on port (\d+)", output)
    if port:
        marks.append(f"redis-server 127.0.0.1:{port.group(1)}")
    return marks


def start_demo(*args: str, tmp: Path) -> subprocess.Popen[str]:
    """`./run demo ARGS` in its own session, as a newcomer's terminal would run it."""
    return subprocess.Popen(
        ["./run", "demo", *args],
        cwd=ROOT,
        env=demo_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def demo_tmp(tmp_path: Path) -> Path:
    """The TMPDIR the demo makes its temp directory in."""
    return tmp_path / "tmp"


def test_demo_exits_and_leaves_nothing_behind(demo_tmp: Path) -> None:
    run = start_demo(tmp=demo_tmp)
    try:
        output, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output
    assert "llmq summarize report" in output and "provider=extractive" in output
    assert len(re.findall(r"^samples/", output, re.M)) == len(list((ROOT / "samples").iterdir()))
    assert started_by(run, *marks_of(run, output)) == []
    assert list(demo_tmp.iterdir()) == []  # its temp directory is gone


def test_ctrl_c_after_the_first_summary_stops_everything(tmp_path: Path, demo_tmp: Path) -> None:
    documents = generated_documents(tmp_path / "docs", 120)
    run = start_demo(str(documents), tmp=demo_tmp)
    lines: list[str] = []
    try:
        assert run.stdout is not None
        for line in run.stdout:
            lines.append(line)
            if "provider=extractive" in line:
                break
        # What a terminal does on Ctrl-C: SIGINT to the foreground process group.
        os.killpg(run.pid, signal.SIGINT)
        rest, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert run.returncode == 130, output
    assert "stopping: finishing the documents in flight" in output
    assert started_by(run, *marks_of(run, output)) == []
    assert list(demo_tmp.iterdir()) == []


def test_demo_summarizes_hundreds_of_documents_without_waiting_on_a_limit(
    tmp_path: Path, demo_tmp: Path
) -> None:
    count = 300
    documents = generated_documents(tmp_path / "docs", count)
    total = sum(tokens.count_text(p.read_text()) for p in documents.iterdir())
    # Over the per-user hourly default: a $0 local provider must not be throttled by it.
    assert total > 4 * Settings().user_tokens_per_hour
    out = tmp_path / "summaries.jsonl"
    run = start_demo(str(documents), "--out", str(out), tmp=demo_tmp)
    started = time.monotonic()
    try:
        output, _ = run.communicate(timeout=420)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == count and all(r["error"] is None for r in records)
    assert {r["provider"] for r in records} == {"extractive"}
    assert re.search(r"rate-limit deferrals\s*│\s*0\s", output), output[-2000:]
    assert "waiting:" not in output
    assert started_by(run, *marks_of(run, output)) == []
    print(f"{count} documents, {total} tokens in {time.monotonic() - started:.1f}s")
