"""The deployment files: no Docker engine runs here, so check what can be checked."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.harness import CELERY, ROOT
from worker.settings import Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
COMPOSE_ONLY = {"FLOWER_USER", "FLOWER_PASSWORD"}


def setting_names() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []))
    return names


def test_compose_services() -> None:
    assert set(SERVICES) == {"redis", "worker", "flower"}
    redis_cmd = SERVICES["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert SERVICES["redis"]["healthcheck"]["test"][-1] == "ping"
    assert "container_name" not in SERVICES["worker"]  # would block --scale worker=N
    assert "ports" not in SERVICES["worker"]
    for name in ("worker", "flower"):
        assert SERVICES[name]["env_file"] == ".env"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(arg.startswith("--basic-auth=") for arg in SERVICES["flower"]["command"])


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
    if sub == "flower":
        # Flower's options are tornado options, not listed by --help.
        from flower.options import options

        known = {f"--{name.replace('_', '-')}" for name in options._options}
    else:
        known = set(re.findall(r"--[a-z][a-z-]+", done.stdout))
    for option in command[4:]:
        flag = option.split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"{flag} is not an option of celery {sub}"


def test_dockerfile_command_matches_worker_service() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == SERVICES["worker"]["command"]
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / path).exists(), path


def test_env_example_documents_every_setting() -> None:
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.M))
    assert documented - COMPOSE_ONLY == setting_names()
    compose_vars = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    assert compose_vars <= documented


def test_env_example_loads_as_settings(tmp_path: Any) -> None:
    env = {"PATH": "/usr/bin:/bin", "LLMQ_ENV_FILE": str(ROOT / ".env.example")}
    code = "from worker.settings import load_settings; s = load_settings(); print(s.chain)"
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['extractive']"
