"""docker-compose.yml is what an operator would run: healthchecks everywhere, pinned images, one flexlb image built
once, a stop grace period above the drain, Redis persisted and not published, Grafana provisioned with the
Prometheus of the stack and the flexlb dashboard (tests/unit/test_grafana_dashboard.py checks the dashboard)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from flexlb.settings import FlexlbConfig

yaml = pytest.importorskip("yaml")  # PyYAML: not a flexlb dependency; CI images have it through other packages

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "flexlb:local"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, text
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", name


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_one_flexlb_image_built_once(services: dict[str, dict[str, Any]]) -> None:
    built = [name for name, service in services.items() if "build" in service]
    assert len(built) == 1 and services[built[0]]["image"] == IMAGE
    flexlb = [name for name, service in services.items() if service.get("command", [""])[0] == "flexlb"]
    assert all(services[name]["image"] == IMAGE for name in flexlb)
    assert all(services[name].get("pull_policy") == "never" for name in flexlb if name not in built)


def test_routers_stop_after_their_drain(services: dict[str, dict[str, Any]]) -> None:
    drain_s = FlexlbConfig().shutdown_timeout_ms / 1000
    routers = [name for name, service in services.items() if service.get("command", [""])[:2] == ["flexlb", "serve"]]
    assert routers
    for name in routers:
        assert seconds(services[name]["stop_grace_period"]) > drain_s, name


def test_redis_is_persisted_and_not_published(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "ports" not in redis
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_grafana_loads_the_provisioning_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro" and (ROOT / source).is_dir(), volume
        mounts[target] = ROOT / source
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "flexlb.yml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "flexlb-dashboard.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/") and (dashboards / Path(home).name).is_file()
    # the dashboard's datasource variable defaults to the provisioned datasource
    variables = json.loads((dashboards / "flexlb-dashboard.json").read_text())["templating"]["list"]
    assert next(v for v in variables if v["name"] == "datasource")["current"]["value"] == datasource["uid"]
