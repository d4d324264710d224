"""Money fingerprints: what they cover, and how heartbeats keep only live workers listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import Isolated, wait_for
from worker.connections import connect
from worker.fleet import KEY, Fingerprint, Heartbeat, live_workers, report
from worker.settings import load_settings

MINI = {
    "provider": "openai",
    "input": 0.15,
    "output": 0.60,
    "cached_input": 0.075,
    "context_window": 128000,
    "max_output_tokens": 16384,
}


def _toml(path: Path, input_price: str) -> Path:
    path.write_text(
        'prices_as_of = "2026-01-01"\n[models."gpt-4o-mini"]\nprovider = "openai"\n'
        f"input = {input_price}\noutput = 0.6\ncached_input = 0.075\n"
        "context_window = 128000\nmax_output_tokens = 16384\n"
    )
    return path


def test_prices_as_data_not_as_file_bytes(tmp_path: Path) -> None:
    toml = Fingerprint.of(load_settings(LLM_PRICES_FILE=str(_toml(tmp_path / "a.toml", "0.150"))))
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps({"models": {"gpt-4o-mini": MINI}}, indent=4))
    same = Fingerprint.of(load_settings(LLM_PRICES_FILE=str(as_json)))
    assert same.digest == toml.digest  # another format, another date: the same prices
    assert same.prices_sources[-1] == str(as_json)

    dear = Fingerprint.of(load_settings(LLM_PRICES_FILE=str(_toml(tmp_path / "b.toml", "15"))))
    assert dear.digest != toml.digest
    assert {n for n in toml.components if toml.components[n] != dear.components[n]} == {"prices"}


@pytest.mark.parametrize(
    ("variable", "value", "component"),
    [
        ("LLM_MAX_COST_PER_REQUEST", "0.5", "max_cost_per_request"),
        ("LLM_USER_DAILY_BUDGET_USD", "2", "user_daily_budget_usd"),
        ("LLM_UNKNOWN_MODEL_PRICING", "fallback", "unknown_model_pricing"),
        ("LLM_SPEND_NAMESPACE", "other", "spend_namespace"),
        ("LLM_PROVIDER", "openai", "default_models"),
        ("LLM_ON_TRUNCATION", "retry_larger", "truncation"),
    ],
)
def test_each_money_setting_changes_its_component(
    variable: str, value: str, component: str
) -> None:
    base = Fingerprint.of(load_settings(OPENAI_API_KEY="k"))
    changed = Fingerprint.of(load_settings(OPENAI_API_KEY="k", **{variable: value}))
    assert changed.digest != base.digest
    assert [n for n in base.components if base.components[n] != changed.components[n]] == [
        component
    ]


def test_settings_that_do_not_decide_money_leave_it_alone() -> None:
    base = Fingerprint.of(load_settings())
    other = Fingerprint.of(
        load_settings(LLM_WORKER_CONCURRENCY=3, LLM_LOG_LEVEL="DEBUG", LLM_P95_ALERT_MS=1)
    )
    assert other.digest == base.digest


def test_heartbeats_list_live_workers_only(isolated: Isolated) -> None:
    client = connect(isolated.url)
    fingerprint = Fingerprint.of(load_settings())
    alive = Heartbeat(client=client, fingerprint=fingerprint, interval=0.5)
    alive.start(name="alive@test", queues=["llm"])
    try:
        first = client.hget(KEY, "alive@test")
        assert first is not None
        # It refreshes on its own, stamped with Redis's clock.
        wait_for(lambda: client.hget(KEY, "alive@test") != first, timeout=5, what="a refresh")

        # A worker that stops beating without removing itself (SIGKILL) drops out
        # after three missed heartbeats, and the next live beat prunes its entry.
        dead = Heartbeat(client=client, fingerprint=fingerprint, interval=0.5, name="dead@test")
        dead.beat()
        assert set(live_workers(client)) == {"alive@test", "dead@test"}
        entry = live_workers(client)["dead@test"]
        assert entry["fingerprint"] == fingerprint.digest and entry["heartbeat_seconds"] == 0.5
        wait_for(lambda: "dead@test" not in live_workers(client), timeout=5, what="drop-out")
        wait_for(lambda: not client.hexists(KEY, "dead@test"), timeout=5, what="pruning")
        assert report(client)["fingerprints"] == {fingerprint.digest[:12]: ["alive@test"]}
        assert 0 < client.ttl(KEY) <= 2  # the hash itself goes once every worker is gone
    finally:
        alive.stop()
    assert not client.hexists(KEY, "alive@test")  # a clean stop leaves at once
