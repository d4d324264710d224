"""A stateful fake of OpenAI's Batch API and Anthropic's Message Batches on 127.0.0.1.

OpenAI: `POST /v1/files` (multipart, purpose=batch), `GET /v1/files/{id}/content`,
`POST /v1/batches`, `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`.
Anthropic: `POST /v1/messages/batches`, `GET /v1/messages/batches[/{id}]`,
`POST /v1/messages/batches/{id}/cancel`, `GET /v1/messages/batches/{id}/results`.

A batch moves one state per retrieve: OpenAI validating -> in_progress -> completed
(or the planned expired/failed), Anthropic in_progress -> ended. `hold` keeps every
batch in progress until released. Each planned `Outcome` applies to the next batch
created: some requests errored, the batch expired after some requests, or failed.
Every answer has known usage, so tests can price it exactly; creations are counted.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from werkzeug import Request, Response

from tests.fakes import serve

USAGE_IN = 11
# What a Message Batches request's params may hold (the Messages API's body).
MESSAGES_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "service_tier",
        "stream",
    }
)
USAGE_OUT = 7


@dataclass
class Outcome:
    """What happens to one created batch."""

    status: str = "completed"  # completed, expired, failed
    errors: int = 0  # this many requests (the first ones) end as errors
    finished: int | None = None  # expired: how many requests ran before expiry


@dataclass
class FakeBatch:
    """One batch as the fake holds it."""

    api: str
    id: str
    requests: list[dict[str, Any]]
    outcome: Outcome
    metadata: dict[str, str] = field(default_factory=dict)
    input_file_id: str | None = None
    state: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    retrieves: int = 0


class FakeBatches:
    """The fake server; `reset()` between tests."""

    def __init__(self) -> None:
        self.server = serve(self._handle)
        self._lock = threading.Lock()
        self.reset()

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.server.port}"

    def reset(self) -> None:
        """Forget every file, batch, plan and count."""
        with self._lock:
            self.files: dict[str, bytes] = {}
            self.batches: dict[str, FakeBatch] = {}
            self.order: list[str] = []
            self.outcomes: deque[Outcome] = deque()
            self.created: Counter[str] = Counter()
            self.calls: Counter[str] = Counter()
            self.hold = False
            # The next N creations make the batch, then answer 500 (a lost response).
            self.lose_created = 0
            # The next N retrieves answer 503 (an outage of the batch endpoints).
            self.fail_retrieves = 0
            # When each request arrived (monotonic), to check rate limits.
            self.times: list[float] = []

    def plan(self, *outcomes: Outcome) -> None:
        """Apply `outcomes` to the next batches created, in order."""
        with self._lock:
            self.outcomes.extend(outcomes)

    def release(self) -> None:
        """Let held batches finish."""
        with self._lock:
            self.hold = False

    def in_progress(self, api: str) -> int:
        """Batches of `api` created and not yet finished."""
        with self._lock:
            return sum(
                1
                for b in self.batches.values()
                if b.api == api and b.state in ("validating", "in_progress")
            )

    def stop(self) -> None:
        """Shut the server down."""
        self.server.clear()
        self.server.stop()

    # --- HTTP ------------------------------------------------------------------------

    def _handle(self, request: Request) -> Response:
        path, method = request.path, request.method
        with self._lock:
            self.times.append(time.monotonic())
            self.calls[f"{method} {re.sub(r'/(file|batch|msgbatch)_[^/]+', '/ID', path)}"] += 1
            if path == "/v1/files" and method == "POST":
                return self._upload(request)
            match = re.fullmatch(r"/v1/files/([^/]+)/content", path)
            if match and method == "GET":
                data = self.files.get(match.group(1))
                if data is None:
                    return _error(404, "No such file")
                return Response(data, 200, content_type="application/octet-stream")
            if path == "/v1/batches":
                return self._openai_create(request) if method == "POST" else self._list("openai")
            match = re.fullmatch(r"/v1/batches/([^/]+)(/cancel)?", path)
            if match:
                return self._retrieve("openai", match.group(1), cancel=bool(match.group(2)))
            if path == "/v1/messages/batches":
                if method == "POST":
                    return self._anthropic_create(request)
                return self._list("anthropic")
            match = re.fullmatch(r"/v1/messages/batches/([^/]+)(/cancel|/results)?", path)
            if match:
                if match.group(2) == "/results":
                    return self._anthropic_results(match.group(1))
                return self._retrieve("anthropic", match.group(1), cancel=bool(match.group(2)))
        return _error(404, f"no route {method} {path}")

    def _upload(self, request: Request) -> Response:
        if request.form.get("purpose") != "batch" or "file" not in request.files:
            return _error(400, "purpose must be batch, with a file")
        data = request.files["file"].read()
        file_id = f"file_{uuid.uuid4().hex[:16]}"
        self.files[file_id] = data
        return _json(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": request.files["file"].filename or "batch.jsonl",
                "purpose": "batch",
                "status": "processed",
            }
        )

    def _new(self, api: str, requests: list[dict[str, Any]], **extra: Any) -> FakeBatch:
        prefix = "batch" if api == "openai" else "msgbatch"
        outcome = self.outcomes.popleft() if self.outcomes else Outcome()
        batch = FakeBatch(
            api=api,
            id=f"{prefix}_{uuid.uuid4().hex[:16]}",
            requests=requests,
            outcome=outcome,
            state="validating" if api == "openai" else "in_progress",
            **extra,
        )
        self.batches[batch.id] = batch
        self.order.append(batch.id)
        self.created[api] += 1
        return batch

    def _openai_create(self, request: Request) -> Response:
        body = json.loads(request.get_data() or b"{}")
        data = self.files.get(str(body.get("input_file_id")))
        if data is None:
            return _error(400, "input_file_id not found")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions, completion_window 24h")
        lines = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        for line in lines:
            if line.get("method") != "POST" or line.get("url") != "/v1/chat/completions":
                return _error(400, "every line must POST /v1/chat/completions")
        ids = [line["custom_id"] for line in lines]
        if len(set(ids)) != len(ids):
            return _error(400, "custom_id values must be unique")
        batch = self._new(
            "openai",
            [{"custom_id": line["custom_id"], "body": line["body"]} for line in lines],
            metadata=dict(body.get("metadata") or {}),
            input_file_id=body["input_file_id"],
        )
        return self._created(batch, self._openai_view(batch))

    def _created(self, batch: FakeBatch, view: dict[str, Any]) -> Response:
        if self.lose_created > 0:
            self.lose_created -= 1
            return _error(500, f"fake failure after creating {batch.id}")
        return _json(view)

    def _anthropic_create(self, request: Request) -> Response:
        body = json.loads(request.get_data() or b"{}")
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return _error(400, "requests must be a non-empty list")
        for item in requests:
            unknown = set(item.get("params") or {}) - MESSAGES_PARAMS
            if unknown or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", str(item.get("custom_id"))):
                return _error(400, f"invalid request {item.get('custom_id')}: {sorted(unknown)}")
        batch = self._new(
            "anthropic",
            [{"custom_id": r["custom_id"], "body": r["params"]} for r in requests],
        )
        return self._created(batch, self._anthropic_view(batch))

    def _list(self, api: str) -> Response:
        found = [self.batches[i] for i in reversed(self.order) if self.batches[i].api == api]
        view = self._openai_view if api == "openai" else self._anthropic_view
        data = [view(b) for b in found]
        return _json(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def _retrieve(self, api: str, batch_id: str, *, cancel: bool) -> Response:
        batch = self.batches.get(batch_id)
        if batch is None or batch.api != api:
            return _error(404, f"No batch {batch_id}")
        if cancel:
            if batch.state in ("validating", "in_progress"):
                self._finish(batch, cancelled=True)
        elif self.fail_retrieves > 0:
            self.fail_retrieves -= 1
            return _error(503, "fake outage of the batch endpoints")
        else:
            batch.retrieves += 1
            self._advance(batch)
        view = self._openai_view if api == "openai" else self._anthropic_view
        return _json(view(batch))

    def _advance(self, batch: FakeBatch) -> None:
        if batch.state == "validating":
            batch.state = "in_progress"
        elif batch.state == "in_progress" and not self.hold:
            self._finish(batch)

    def _finish(self, batch: FakeBatch, *, cancelled: bool = False) -> None:
        """Run the batch's requests by its outcome and write its results."""
        outcome = batch.outcome
        if outcome.status == "failed" and not cancelled:
            batch.state = "failed"
            return
        ran = len(batch.requests)
        if cancelled:
            ran = 0
        elif outcome.status == "expired":
            ran = outcome.finished if outcome.finished is not None else 0
        results = []
        for n, item in enumerate(batch.requests):
            if n >= ran:
                kind = "canceled" if cancelled else "expired"
            elif n < outcome.errors:
                kind = "errored"
            else:
                kind = "succeeded"
            results.append({"custom_id": item["custom_id"], "kind": kind, "body": item["body"]})
        batch.results = results
        if batch.api == "openai":
            output = [_openai_line(r) for r in results if r["kind"] == "succeeded"]
            errors = [_openai_line(r) for r in results if r["kind"] != "succeeded"]
            if output:
                batch.output_file_id = self._file("\n".join(output) + "\n")
            if errors:
                batch.error_file_id = self._file("\n".join(errors) + "\n")
            batch.state = "cancelled" if cancelled else outcome.status
        else:
            batch.state = "ended"

    def _file(self, text: str) -> str:
        file_id = f"file_{uuid.uuid4().hex[:16]}"
        self.files[file_id] = text.encode("utf-8")
        return file_id

    def _openai_view(self, batch: FakeBatch) -> dict[str, Any]:
        done = batch.results
        failed = sum(1 for r in done if r["kind"] != "succeeded")
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": (
                {
                    "object": "list",
                    "data": [{"code": "invalid_request", "message": "fake validation failure"}],
                }
                if batch.state == "failed"
                else None
            ),
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.state,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "expires_at": batch.created_at + 86400,
            "metadata": batch.metadata,
            "request_counts": {
                "total": len(batch.requests),
                "completed": len(done) - failed,
                "failed": failed,
            },
        }

    def _anthropic_view(self, batch: FakeBatch) -> dict[str, Any]:
        kinds = Counter(r["kind"] for r in batch.results)
        ended = batch.state == "ended"
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at))
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else len(batch.requests),
                "succeeded": kinds["succeeded"],
                "errored": kinds["errored"],
                "canceled": kinds["canceled"],
                "expired": kinds["expired"],
            },
            "ended_at": created if ended else None,
            "created_at": created,
            "expires_at": created,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": (
                f"{self.url}/v1/messages/batches/{batch.id}/results" if ended else None
            ),
        }

    def _anthropic_results(self, batch_id: str) -> Response:
        batch = self.batches.get(batch_id)
        if batch is None or batch.state != "ended":
            return _error(404, "results are not available")
        lines = [json.dumps(_anthropic_line(r)) for r in batch.results]
        return Response("\n".join(lines) + "\n", 200, content_type="application/binary")


def answer_text(custom_id: str) -> str:
    """The fake's deterministic answer to one request."""
    return f"Fake batch summary for {custom_id}."


def _openai_line(result: dict[str, Any]) -> str:
    custom_id, kind = result["custom_id"], result["kind"]
    if kind == "succeeded":
        body = {
            "id": f"chatcmpl-{custom_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result["body"].get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer_text(custom_id)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": USAGE_IN,
                "completion_tokens": USAGE_OUT,
                "total_tokens": USAGE_IN + USAGE_OUT,
            },
        }
        response: dict[str, Any] | None = {"status_code": 200, "request_id": "r", "body": body}
        error = None
    elif kind == "errored":
        message = f"fake per-request failure of {custom_id}"
        response = {
            "status_code": 400,
            "request_id": "r",
            "body": {"error": {"type": "invalid_request_error", "message": message}},
        }
        error = None
    else:
        response = None
        error = {"code": f"batch_{kind}", "message": f"This request was {kind}."}
    return json.dumps(
        {
            "id": f"batch_req_{uuid.uuid4().hex[:8]}",
            "custom_id": custom_id,
            "response": response,
            "error": error,
        }
    )


def _anthropic_line(result: dict[str, Any]) -> dict[str, Any]:
    custom_id, kind = result["custom_id"], result["kind"]
    if kind == "succeeded":
        outcome: dict[str, Any] = {
            "type": "succeeded",
            "message": {
                "id": f"msg_{uuid.uuid4().hex[:8]}",
                "type": "message",
                "role": "assistant",
                "model": result["body"].get("model"),
                "content": [{"type": "text", "text": answer_text(custom_id)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": USAGE_IN, "output_tokens": USAGE_OUT},
            },
        }
    elif kind == "errored":
        outcome = {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": f"fake per-request failure of {custom_id}",
                },
            },
        }
    else:
        outcome = {"type": kind}
    return {"custom_id": custom_id, "result": outcome}


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value), status, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": {"type": "invalid_request_error", "message": message}}, status)
