"""The HTTP front (producer/web.py) through a real server and a real HTTP client."""

from __future__ import annotations

import json
import logging
import select
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from producer.keys import KeyStore
from tests.fakes import FakeProvider, Fault
from tests.harness import Isolated, RedisServer, serve_front, wait_for

PROMPT = "Web prompt QUOKKA-51 must never leave the queue."
MARKER = "QUOKKA"
LIMIT = 1_048_576  # LLM_HTTP_MAX_BODY_BYTES's default, which the module's server runs with
BIG = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[Isolated]:
    """A Redis of the module's own: the front's tests flush it between them."""
    from celery import Celery

    from worker.app import configure
    from worker.settings import load_settings

    server = RedisServer(tmp_path_factory.mktemp("web-redis"))
    celery_app = Celery("llmq-web", set_as_current=False)
    configure(celery_app, load_settings(REDIS_URL=server.url))
    yield Isolated(env={**worker_env, "REDIS_URL": server.url}, app=celery_app, url=server.url)
    celery_app.close()
    server.stop()


@pytest.fixture(scope="module")
def front_url(stack: Isolated, run_dir: Path) -> Iterator[str]:
    """The front with its default settings (auth on, 1 MiB bodies), for the whole module."""
    with serve_front({**stack.env, "LLM_P95_ALERT_MS": "1000"}, run_dir) as (base, _):
        yield base


@dataclass
class Front:
    """The running front, its Redis, and a key for each of two users."""

    base: str
    stack: Isolated
    redis: redis.Redis
    users: dict[str, str]
    tokens: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def post(self, who: str | None, body: Any, **kwargs: Any) -> requests.Response:
        headers = self.auth(who) if who else {}
        return requests.post(
            f"{self.base}/v1/completions", json=body, headers=headers, timeout=10, **kwargs
        )

    def get(self, who: str | None, path: str) -> requests.Response:
        headers = self.auth(who) if who else {}
        return requests.get(f"{self.base}{path}", headers=headers, timeout=10)

    def queued(self) -> int:
        return sum(int(self.redis.llen(queue)) for queue in ("llm", "batch"))


@pytest.fixture
def front(front_url: str, stack: Isolated) -> Front:
    client = redis.Redis.from_url(stack.url, decode_responses=True)
    # Everything but kombu's bindings, which the front's producer declared once and
    # needs to route what it publishes.
    stale = [k for k in client.scan_iter(count=1000) if not k.startswith("_kombu.binding.")]
    if stale:
        client.delete(*stale)
    store = KeyStore(client)
    users = {who: f"{who}-{uuid.uuid4().hex[:8]}" for who in ("alice", "bob")}
    tokens = {who: store.create(user)[0] for who, user in users.items()}
    return Front(front_url, stack, client, users, tokens)


def job(content: str = PROMPT, **options: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **options}


def poll(front: Front, who: str, url: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        answer = front.get(who, url)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body if body["state"] in ("SUCCESS", "FAILURE") else None

    result: dict[str, Any] = wait_for(done, timeout=60, what=f"job {url}", interval=0.05)
    return result


def raw_post(
    front: Front, headers: list[str], pieces: Iterable[bytes] = ()
) -> tuple[int, bytes, int]:
    """POST hand-made headers, then body pieces until the server answers.

    The status and body of the answer, and how many body bytes were sent before it came.
    """
    head = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    sent = 0
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
        sock.sendall("\r\n".join(head).encode())
        for piece in pieces:
            # Stop streaming as soon as an answer is waiting, as an HTTP client does.
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed its side: its answer is in our buffer
            sent += len(piece)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"connection closed without an answer: {data!r}"
            data += piece
        header, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    return int(header.split(b" ", 2)[1]), body, sent


def fifty_mb(chunked: bool) -> Iterator[bytes]:
    """A 50 MB JSON body in 64 KiB pieces, as raw bytes or as HTTP/1.1 chunks."""
    piece = b"x" * 65536
    pieces = [b'{"messages": [{"role": "user", "content": "'] + [piece] * (BIG // len(piece))
    for data in pieces:
        yield b"%x\r\n%s\r\n" % (len(data), data) if chunked else data


def test_enqueue_poll_results_errors_and_health(
    front: Front, start_worker: Any, fake: FakeProvider
) -> None:
    worker = start_worker(isolated=front.stack, concurrency=4, LLM_P95_ALERT_MS="1000")
    accepted = front.post("alice", job(max_tokens=50))
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert accepted.json()["status_url"] == f"/v1/jobs/{job_id}"
    body = poll(front, "alice", accepted.json()["status_url"])
    assert body["state"] == "SUCCESS" and body["id"] == job_id
    # The task id is llmq's, derived from (user, request_id, request): not the request_id.
    assert body["result"]["text"] == fake.text and body["result"]["request_id"] != job_id
    # The user is the key's: the worker charged alice's user id.
    records = wait_for(lambda: worker.records("llm_job"), timeout=10, what="llm_job record")
    assert [r["user_id"] for r in records] == [front.users["alice"]]

    failed = front.post("alice", job(model="gpt-4o", max_tokens=16000)).json()
    error = poll(front, "alice", failed["status_url"])
    assert error["state"] == "FAILURE"
    assert error["error"]["type"] == "BudgetExceededError"
    assert "LLM_MAX_COST_PER_REQUEST" in error["error"]["message"]
    assert fake.requests() == 1

    assert front.get(None, "/health").json() == {"status": "ok"}
    report = front.get("bob", "/health")
    assert report.status_code == 200 and "latency_ms" in report.json()
    fake.set_always("openai", Fault(delay=1.2))
    slow = [front.post("bob", job()).json()["status_url"] for _ in range(3)]
    for url in slow:
        assert poll(front, "bob", url)["state"] == "SUCCESS"
    degraded = front.get(None, "/health")
    # Without a key: the status a load balancer needs, and nothing else.
    assert degraded.status_code == 503 and degraded.json() == {"status": "degraded"}
    assert front.get("alice", "/health").json()["reasons"]


def test_no_valid_key_is_401(front: Front) -> None:
    store = KeyStore(front.redis)
    revoked, key = store.create("carol")
    store.revoke(key.id)
    cases: dict[str, dict[str, str]] = {
        "none": {},
        "unknown": {"Authorization": f"Bearer llmq_{'0' * 16}_{'A' * 43}"},
        "malformed": {"Authorization": "Bearer not-a-key"},
        "basic": {"Authorization": f"Basic {front.tokens['alice']}"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
    }
    for name, headers in cases.items():
        for answer in (
            requests.post(f"{front.base}/v1/completions", json=job(), headers=headers, timeout=5),
            requests.get(f"{front.base}/v1/jobs/some-id", headers=headers, timeout=5),
        ):
            assert answer.status_code == 401, (name, answer.text)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer"), name
            assert front.tokens["alice"] not in answer.text and revoked not in answer.text
    assert front.queued() == 0


def test_the_user_comes_from_the_key_not_the_body(front: Front) -> None:
    answer = front.post("alice", {**job(), "user_id": front.users["bob"]})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "user_id"] and "comes from the API key" in error["msg"]
    assert front.queued() == 0


def test_a_job_is_read_only_with_its_owners_key(front: Front) -> None:
    accepted = front.post("alice", job())
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    mine = front.get("alice", url)
    assert mine.status_code == 200 and mine.json()["state"] == "PENDING"

    theirs = front.get("bob", url)
    unknown = front.get("bob", f"/v1/jobs/{uuid.uuid4().hex}")
    assert theirs.status_code == unknown.status_code == 403
    # The same answer whether the job exists or not: an id reveals nothing.
    assert theirs.json() == unknown.json()
    assert front.get("alice", f"/v1/jobs/{uuid.uuid4().hex}").status_code == 403

    owner_key = f"llmq:jobowner:{accepted.json()['id']}"
    assert front.users["alice"] not in str(front.redis.get(owner_key))  # hashed
    assert int(front.redis.ttl(owner_key)) > 86_400  # outlives the result (LLM_RESULT_EXPIRES)


def test_ids_are_percent_encoded_in_urls(front: Front) -> None:
    from producer.web import _owner, status_url

    odd = "a/b?c=1#d %e"
    assert status_url(odd) == "/v1/jobs/a%2Fb%3Fc%3D1%23d%20%25e"
    front.redis.set(f"llmq:jobowner:{odd}", _owner(front.users["alice"]))
    answer = front.get("alice", status_url(odd))
    assert answer.status_code == 200 and answer.json()["id"] == odd


def test_a_50_mb_body_is_413_before_it_is_read(front: Front) -> None:
    headers = [f"Authorization: Bearer {front.tokens['alice']}", "Content-Type: application/json"]
    # A length over the limit: the answer comes at once, before any of the body is sent.
    for length in (BIG, LIMIT + 1):
        code, body, _ = raw_post(front, [*headers, f"Content-Length: {length}"])
        assert (code, body) == (413, b"Content Too Large"), length

    # 50 MB streamed, announced or chunked (no length: cut off once it passes the limit).
    for framing in (f"Content-Length: {BIG}", "Transfer-Encoding: chunked"):
        chunked = framing.startswith("Transfer")
        code, body, sent = raw_post(front, [*headers, framing], fifty_mb(chunked))
        # Starlette's plain text, or FastAPI's {"detail": ...} once the route reads the body.
        assert code == 413 and b"Content Too Large" in body, (framing, body)
        # The answer came long before the end of the body: it was never read in full.
        assert sent < BIG // 2, (framing, sent)
    assert front.queued() == 0  # the worker never sees a job from a refused body

    # Exactly at the limit is still read, and enqueued.
    padded = json.dumps(job()).encode()
    answer = requests.post(
        f"{front.base}/v1/completions",
        data=padded + b" " * (LIMIT - len(padded)),
        headers={**front.auth("alice"), "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    assert front.queued() == 1


# MSG: a valid user message holding PROMPT; TEXT: PROMPT itself.
BAD_BODIES = [
    pytest.param('{"temperature": 1e999, "messages": [MSG]}', id="temperature-1e999"),
    pytest.param('{"temperature": NaN, "messages": [MSG]}', id="temperature-NaN"),
    pytest.param('{"temperature": -Infinity, "messages": [MSG]}', id="temperature-minus-inf"),
    pytest.param('{"max_tokens": true, "messages": [MSG]}', id="max_tokens-true"),
    pytest.param('{"temperature": "0.5", "messages": [MSG]}', id="temperature-string"),
    pytest.param('{"cache": "no", "messages": [MSG]}', id="cache-string"),
    pytest.param(
        '{"messages": [MSG, {"role": "user", "content": "TEXT \\ud800"}]}', id="lone-surrogate"
    ),
    pytest.param(
        '{"messages": [{"role": "system", "content": "TEXT"}, '
        '{"role": "user", "content": "\\u0000"}]}',
        id="nul-only-message",
    ),
    pytest.param('{"messages": [{"role": "wizard", "content": "TEXT"}]}', id="unknown-role"),
    pytest.param('{"messages": [{"role": "user", "content": 51, "TEXT": 1}]}', id="message-keys"),
    pytest.param('{"TEXT": true, "messages": [MSG]}', id="extra-field"),
    pytest.param('{"messages": [{"role": "user", "content": "TEXT"', id="not-json"),
    pytest.param("[MSG]", id="a-list"),
    pytest.param('{"messages": [], "note": "TEXT"}', id="no-messages"),
]


@pytest.mark.parametrize("template", BAD_BODIES)
def test_a_bad_body_is_422_quoting_no_input(front: Front, template: str) -> None:
    message = json.dumps({"role": "user", "content": PROMPT})
    body = template.replace("MSG", message).replace("TEXT", PROMPT).encode()
    answer = requests.post(
        f"{front.base}/v1/completions",
        data=body,
        headers={**front.auth("alice"), "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail and all(set(error) == {"loc", "msg", "type"} for error in detail)
    for echoed in (MARKER, "Infinity", "NaN", "\\ud800", "\\u0000"):
        assert echoed not in answer.text, echoed
    assert front.queued() == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            f'{{"messages": [{{"role": "user", "content": "\xff {PROMPT}"}}]}}'.encode("latin-1"),
            id="not-utf-8",
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100000-deep"),
    ],
)
def test_a_body_that_does_not_parse_is_400_quoting_nothing(front: Front, body: bytes) -> None:
    answer = requests.post(
        f"{front.base}/v1/completions",
        data=body,
        headers={**front.auth("alice"), "Content-Type": "application/json"},
        timeout=10,
    )
    # FastAPI's own answer for a body json.loads cannot read at all: not a 500, no input.
    assert answer.status_code == 400, answer.text
    assert MARKER not in answer.text and "[[" not in answer.text
    assert front.queued() == 0


def test_auth_off_takes_the_user_from_the_body_and_warns(
    stack: Isolated, run_dir: Path, front: Front
) -> None:
    with serve_front({**stack.env, "LLM_HTTP_AUTH": "false"}, run_dir) as (base, log_path):
        accepted = requests.post(
            f"{base}/v1/completions", json={**job(), "user_id": "trusted"}, timeout=10
        )
        assert accepted.status_code == 202, accepted.text
        polled = requests.get(f"{base}{accepted.json()['status_url']}", timeout=10)
        assert polled.status_code == 200 and polled.json()["state"] == "PENDING"
        assert "latency_ms" in requests.get(f"{base}/health", timeout=10).json()
        assert log_path.read_text().count("LLM_HTTP_AUTH=false") == 1
    assert front.queued() == 1


def test_start_up_logs_one_warning_only_with_auth_off(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from producer.web import create_app
    from worker.settings import load_settings

    for auth, expected in ((False, 1), (True, 0)):
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING),
            TestClient(create_app(load_settings(LLM_HTTP_AUTH=auth))),
        ):
            pass
        warnings = [r for r in caplog.records if r.name == "llmq.web"]
        assert len(warnings) == expected, auth
        assert all(r.levelno == logging.WARNING for r in warnings)
        assert all("WITHOUT an API key" in r.getMessage() for r in warnings)


def test_openapi_documents_the_key_and_no_user_id() -> None:
    from fastapi.testclient import TestClient

    from producer.web import app

    schema = TestClient(app).get("/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    properties = body["application/json"]["schema"]["properties"]
    assert "messages" in properties and "user_id" not in properties
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
