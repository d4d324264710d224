"""Start-up checks of Redis as deployed: an evicting Redis refuses, no persistence warns."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import StartWorker
from tests.harness import CELERY, ROOT, Isolated, RedisServer, free_port
from worker.app import configure
from worker.errors import ConfigurationError
from worker.redis_checks import LLMQ_STATE, check, targets, where
from worker.settings import load_settings

EVICTING = ("--maxmemory", "5mb", "--maxmemory-policy", "allkeys-lru")
# Characters a URL must quote: the check must hide the password in either form.
PASSWORD = "s3cret:pw@x/y"
LOST_ON_RESTART = ("queued and unacknowledged jobs", "job results", LLMQ_STATE)

MakeRedis = Callable[..., RedisServer]


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[MakeRedis]:
    """Private redis-servers with extra options, stopped after the test."""
    servers: list[RedisServer] = []

    def make(*args: str, appendonly: bool = False, password: str | None = None) -> RedisServer:
        server = RedisServer(
            tmp_path / f"redis-{len(servers)}", appendonly=appendonly, args=args, password=password
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def _start(worker_env: dict[str, str], **env: str) -> subprocess.CompletedProcess[str]:
    """A worker's start-up, to its exit (a refused start) or a 60 s timeout."""
    return subprocess.run(
        [CELERY, "-A", "worker", "worker", "-P", "threads", "-c", "1", "--without-mingle"],
        env={**worker_env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _isolated(worker_env: dict[str, str], server: RedisServer) -> Isolated:
    app = Celery(f"llmq-{server.port}", set_as_current=False)
    configure(app, load_settings(REDIS_URL=server.url))
    return Isolated(env={**worker_env, "REDIS_URL": server.url}, app=app, url=server.url)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_worker_refuses_an_evicting_redis(
    make_redis: MakeRedis, worker_env: dict[str, str], policy: str
) -> None:
    # volatile-* evicts too: our budget and rate-limit keys have TTLs.
    server = make_redis("--maxmemory", "5mb", "--maxmemory-policy", policy, password=PASSWORD)
    done = _start(worker_env, REDIS_URL=server.url)
    assert done.returncode == 78, done.stderr[-2000:]
    assert f"maxmemory-policy {policy}" in done.stderr
    assert f"Redis at 127.0.0.1:{server.port} (REDIS_URL)" in done.stderr
    assert "CONFIG SET maxmemory-policy noeviction" in done.stderr
    assert "maxmemory-policy noeviction` in redis.conf" in done.stderr
    assert "LLM_ALLOW_EVICTING_REDIS=true" in done.stderr
    assert PASSWORD not in done.stderr and server.url not in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert "ready" not in done.stderr


def test_broker_and_backend_are_checked_as_well_as_llmq_state(
    make_redis: MakeRedis, redis_server: RedisServer
) -> None:
    evicting = make_redis(*EVICTING)
    good = redis_server.url
    for variable in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        settings = load_settings(REDIS_URL=good, **{variable: evicting.url})
        with pytest.raises(ConfigurationError) as raised:
            check(settings)
        message = str(raised.value)
        assert f"Redis at 127.0.0.1:{evicting.port} ({variable})" in message
        assert f"127.0.0.1:{redis_server.port}" not in message  # the good one passes
    # One server behind several variables is checked once, and named by all of them.
    [target] = targets(load_settings(REDIS_URL=evicting.url, CELERY_BROKER_URL=evicting.url))
    assert target.variables == ["CELERY_BROKER_URL", "REDIS_URL"]
    # The session's Redis passes: it only warns that it keeps nothing on disk.
    assert [n.event for n in check(load_settings(REDIS_URL=good))] == ["redis_not_persistent"]


def test_accepting_the_risk_starts_and_warns(
    make_redis: MakeRedis, worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    server = make_redis(*EVICTING)
    worker = start_worker(
        isolated=_isolated(worker_env, server), concurrency=1, LLM_ALLOW_EVICTING_REDIS="true"
    )
    [record] = worker.records("redis_eviction_accepted")
    assert record["level"] == "WARNING" and record["maxmemory_policy"] == "allkeys-lru"
    assert record["redis"] == f"127.0.0.1:{server.port}"
    assert "maxmemory-policy allkeys-lru" in record["message"]
    assert "LLM_ALLOW_EVICTING_REDIS=true accepts the risk" in record["message"]


@pytest.mark.parametrize("appendonly", [False, True], ids=["no-persistence", "aof"])
def test_startup_warns_once_when_redis_has_no_persistence(
    make_redis: MakeRedis,
    worker_env: dict[str, str],
    start_worker: StartWorker,
    appendonly: bool,
) -> None:
    server = make_redis(appendonly=appendonly)
    worker = start_worker(isolated=_isolated(worker_env, server), concurrency=1)
    warnings = worker.records("redis_not_persistent", "redis_persistence_unknown")
    assert worker.records("redis_eviction_accepted", "redis_policy_unknown") == []
    if appendonly:
        assert warnings == []
        return
    # One JSON line, written after Celery configured logging, saying what a restart loses.
    [record] = warnings
    assert record["event"] == "redis_not_persistent" and record["level"] == "WARNING"
    assert record["aof_enabled"] is False and record["rdb_save"] == ""
    assert record["redis"] == f"127.0.0.1:{server.port}"
    assert all(lost in record["message"] for lost in LOST_ON_RESTART)
    assert "appendonly yes" in record["message"]
    line = next(line for line in worker.output().splitlines() if "redis_not_persistent" in line)
    assert line.startswith("{") and line.endswith("}")


def test_rdb_snapshots_count_as_persistence(make_redis: MakeRedis) -> None:
    server = make_redis("--save", "3600 1")
    assert server.client().config_get("save") == {"save": "3600 1"}
    assert check(load_settings(REDIS_URL=server.url)) == []


def test_config_disabled_says_persistence_could_not_be_determined(
    make_redis: MakeRedis,
) -> None:
    # Managed Redis services often disable CONFIG; INFO still gives the policy and AOF.
    server = make_redis("--rename-command", "CONFIG", "")
    [notice] = check(load_settings(REDIS_URL=server.url))
    assert notice.event == "redis_persistence_unknown"
    assert "persistence could not be determined (AOF is off" in notice.message
    assert "unknown command 'CONFIG'" in notice.message
    assert all(lost in notice.message for lost in LOST_ON_RESTART)
    assert notice.fields["aof_enabled"] is False and notice.fields["rdb_save"] is None


def test_unreadable_policy_warns_instead_of_refusing(make_redis: MakeRedis) -> None:
    server = make_redis("--rename-command", "INFO", "", *EVICTING)
    events = {notice.event: notice for notice in check(load_settings(REDIS_URL=server.url))}
    assert set(events) == {"redis_policy_unknown", "redis_persistence_unknown"}
    assert "maxmemory-policy could not be read" in events["redis_policy_unknown"].message
    assert "starting anyway" in events["redis_policy_unknown"].message


def test_unreachable_redis_warns_within_the_timeout() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    notices = check(load_settings(REDIS_URL=url))
    assert time.monotonic() - started < 15
    assert {n.event for n in notices} == {"redis_policy_unknown", "redis_persistence_unknown"}
    assert all("s3cret" not in n.message and "s3cret" not in str(n.fields) for n in notices)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@cache.internal:6380/2", "cache.internal:6380"),
        ("rediss://:s3cret@secure.example.com/0?ssl_cert_reqs=required", "secure.example.com:6379"),
        ("unix:///run/redis.sock?password=s3cret", "unix socket /run/redis.sock"),
        (
            "sentinel://:s3cret@s1:26379/0;sentinel://:s3cret@s2/0",
            "sentinel master 'mymaster' via s1:26379,s2:26379",
        ),
    ],
)
def test_where_names_the_server_never_its_credentials(url: str, shown: str) -> None:
    assert where(url) == shown
