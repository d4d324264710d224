"""A fake LLM provider on 127.0.0.1 speaking OpenAI Chat Completions and Anthropic Messages.

Built on pytest-httpserver (werkzeug). It counts requests per API, returns known
usage (reasoning tokens and cache writes too), and plays scripted faults: status codes
with headers, delays, truncation, malformed JSON, a given answer text, a refusal. An
Anthropic request that forces a tool gets the answer as that tool's input.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

TEXT = "This is the fake provider's answer."


@dataclass
class Fault:
    """What the fake does instead of answering normally, for one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # the response body, for an error status or a 200
    delay: float = 0.0
    finish_reason: str | None = None
    malformed: bool = False
    text: str | None = None  # this answer's text instead of the fake's `text`
    refusal: str | None = None  # decline to answer, with these words
    # Call these functions instead of answering: [{"name": ..., "arguments": {...}}].
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Seen:
    """One request the fake received."""

    api: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float


def serve(handler: Callable[[Request], Response]) -> HTTPServer:
    """A threaded HTTP server on 127.0.0.1 that sends every request to `handler`."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.expect_request(re.compile(".*")).respond_with_handler(handler)
    server.start()
    assert server.server is not None
    # Write headers and body without Nagle's 40 ms stall (accepted sockets inherit it).
    server.server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server


class FakeProvider:
    """The fake server and its knobs; `reset()` between tests."""

    def __init__(self) -> None:
        self.server = serve(self._handle)
        self._lock = threading.Lock()
        self.reset()

    @property
    def url(self) -> str:
        """Base URL of the server, without a trailing slash."""
        return f"http://127.0.0.1:{self.server.port}"

    def reset(self) -> None:
        """Forget requests and faults; answer normally."""
        with self._lock:
            self.counts: Counter[str] = Counter()
            self.seen: list[Seen] = []
            self.faults: dict[str, deque[Fault]] = {}
            self.always: dict[str, Fault] = {}
            self.text = TEXT
            self.tool_calls: list[dict[str, Any]] | None = None
            self.usage = {
                "input_tokens": 11,
                "output_tokens": 7,
                "cached_input_tokens": 0,
                "cache_write_input_tokens": 0,
                "reasoning_tokens": 0,
            }

    def script(self, api: str, *faults: Fault) -> None:
        """Play `faults` on the next requests to `api` (openai, anthropic, gemini)."""
        with self._lock:
            self.faults.setdefault(api, deque()).extend(faults)

    def set_always(self, api: str, fault: Fault | None) -> None:
        """Play `fault` on every request to `api` until cleared with None."""
        with self._lock:
            if fault is None:
                self.always.pop(api, None)
            else:
                self.always[api] = fault

    def requests(self, api: str | None = None) -> int:
        """How many requests arrived (for one API, or all)."""
        with self._lock:
            return sum(self.counts.values()) if api is None else self.counts[api]

    def stop(self) -> None:
        """Shut the server down."""
        self.server.clear()
        self.server.stop()

    def _handle(self, request: Request) -> Response:
        api = _api(request.path)
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            body = {}
        with self._lock:
            self.counts[api] += 1
            self.seen.append(
                Seen(
                    api,
                    request.path,
                    body,
                    {k.lower(): v for k, v in request.headers.items()},
                    time.monotonic(),
                )
            )
            queue = self.faults.get(api)
            fault = queue.popleft() if queue else self.always.get(api, Fault())
            text, usage, calls = self.text, dict(self.usage), self.tool_calls
        text = fault.text if fault.text is not None else text
        calls = fault.tool_calls if fault.tool_calls is not None else calls
        if fault.delay:
            time.sleep(fault.delay)
        if fault.malformed:
            return Response('{"id": "x", "choices": [', 200, content_type="application/json")
        if fault.status != 200:
            payload = fault.body or json.dumps(
                {"error": {"type": "fake_error", "message": f"fake {fault.status}"}}
            )
            return Response(
                payload, fault.status, headers=fault.headers, content_type="application/json"
            )
        if fault.body is not None:
            # A 200 whose body is JSON, but not a usable completion.
            return Response(fault.body, 200, headers=fault.headers, content_type="application/json")
        answer = _anthropic if api == "anthropic" else _openai
        reply = answer(body, text, usage, fault.finish_reason, fault.refusal)
        if calls:
            reply = _with_calls(api, reply, calls)
        return Response(
            json.dumps(reply),
            200,
            headers=fault.headers,
            content_type="application/json",
        )


def _api(path: str) -> str:
    if path.startswith("/gemini"):
        return "gemini"
    if path.endswith("/messages"):
        return "anthropic"
    return "openai"


def _openai(
    body: dict[str, Any],
    text: str,
    usage: dict[str, int],
    finish: str | None,
    refusal: str | None = None,
) -> Any:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "unknown"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None if refusal else text,
                    "refusal": refusal,
                },
                "finish_reason": finish or "stop",
            }
        ],
        "usage": {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["input_tokens"] + usage["output_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_input_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0)},
        },
    }


def _anthropic(
    body: dict[str, Any],
    text: str,
    usage: dict[str, int],
    finish: str | None,
    refusal: str | None = None,
) -> Any:
    stop = {"length": "max_tokens", None: "end_turn"}.get(finish, finish)
    content: list[dict[str, Any]] = [{"type": "text", "text": refusal or text}]
    forced = body.get("tool_choice") or {}
    if forced.get("type") == "tool" and not refusal:
        # A forced tool call: the answer, parsed, is the tool's input (an object).
        try:
            value = json.loads(text)
        except ValueError:
            value = {"text": text}
        content = [{"type": "tool_use", "id": "toolu_fake", "name": forced["name"], "input": value}]
        stop = "tool_use" if finish is None else stop
    if refusal:
        stop = "refusal"
    cached, written = usage["cached_input_tokens"], usage.get("cache_write_input_tokens", 0)
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "unknown"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage["input_tokens"] - cached - written,
            "output_tokens": usage["output_tokens"],
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": written,
        },
    }


def _with_calls(api: str, reply: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """`reply` turned into a tool-only answer calling `calls`, in the API's own shape."""
    if api == "anthropic":
        reply["content"] = [
            {"type": "tool_use", "id": f"toolu_{i}", "name": c["name"], "input": c["arguments"]}
            for i, c in enumerate(calls)
        ]
        reply["stop_reason"] = "tool_use"
        return reply
    choice = reply["choices"][0]
    choice["message"]["content"] = None
    choice["message"]["tool_calls"] = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
        }
        for i, c in enumerate(calls)
    ]
    choice["finish_reason"] = "tool_calls"
    return reply
