"""Every kind of job, sent by real workers through both SDKs, is valid by the official specs.

The official OpenAI and Anthropic API specs (tests/specs, see NOTICE) are served by
Stoplight Prism, which answers spec-shaped responses and rejects (422, with the reasons
in its log) any request that violates its spec. `./run test` installs Prism 5.14.2 into
a cache directory (LLMQ_PRISM names its binary); without it this module is skipped,
except under CI, where a missing Prism fails it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from producer import submit
from tests.conftest import StartWorker
from tests.harness import free_port, wait_for
from tests.specs.prepare import prepare
from tests.test_content import png
from worker.errors import SchemaValidationError, ToolCallValidationError

SPECS = Path(__file__).parent / "specs"
PRISM_VERSION = "5.14.2"
DEFAULT_PRISM = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "llmq"
    / f"prism-{PRISM_VERSION}"
    / "node_modules"
    / ".bin"
    / "prism"
)
QUEUE = "spec-conformance"
REJECTED = "Request did not pass the validation rules"
PASSED = "The request passed the validation rules"


@dataclass
class Mock:
    """One Prism mock server and its log."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


def prism_binary() -> Path:
    """Prism's binary, or skip (fail under CI) when `./run test` has not installed it."""
    binary = Path(os.environ.get("LLMQ_PRISM", DEFAULT_PRISM))
    if not binary.exists():
        message = f"Prism {PRISM_VERSION} is not installed at {binary}; `./run test` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def prepared(name: str, flavour: str) -> Path:
    """The spec prepared for Prism, cached by the digest of the spec and of prepare.py."""
    source = SPECS / name
    digest = hashlib.sha256(source.read_bytes() + (SPECS / "prepare.py").read_bytes()).hexdigest()[
        :16
    ]
    target = Path(tempfile.gettempdir()) / "llmq-specs" / f"{flavour}-{digest}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
        prepare(source, partial, flavour=flavour)
        partial.replace(target)
    return target


@pytest.fixture(scope="module")
def mocks(run_dir: Path) -> Iterator[dict[str, Mock]]:
    """Prism serving the OpenAI spec and the Anthropic spec, each on a free port."""
    binary = prism_binary()
    started: dict[str, Mock] = {}
    try:
        for flavour, name in (("openai", "openai.yaml"), ("anthropic", "anthropic.json")):
            port = free_port()
            log = run_dir / f"prism-{flavour}-{port}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [
                        str(binary),
                        "mock",
                        str(prepared(name, flavour)),
                        "-p",
                        str(port),
                        "-h",
                        "127.0.0.1",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started[flavour] = Mock(url=f"http://127.0.0.1:{port}", log=log, process=process)
        for flavour, mock in started.items():

            def listening(mock: Mock = mock, flavour: str = flavour) -> bool:
                if mock.process.poll() is not None:
                    raise RuntimeError(f"prism ({flavour}) exited:\n{mock.text()[-2000:]}")
                return "Prism is listening" in mock.text()

            # 11-13 s for the OpenAI spec on an idle 2-core machine; far more under load.
            wait_for(listening, timeout=300, what=f"prism serving the {flavour} spec", interval=0.2)
        yield started
    finally:
        for mock in started.values():
            mock.process.terminate()
            mock.process.wait(timeout=10)


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
}
ASK = [{"role": "user", "content": "What is the largest city in Japan? Answer in JSON."}]
MULTI_TURN = [
    {"role": "user", "content": "What is a CRDT?"},
    {"role": "assistant", "content": "A conflict-free replicated data type."},
    {"role": "user", "content": "Name one."},
]
SYSTEM = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Why is the sky blue?"},
]
TAGS = {"metadata": {"feature": "spec-test", "tenant": "t1"}, "user": "end-user-42"}

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS = {"tools": [WEATHER]}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TOOL_LOOP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
# A 2 x 2 PNG, and the first bytes of a PDF (the specs check shapes, not files).
PNG = base64.b64encode(png(2, 2)).decode()
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwvVHlwZS9DYXRhbG9nPj4KZW5kb2JqCg=="


def look(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    """A user turn asking about `parts`."""
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
IMAGE_B64 = {
    "type": "image_url",
    "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
}
IMAGE_SOURCE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
}
DOCUMENTS = (
    {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
        "title": "Report",
    },
    {
        "type": "document",
        "source": {
            "type": "text",
            "media_type": "text/plain",
            "data": "Paris is the capital of France.",
        },
    },
)

JOBS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    # OpenAI, through the openai SDK.
    "openai plain": (ASK, {"model": "gpt-4o-mini"}),
    "openai multi-turn": (MULTI_TURN, {"model": "gpt-4o-mini"}),
    "openai system": (SYSTEM, {"model": "gpt-4o-mini"}),
    "openai json_schema": (ASK, {"model": "gpt-4o-mini", "response_format": JSON_SCHEMA}),
    "openai json_object": (
        [{"role": "user", "content": "Largest city in Japan?"}],
        {"model": "gpt-4o-mini", "response_format": {"type": "json_object"}},
    ),
    "openai stop/seed/top_p": (
        ASK,
        {
            "model": "gpt-4o-mini",
            "stop": ["\n\n", "END"],
            "seed": 7,
            "top_p": 0.9,
            "presence_penalty": 0.2,
            "frequency_penalty": 0.1,
            "temperature": 0.3,
        },
    ),
    "openai reasoning": (
        ASK,
        {"model": "gpt-5-mini", "reasoning_effort": "low", "max_tokens": 2000, "seed": 1},
    ),
    "openai reasoning json_schema": (
        ASK,
        {"model": "o4-mini", "reasoning_effort": "high", "response_format": JSON_SCHEMA},
    ),
    "openai metadata": (ASK, {"model": "gpt-4o-mini", **TAGS}),
    "openai tools": (
        ASK,
        {"model": "gpt-4o-mini", **TOOLS, "tool_choice": "auto", "parallel_tool_calls": False},
    ),
    "openai tool_choice": (ASK, {"model": "gpt-4o-mini", **TOOLS, "tool_choice": NAMED}),
    "openai tool_choice required": (
        ASK,
        {"model": "gpt-4o-mini", **TOOLS, "tool_choice": "required"},
    ),
    "openai tool results": (TOOL_LOOP, {"model": "gpt-4o-mini", **TOOLS}),
    "openai image url": (look(IMAGE_URL), {"model": "gpt-4o-mini"}),
    "openai base64 image": (look(IMAGE_B64, IMAGE_SOURCE), {"model": "gpt-4o-mini"}),
    # Anthropic, through the anthropic SDK.
    "anthropic plain": (ASK, {"model": "claude-haiku-4-5"}),
    "anthropic multi-turn": (MULTI_TURN, {"model": "claude-haiku-4-5"}),
    "anthropic system": (SYSTEM, {"model": "claude-haiku-4-5"}),
    "anthropic json_schema (native)": (
        ASK,
        {"model": "claude-haiku-4-5", "response_format": JSON_SCHEMA},
    ),
    "anthropic json_schema (tool)": (
        ASK,
        {"model": "claude-3-5-haiku", "response_format": JSON_SCHEMA},
    ),
    "anthropic json_object": (
        ASK,
        {"model": "claude-haiku-4-5", "response_format": {"type": "json_object"}},
    ),
    "anthropic stop/top_p": (
        ASK,
        {"model": "claude-haiku-4-5", "stop": ["\n\nHuman:"], "top_p": 0.9},
    ),
    "anthropic thinking": (
        ASK,
        {"model": "claude-haiku-4-5", "thinking": {"budget_tokens": 1024}, "max_tokens": 500},
    ),
    "anthropic thinking json_schema": (
        ASK,
        {
            "model": "claude-sonnet-4-5",
            "thinking": {"budget_tokens": 2048},
            "response_format": JSON_SCHEMA,
        },
    ),
    "anthropic metadata": (ASK, {"model": "claude-haiku-4-5", **TAGS}),
    "anthropic tools": (
        ASK,
        {"model": "claude-haiku-4-5", **TOOLS, "tool_choice": "auto", "parallel_tool_calls": False},
    ),
    "anthropic tool_choice": (ASK, {"model": "claude-haiku-4-5", **TOOLS, "tool_choice": NAMED}),
    "anthropic tool_choice required": (
        ASK,
        {"model": "claude-haiku-4-5", **TOOLS, "tool_choice": "required"},
    ),
    "anthropic tool_choice none": (
        ASK,
        {"model": "claude-haiku-4-5", **TOOLS, "tool_choice": "none"},
    ),
    "anthropic tool results": (TOOL_LOOP, {"model": "claude-haiku-4-5", **TOOLS}),
    "anthropic image url": (look(IMAGE_URL), {"model": "claude-haiku-4-5"}),
    "anthropic base64 image": (look(IMAGE_B64, IMAGE_SOURCE), {"model": "claude-haiku-4-5"}),
    "anthropic documents": (look(*DOCUMENTS), {"model": "claude-haiku-4-5", "max_tokens": 100}),
}


def test_every_kind_of_job_passes_the_specs(
    mocks: dict[str, Mock], start_worker: StartWorker, user_id: str
) -> None:
    worker = start_worker(
        concurrency=4,
        queues=QUEUE,
        LLM_PROVIDER="openai",
        LLM_FALLBACKS="anthropic",
        # Prism's paths: OpenAI's have no /v1, Anthropic's do.
        OPENAI_BASE_URL=mocks["openai"].url,
        ANTHROPIC_BASE_URL=mocks["anthropic"].url,
        LLM_RETRY_ATTEMPTS="1",
        LLM_CACHE_ENABLED="false",
        LLM_TIMEOUT_SECONDS="15",
        # A PDF is priced at the whole context window left (worker/media.py).
        LLM_MAX_COST_PER_REQUEST="1",
        LLM_USER_TOKENS_PER_HOUR="10000000",
    )
    outcomes: dict[str, str] = {}
    for name, (messages, options) in JOBS.items():
        pending = submit(messages, user_id, queue=QUEUE, check_cache=False, **options)
        try:
            result = pending.get(timeout=60)
        except SchemaValidationError:
            # Prism answers the spec's example ("string", "Hi! My name is Claude."), which
            # no schema of ours accepts: the requests were valid all the same.
            outcomes[name] = "schema-invalid answer"
        except ToolCallValidationError:
            # The same for a tool call Prism makes up: its function is "string".
            outcomes[name] = "schema-invalid tool call"
        else:
            outcomes[name] = "refusal" if result["refusal"] else "answer"
            assert result["provider"] == name.split()[0], name
    assert set(outcomes) == set(JOBS)
    calls = Counter(r["provider"] for r in worker.records("llm_call"))
    for flavour, mock in mocks.items():
        # One request per job at least (a schema-invalid answer is re-asked once).
        assert calls[flavour] >= sum(1 for name in JOBS if name.startswith(flavour))
        # Prism's log is written behind its answers: wait for a verdict on every request.
        wait_for(
            lambda mock=mock, flavour=flavour: verdicts(mock.text()) >= calls[flavour],
            timeout=30,
            what=f"prism's verdicts on {calls[flavour]} {flavour} requests",
        )
        log = mock.text()
        # Prism also checks its own example answers against the spec (they fail: the
        # examples are incomplete); only what it says of our requests counts here.
        violations = [line for line in log.splitlines() if "Violation: request" in line]
        assert REJECTED not in log and violations == [], f"{flavour}:\n" + "\n".join(violations)
        assert log.count(PASSED) == calls[flavour]


def verdicts(log: str) -> int:
    """How many requests Prism has judged, either way."""
    return log.count(PASSED) + log.count(REJECTED)


def test_prism_rejects_what_the_specs_forbid(mocks: dict[str, Mock]) -> None:
    """The check is live: the prepared specs do reject bad requests (see prepare.py).

    Runs after the jobs' test, whose log must hold no rejection at all.
    """
    openai = requests.post(
        f"{mocks['openai'].url}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "bogus", "content": "x"}]},
        headers={"Authorization": "Bearer sk-test"},
        timeout=30,
    )
    assert openai.status_code == 422
    # Anthropic's spec forbids unknown fields: this is why llmq refuses `seed` there.
    anthropic = requests.post(
        f"{mocks['anthropic'].url}/v1/messages",
        json={
            "model": "claude-haiku-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}],
            "seed": 1,
        },
        headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert anthropic.status_code == 422
    for mock in mocks.values():
        wait_for(lambda mock=mock: REJECTED in mock.text(), timeout=30, what="the rejection")


def test_batch_api_requests_pass_the_specs(mocks: dict[str, Mock]) -> None:
    """Every Batch API request llmq sends (worker/batchapi/clients.py), through both SDKs.

    The clients are the workers' own, called here directly: Prism answers the specs'
    examples (a batch already "completed" whose result URL points at the real
    Anthropic API), which a whole run could not follow offline. The results downloads
    are therefore exercised against the stateful fake only (tests/test_batchapi.py).
    """
    from worker.batchapi.clients import AnthropicBatches, OpenAIBatches
    from worker.models import Message
    from worker.providers.base import ProviderRequest

    before = {flavour: len(mock.text()) for flavour, mock in mocks.items()}
    clients = {
        # Prism's paths: OpenAI's have no /v1, Anthropic's do.
        "openai": OpenAIBatches(api_key="sk-test", base_url=mocks["openai"].url, timeout=15),
        "anthropic": AnthropicBatches(
            api_key="sk-ant-test", base_url=mocks["anthropic"].url, timeout=15
        ),
    }
    sent: Counter[str] = Counter()
    for flavour, client in clients.items():
        model = "gpt-4o-mini" if flavour == "openai" else "claude-haiku-4-5"
        request = ProviderRequest(
            messages=[
                Message(role="system", content="Summarize the document in about 40 words."),
                Message(role="user", content="A document about CRDTs."),
            ],
            model=model,
            max_tokens=80,
            temperature=0.0,
            timeout=15,
        )
        body = client.body(request)
        batch_id = client.create(
            [("d000000-l0-p00001", body), ("d000001-l0-p00001", body)], local_id="run-r0-b0"
        )
        assert batch_id
        client.retrieve(batch_id)
        client.cancel(batch_id)
        client.recent()
        # OpenAI: upload, create; both: retrieve, cancel, list.
        sent[flavour] = 5 if flavour == "openai" else 4
    for flavour, mock in mocks.items():
        wait_for(
            lambda mock=mock, flavour=flavour: (
                verdicts(mock.text()[before[flavour] :]) >= sent[flavour]
            ),
            timeout=30,
            what=f"prism's verdicts on {sent[flavour]} {flavour} batch requests",
        )
        log = mock.text()[before[flavour] :]
        violations = [line for line in log.splitlines() if "Violation: request" in line]
        assert REJECTED not in log and violations == [], f"{flavour}:\n" + "\n".join(violations)
        assert log.count(PASSED) == sent[flavour]
