"""The deployment files: no Docker engine runs here, so check what can be checked.

docker-compose.yml is read as compose reads it (YAML merge keys, `${VAR:-default}` from
.env), and its services are run as processes with exactly the environment compose would
give their containers.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml

from producer.keys import KeyStore
from tests.harness import CELERY, ROOT, Flower, Isolated, Worker, free_port, serve_front, wait_for
from worker.settings import API_KEY_ENV, Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
LLMQ_SERVICES = ("worker", "web", "flower")
# `docker compose --profile telemetry up`: off unless asked for.
TELEMETRY_SERVICES = ("prometheus", "grafana")
# Documented in .env.example for compose to build FLOWER_BASIC_AUTH from; no llmq setting.
COMPOSE_ONLY = {"FLOWER_USER", "FLOWER_PASSWORD"}
# Settings only the HTTP front reads.
FRONT_ONLY = {"LLM_HTTP_AUTH", "LLM_HTTP_MAX_BODY_BYTES"}
# What only a process that calls providers may hold.
PROVIDER_ONLY = {*API_KEY_ENV.values(), "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GEMINI_BASE_URL"}
# The fields a job's resolution reads (worker/cache.py's cache_request, the price table):
# the front finds a cached answer only if it resolves a job exactly as a worker does.
JOB_FIELDS = (
    "provider",
    "model",
    "openai_model",
    "anthropic_model",
    "gemini_model",
    "max_tokens",
    "temperature",
    "prices_file",
    "unknown_model_pricing",
    "cache_enabled",
    "cache_version",
)
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def setting_names() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []))
    return names


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    choices: list[str] = getattr(alias, "choices", [])
    return choices[0]


def environment(service: str) -> dict[str, str]:
    """The service's `environment:` as written (merge keys resolved), values unexpanded."""
    return {name: str(value) for name, value in SERVICES[service].get("environment", {}).items()}


def env_example() -> dict[str, str]:
    """NAME=value lines of .env.example: what compose interpolates from a copied .env."""
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))


def interpolate(value: str, source: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`."""

    def one(found: re.Match[str]) -> str:
        name, op, arg = found["name"], found["op"], found["arg"]
        current = source.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":?" and not current:
            raise ValueError(f"{name}: {arg}")
        return current

    return _VARIABLE.sub(one, value)


def container_env(service: str, dotenv: Mapping[str, str], redis_url: str) -> dict[str, str]:
    """The service's environment as compose would set it, with the test's Redis and PATH."""
    env = {name: interpolate(value, dotenv) for name, value in environment(service).items()}
    assert env["REDIS_URL"] == "redis://redis:6379/0"  # the compose network's Redis
    return {
        **env,
        "REDIS_URL": redis_url,
        "PATH": os.environ["PATH"],
        # The image's ENV, and no .env file: the container has none.
        "TIKTOKEN_CACHE_DIR": os.environ["TIKTOKEN_CACHE_DIR"],
        "LLMQ_ENV_FILE": os.devnull,
    }


def test_compose_services() -> None:
    assert set(SERVICES) == {"redis", *LLMQ_SERVICES, *TELEMETRY_SERVICES}
    for name in TELEMETRY_SERVICES:
        assert SERVICES[name]["profiles"] == ["telemetry"], name
    for name in ("redis", *LLMQ_SERVICES):
        assert "profiles" not in SERVICES[name], name
    redis_cmd = SERVICES["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert SERVICES["redis"]["healthcheck"]["test"][-1] == "ping"
    assert "container_name" not in SERVICES["worker"]  # would block --scale worker=N
    for name in ("redis", "worker"):
        assert "ports" not in SERVICES[name], name
    for name in LLMQ_SERVICES:
        # Every variable by name: an env_file would hand a service all of .env.
        assert "env_file" not in SERVICES[name], name
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_variable_is_a_setting_or_flowers_own() -> None:
    from flower.options import options

    settings = setting_names()
    for service in LLMQ_SERVICES:
        for name in environment(service):
            if name.startswith("FLOWER_"):
                # Flower reads FLOWER_BASIC_AUTH as --basic-auth (tornado's option names).
                option = name.removeprefix("FLOWER_").lower().replace("_", "-")
                assert option in options._options, name
            else:
                assert name in settings, f"{service}: {name} is not an llmq setting"


def test_each_service_gets_only_what_it_uses() -> None:
    worker, web, flower = (set(environment(name)) for name in LLMQ_SERVICES)
    # The workers alone call providers; Flower and the front never hold a key.
    assert worker >= PROVIDER_ONLY
    assert not PROVIDER_ONLY & (web | flower)
    # Flower's credentials reach Flower alone.
    assert {n for n in worker | web if n.startswith("FLOWER_")} == set()
    assert "FLOWER_BASIC_AUTH" in flower
    # The worker reads every setting but the front's; the front reads its own.
    assert worker == setting_names() - FRONT_ONLY
    assert web >= FRONT_ONLY
    # Flower builds the Celery app and nothing else: no job, cost or provider setting.
    job = {env_name(field) for field in JOB_FIELDS}
    assert not flower & (job | FRONT_ONLY | {"LLM_MAX_COST_PER_REQUEST", "LLM_LOG_PROMPTS"})


def test_the_front_resolves_jobs_as_the_workers_do() -> None:
    worker, web = environment("worker"), environment("web")
    for field in JOB_FIELDS:
        name = env_name(field)
        assert name in web, f"the front needs {name} to find the worker's cached answers"
    for name in web.keys() & worker.keys():
        assert web[name] == worker[name], name


def test_dashboards_and_the_front_listen_on_localhost_only() -> None:
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert SERVICES["web"]["ports"] == ["127.0.0.1:8000:8000"]
    assert SERVICES["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert SERVICES["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    web = SERVICES["web"]["command"]
    # Inside its container the front listens on every interface, at the published port.
    assert web[web.index("--host") + 1] == "0.0.0.0" and web[web.index("--port") + 1] == "8000"
    flower = environment("flower")
    assert "FLOWER_ADDRESS" not in flower and "FLOWER_PORT" not in flower  # Flower's 5555


@pytest.mark.parametrize("service", ["worker", "flower"])
def test_compose_commands_exist(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[:3] == ["celery", "-A", "worker"]
    sub = command[3]
    done = subprocess.run(
        [CELERY, "-A", "worker", sub, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    known = set(re.findall(r"--[a-z][a-z-]+", done.stdout))
    for option in command[4:]:
        flag = option.split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"{flag} is not an option of celery {sub}"


def test_flower_runs_with_its_config_file_and_no_flags() -> None:
    # Buckets and result hiding are flowerconfig.py's, read from the working directory.
    assert SERVICES["flower"]["command"] == ["celery", "-A", "worker", "flower"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    assert re.search(r"^COPY flowerconfig\.py \./$", dockerfile, re.M)


def test_the_front_command_exists() -> None:
    command = SERVICES["web"]["command"]
    assert command[0] == "uvicorn"
    module, _, attribute = command[1].partition(":")
    from fastapi import FastAPI

    assert isinstance(getattr(importlib.import_module(module), attribute), FastAPI)
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    done = subprocess.run([uvicorn, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in (arg for arg in command[2:] if arg.startswith("--")):
        assert flag in done.stdout, f"{flag} is not an option of uvicorn"


def test_dockerfile_command_matches_worker_service() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == SERVICES["worker"]["command"]
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / path).exists(), path


def test_env_example_documents_every_setting() -> None:
    documented = set(env_example())
    assert documented - COMPOSE_ONLY == setting_names()
    compose_vars = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    assert compose_vars <= documented


def test_env_example_loads_as_settings(tmp_path: Any) -> None:
    env = {"PATH": "/usr/bin:/bin", "LLMQ_ENV_FILE": str(ROOT / ".env.example")}
    code = "from worker.settings import load_settings; s = load_settings(); print(s.chain)"

    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['extractive']"


def mounts(service: str) -> dict[str, Path]:
    """The service's bind mounts: container path -> the repository file or folder."""
    found = {}
    for volume in SERVICES[service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


def test_the_telemetry_profile_scrapes_what_the_services_serve() -> None:
    for service in TELEMETRY_SERVICES:
        for target, source in mounts(service).items():
            assert source.exists(), f"{service}: {source} (mounted at {target})"
    config_file = mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    # Debian's promtool (with the prometheus package) checks it as Prometheus would.
    checked = subprocess.run(
        ["promtool", "check", "config", str(config_file)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {
        job["job_name"]: job for job in yaml.safe_load(config_file.read_text())["scrape_configs"]
    }
    # Every worker replica, on the port the composed worker serves /metrics on.
    worker = container_env("worker", env_example(), "redis://unused")
    (discovery,) = jobs["llmq-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert str(discovery["port"]) == worker["LLM_METRICS_PORT"]
    assert worker["LLM_METRICS_HOST"] == "0.0.0.0"  # reachable from the Prometheus container
    assert "ports" not in SERVICES["worker"]  # ... and from nowhere else
    web = SERVICES["web"]["command"]
    assert jobs["llmq-web"]["static_configs"] == [
        {"targets": [f"web:{web[web.index('--port') + 1]}"]}
    ]
    # Grafana: its data source is that Prometheus, and it loads the dashboard from the repo.
    grafana = mounts("grafana")
    provisioning = grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert SERVICES["prometheus"]["ports"][0].endswith(":9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "llmq.yml").read_text())[
        "providers"
    ]
    dashboard = provider["options"]["path"] + "/llmq.json"
    assert grafana[dashboard] == ROOT / "deploy" / "grafana" / "llmq.json"
    panels = json.loads(grafana[dashboard].read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {source["uid"]}


def test_compose_refuses_to_start_flower_without_a_password() -> None:
    dotenv = env_example()
    assert dotenv["FLOWER_PASSWORD"] == ""
    with pytest.raises(ValueError, match="FLOWER_PASSWORD"):
        container_env("flower", dotenv, "redis://unused")
    composed = container_env("flower", {**dotenv, "FLOWER_PASSWORD": "pw-123456"}, "redis://x")
    assert composed["FLOWER_BASIC_AUTH"] == "admin:pw-123456"


def test_the_composed_worker_and_front_answer_a_job(
    isolated: Isolated, run_dir: Path, user_id: str
) -> None:
    # .env.example as the .env: the offline provider, no key anywhere.
    dotenv = {**env_example(), "FLOWER_PASSWORD": "flower-pw-51"}
    # The composed port (9100) in a test port: other tests' workers may be running.
    metrics_port = free_port()
    composed = {
        **container_env("worker", dotenv, isolated.url),
        "LLM_METRICS_PORT": str(metrics_port),
    }
    worker = Worker(composed, run_dir, concurrency=2)
    try:
        worker.wait_ready(isolated.app)
        with serve_front(container_env("web", dotenv, isolated.url), run_dir) as (base, log):
            body = {"messages": [{"role": "user", "content": "Compose. " * 40}]}
            url = f"{base}/v1/completions"
            assert requests.post(url, json=body, timeout=10).status_code == 401  # auth is on
            client = redis.Redis.from_url(isolated.url, decode_responses=True)
            key = {"Authorization": f"Bearer {KeyStore(client).create(user_id)[0]}"}
            accepted = requests.post(url, json=body, headers=key, timeout=10)
            assert accepted.status_code == 202, accepted.text
            status_url = f"{base}{accepted.json()['status_url']}"

            def done() -> dict[str, Any] | None:
                polled: dict[str, Any] = requests.get(status_url, headers=key, timeout=10).json()
                return polled if polled["state"] in ("SUCCESS", "FAILURE") else None

            result = wait_for(done, timeout=60, what="the composed worker")
            assert result["state"] == "SUCCESS", result
            assert result["result"]["provider"] == "extractive"
            assert "LLM_HTTP_AUTH=false" not in log.read_text()
            # What the telemetry profile's Prometheus scrapes: the worker and the front.
            page = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'llmq_jobs_total{outcome="completed"} 1.0' in page
            front = requests.get(f"{base}/metrics", timeout=10).text
            assert 'route="/v1/completions",status="202"} 1.0' in front
    finally:
        worker.stop()


def test_the_composed_flower_demands_its_password(isolated: Isolated, run_dir: Path) -> None:
    dotenv = {**env_example(), "FLOWER_USER": "ops", "FLOWER_PASSWORD": "flower-pw-51"}
    env = container_env("flower", dotenv, isolated.url)
    assert not PROVIDER_ONLY & set(env)
    # As composed, plus the test's address and port in place of 0.0.0.0:5555.
    flower = Flower(env, run_dir)
    try:
        assert requests.get(f"{flower.url}/api/tasks", timeout=5).status_code == 401
        authed = requests.get(f"{flower.url}/api/tasks", auth=("ops", "flower-pw-51"), timeout=5)
        assert authed.status_code == 200
    finally:
        flower.stop()
