"""Redis URLs that must work end to end: redis://, rediss:// (TLS) and sentinel://."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests.conftest import next_db
from tests.fakes import FakeProvider
from tests.harness import Isolated, RedisServer, free_port, wait_for
from worker.app import configure
from worker.connections import connect
from worker.settings import load_settings

JOB = {"messages": [{"role": "user", "content": "Over TLS and sentinel too?"}]}


def _serve(args: list[str], check: Any) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary
    process = subprocess.Popen(
        [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(check, timeout=10, what=f"redis-server {' '.join(args[:2])}")
    return process


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A TLS-only redis-server with a self-signed certificate; the URL verifies it."""
    base = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(base / "key.pem"),
            "-out",
            str(base / "cert.pem"),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={base / 'cert.pem'}"
    process = _serve(
        [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(base / "cert.pem"),
            "--tls-key-file",
            str(base / "key.pem"),
            "--tls-ca-cert-file",
            str(base / "cert.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(base),
        ],
        lambda: _pings(connect(url)),
    )
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def sentinel_url(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A sentinel watching the session's redis-server as master `llmq-master`."""
    base = tmp_path_factory.mktemp("sentinel")
    port = free_port()
    config = Path(base / "sentinel.conf")
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {base}\n"
        f"sentinel monitor llmq-master 127.0.0.1 {redis_server.port} 1\n"
    )
    sentinel = redis.Redis(port=port, decode_responses=True)
    process = _serve(
        [str(config), "--sentinel"],
        lambda: _pings(sentinel) and sentinel.sentinel_get_master_addr_by_name("llmq-master"),
    )
    # A database of its own: a fixed number collided with the `isolated` ones.
    db = next_db()
    yield f"sentinel://127.0.0.1:{port}/{db};sentinel://127.0.0.1:{free_port()}/{db}"
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.parametrize("scheme", ["tls", "sentinel"])
def test_job_round_trip(
    scheme: str,
    request: pytest.FixtureRequest,
    start_worker: Any,
    fake: FakeProvider,
    user_id: str,
) -> None:
    url = request.getfixturevalue("tls_url" if scheme == "tls" else "sentinel_url")
    settings = load_settings(REDIS_URL=url, REDIS_SENTINEL_MASTER="llmq-master")
    assert connect(url, sentinel_master="llmq-master").ping()
    app = Celery(f"llmq-{scheme}", set_as_current=False)
    configure(app, settings)
    env = {
        **request.getfixturevalue("worker_env"),
        "REDIS_URL": url,
        "REDIS_SENTINEL_MASTER": "llmq-master",
    }
    start_worker(isolated=Isolated(env=env, app=app, url=url), concurrency=2)
    result = app.send_task("llm.complete", kwargs={**JOB, "user_id": user_id}).get(timeout=60)
    assert result["text"] == fake.text
    app.close()


@pytest.mark.parametrize("scheme", ["tls", "sentinel"])
def test_start_up_check_reads_the_eviction_policy_through_each_scheme(
    scheme: str, request: pytest.FixtureRequest, redis_server: RedisServer
) -> None:
    from worker.errors import ConfigurationError
    from worker.redis_checks import check

    url = request.getfixturevalue("tls_url" if scheme == "tls" else "sentinel_url")
    # The sentinel's master is the session's Redis: with no maxmemory set, the policy
    # evicts nothing while this test holds it.
    server = connect(url) if scheme == "tls" else redis_server.client()
    server.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(ConfigurationError) as raised:
            check(load_settings(REDIS_URL=url, REDIS_SENTINEL_MASTER="llmq-master"))
    finally:
        server.config_set("maxmemory-policy", "noeviction")
    message = str(raised.value)
    assert "maxmemory-policy volatile-lru" in message
    shown = (
        f"127.0.0.1:{url.split(':')[2].split('/')[0]}"
        if scheme == "tls"
        else "sentinel master 'llmq-master' via 127.0.0.1:"
    )
    assert f"Redis at {shown}" in message
    assert "ssl_ca_certs" not in message
