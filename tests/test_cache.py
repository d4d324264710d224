"""The response cache: key identity, what may be stored, statistics and clearing."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import CELERY, RedisServer
from worker.cache import ResponseCache, cache_request, served_from_cache, storable
from worker.models import CompletionJob, CompletionResult
from worker.prices import load_prices
from worker.settings import Settings, load_settings

PRICES = load_prices()
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def job(**options: Any) -> CompletionJob:
    return CompletionJob.model_validate({"messages": MESSAGES, "user_id": "u1", **options})


def digest(settings: Settings | None = None, **options: Any) -> str | None:
    request = cache_request(job(**options), settings=settings or openai(), prices=PRICES)
    return request.digest if request else None


def openai(**overrides: Any) -> Settings:
    return load_settings(provider="openai", **overrides)


def result(**overrides: Any) -> CompletionResult:
    values: dict[str, Any] = {
        "request_id": "r1",
        "text": "Paris.",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "finish_reason": "stop",
        "input_tokens": 14,
        "output_tokens": 2,
        "cost_usd": 0.0000033,
        "latency_ms": 812.0,
    }
    values.update(overrides)
    return CompletionResult.model_validate(values)


def test_only_deterministic_jobs_are_cacheable_by_default() -> None:
    assert digest(temperature=0) is not None
    assert digest(temperature=0.7) is None
    assert digest() is None  # LLM_TEMPERATURE defaults to 0.7
    assert digest(openai(temperature=0)) is not None
    assert digest(temperature=0, cache=False) is None
    assert digest(temperature=0.7, cache=True) is not None
    assert digest(openai(cache_enabled=False), temperature=0) is None


def test_key_resolves_defaults_like_the_worker() -> None:
    # The primary provider's model and LLM_MAX_TOKENS (capped by the model) are what a
    # worker sends, so an explicit job with the same values is the same request.
    implicit = digest(temperature=0)
    assert implicit == digest(temperature=0, model="gpt-4o-mini", max_tokens=2048)
    capped = openai(max_tokens=100_000)
    assert digest(capped, temperature=0) == digest(temperature=0, max_tokens=16384)
    request = cache_request(job(temperature=0), settings=capped, prices=PRICES)
    assert request is not None and request.max_tokens == 16384


def test_everything_that_shapes_the_answer_changes_the_key() -> None:
    base = digest(temperature=0)
    assert base is not None and len(base) == 64
    others = {
        digest(temperature=0, model="gpt-4o"),
        digest(temperature=0, max_tokens=100),
        digest(temperature=0.5, cache=True),
        digest(openai(), temperature=0, messages=[{"role": "user", "content": "Capital of Peru?"}]),
        digest(temperature=0, messages=[{"role": "system", "content": "x"}, *MESSAGES]),
    }
    assert base not in others and len(others) == 5
    # LLM_MODEL=gpt-4o resolves to the same request as a job naming gpt-4o.
    assert digest(openai(model="gpt-4o"), temperature=0) == digest(temperature=0, model="gpt-4o")
    # Who asks, and under which request id, does not change the answer.
    assert base == digest(temperature=0, user_id="someone-else", request_id="r-42")


def test_only_complete_answers_are_storable() -> None:
    assert storable(result())
    assert not storable(result(finish_reason="length", truncated=True))
    assert not storable(result(finish_reason="content_filter"))
    assert not storable(result(text=""))


def test_store_get_and_served_copy(redis_server: RedisServer) -> None:
    cache = ResponseCache(redis_server.client(), version=f"t-{uuid.uuid4().hex[:8]}", ttl=60)
    request = cache_request(job(temperature=0), settings=openai(), prices=PRICES)
    assert request is not None
    assert cache.get(request) is None
    assert not cache.put(request, result(finish_reason="length", truncated=True))
    assert not cache.put(request, result(provider="anthropic", model="claude-haiku-4-5"))
    assert cache.get(request) is None
    assert cache.put(request, result())
    assert 0 < redis_server.client().ttl(cache.entry_key(request)) <= 60
    stored = cache.get(request)
    assert stored == result()
    served = served_from_cache(stored, request_id="r2", latency_ms=1.5)
    assert (served.request_id, served.cached, served.cost_usd, served.attempts) == (
        "r2",
        True,
        0,
        0,
    )
    assert served.text == "Paris."


def test_stats_and_clear_by_version(redis_server: RedisServer) -> None:
    client = redis_server.client()
    first, second = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    caches = [ResponseCache(client, version=v, ttl=60) for v in (first, second)]
    for n in range(3):
        request = cache_request(
            job(temperature=0, max_tokens=10 + n), settings=openai(), prices=PRICES
        )
        assert request is not None
        caches[0].put(request, result(text="x" * 10))
    caches[0].record_hit(0.25)
    caches[0].record_hit(0.5)
    caches[0].record_miss()
    caches[1].put(cache_request(job(temperature=0), settings=openai(), prices=PRICES), result())  # type: ignore[arg-type]

    stats = caches[0].stats(first)
    assert (stats.entries, stats.hits, stats.misses) == (3, 2, 1)
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert stats.saved_usd == pytest.approx(0.75)
    assert stats.bytes == 3 * len(result(text="x" * 10).model_dump_json())

    assert caches[0].clear(first) == 3
    assert caches[0].stats(first).entries == 0
    assert caches[0].stats(first).hits == 0
    assert caches[1].stats(second).entries == 1  # another version is untouched


def llmq(redis_url: str, *args: str) -> Any:
    env = {**os.environ, "REDIS_URL": redis_url, "LLM_CACHE_VERSION": "7"}
    llmq_bin = str(Path(CELERY).with_name("llmq"))
    done = subprocess.run([llmq_bin, *args, "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_cache_stats_and_clear(tmp_path: Path) -> None:
    # A private Redis: clearing every version must not touch the session's cache.
    server = RedisServer(tmp_path / "redis")
    try:
        client = server.client()
        request = cache_request(job(temperature=0), settings=openai(), prices=PRICES)
        assert request is not None
        for version in ("6", "7"):
            cache = ResponseCache(client, version=version, ttl=60)
            cache.put(request, result())
            cache.record_hit(0.001)
        cache.record_miss()

        stats = llmq(server.url, "cache", "stats")
        assert stats["version"] == "7"  # LLM_CACHE_VERSION by default
        assert (stats["entries"], stats["hits"], stats["misses"]) == (1, 1, 1)
        assert stats["hit_rate"] == 0.5 and stats["saved_usd"] == pytest.approx(0.001)
        assert stats["bytes"] == len(result().model_dump_json())
        assert llmq(server.url, "cache", "stats", "--all")["entries"] == 2

        assert llmq(server.url, "cache", "clear", "--version", "6") == {
            "version": "6",
            "deleted": 1,
        }
        assert llmq(server.url, "cache", "stats", "--all")["entries"] == 1
        assert llmq(server.url, "cache", "clear")["deleted"] == 1
        assert llmq(server.url, "cache", "stats", "--all")["entries"] == 0
    finally:
        server.stop()


def test_cli_refuses_a_glob_for_a_version(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    try:
        client = server.client()
        request = cache_request(job(temperature=0), settings=openai(), prices=PRICES)
        assert request is not None
        for name in ("6", "7"):
            ResponseCache(client, version=name, ttl=60).put(request, result())
        before = sorted(client.scan_iter("*"))
        env = {**os.environ, "REDIS_URL": server.url}
        llmq_bin = str(Path(CELERY).with_name("llmq"))
        for command in ("clear", "stats"):
            done = subprocess.run(
                [llmq_bin, "cache", command, "--version", "*"],
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 2, (command, done.stdout)
            assert "'*' is not a cache version" in done.stderr
            assert "no glob characters" in done.stderr
        assert sorted(client.scan_iter("*")) == before  # nothing was deleted
    finally:
        server.stop()


@pytest.mark.parametrize("version", ["7*", "?", "[67]", "a\\*", "", "x" * 65, "1\n", "a b"])
def test_version_option_takes_only_what_the_setting_takes(
    version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli import parser

    for command in ("clear", "stats"):
        with pytest.raises(SystemExit) as exited:
            parser().parse_args(["cache", command, "--version", version])
        assert exited.value.code == 2
        assert "is not a cache version" in capsys.readouterr().err
    with pytest.raises(ValueError):
        Settings(LLM_CACHE_VERSION=version or " ")  # type: ignore[call-arg]


def test_version_option_takes_a_valid_version() -> None:
    from producer.cli import parser

    for version in ("7", "v1.2_3-x", "x" * 64):
        assert parser().parse_args(["cache", "clear", "--version", version]).version == version
        assert Settings(LLM_CACHE_VERSION=version).cache_version == version  # type: ignore[call-arg]


def test_cache_api_refuses_a_glob_for_a_version(redis_server: RedisServer) -> None:
    cache = ResponseCache(redis_server.client(), version="1", ttl=60)
    for version in ("*", "1*", "[12]"):
        with pytest.raises(ValueError, match="not a cache version"):
            cache.clear(version)
        with pytest.raises(ValueError, match="not a cache version"):
            cache.stats(version)
