"""The Grafana dashboard: a well-formed dashboard whose every query names a metric llmq serves."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from producer import submit
from tests.conftest import StartWorker
from tests.fakes import FakeProvider
from tests.harness import ROOT, Isolated, free_port, serve_front
from tests.prometheus import PrometheusServer

DASHBOARD = ROOT / "deploy" / "grafana" / "llmq.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PANEL_TYPES = {"timeseries", "stat", "state-timeline", "gauge", "bargauge", "table"}
METRIC = re.compile(r"\bllmq_[a-z_]+\b")
# Grafana's own variables, as Grafana would substitute them before asking Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def served_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry, labelled children or not yet."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "llmq" and board["title"] and isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) > 0
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"] and METRIC.search(target["expr"])
    text = "\n".join(expressions())
    # What the issue asks to see: throughput, percentiles, tokens and cost per model,
    # cache hit rate, limiter rejections, breaker state.
    assert "rate(llmq_jobs_total" in text
    for histogram in ("llmq_job_latency_seconds", "llmq_queue_wait_seconds"):
        for quantile in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in text
    for metric in ("llmq_input_tokens_total", "llmq_output_tokens_total", "llmq_cost_usd_total"):
        assert re.search(rf"sum by \([^)]*model[^)]*\) \(rate\({metric}", text), metric
    assert "llmq_cache_hits_total" in text and "llmq_cache_misses_total" in text
    assert "llmq_rate_limit_rejections_total" in text and "llmq_breaker_state" in text


def test_every_query_names_a_served_metric_and_parses_in_prometheus(
    start_worker: StartWorker,
    fake: FakeProvider,
    isolated: Isolated,
    run_dir: Path,
    tmp_path: Path,
) -> None:
    queue = f"dash-{uuid.uuid4().hex[:6]}"
    port = free_port()
    start_worker(2, queue, LLM_METRICS_PORT=str(port), LLM_METRICS_HOST="127.0.0.1")
    submit([{"role": "user", "content": "Dashboard?"}], "u-dash", queue=queue).get(timeout=60)
    worker_page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    with serve_front({**isolated.env, "LLM_HTTP_AUTH": "false"}, run_dir) as (base, _):
        front_page = requests.get(f"{base}/metrics", timeout=5).text
    served = served_names(worker_page) | served_names(front_page)
    named = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert named and named <= served, sorted(named - served)

    prometheus = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
    try:
        for expr in expressions():
            query = expr
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            prometheus.query(query)  # asserts the status is success: valid PromQL
    finally:
        prometheus.stop()
