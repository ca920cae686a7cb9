"""Prometheus config and rules (promtool), Grafana provisioning and dashboards, collector pipelines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: `make test` installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *map(str, sorted((PROMETHEUS / "tests").glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in (PROMETHEUS / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for path in (PROMETHEUS / "tests").glob("*.yml")
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alerts and alerts <= tested, f"alerts without a promtool test: {alerts - tested}"


def _datasource_uids() -> set[str]:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/datasources.yml").read_text())
    return {source["uid"] for source in provisioned["datasources"]}


def test_exemplars_link_to_a_provisioned_trace_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/datasources.yml").read_text())
    (prometheus,) = [s for s in provisioned["datasources"] if s["type"] == "prometheus"]
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert {d["datasourceUid"] for d in destinations} <= _datasource_uids()
    assert {s["type"] for s in provisioned["datasources"]} >= {"prometheus", "jaeger"}


def test_dashboards_are_provisioned_from_the_folder_they_live_in() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert len(DASHBOARDS) >= 2


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    """Importable into any Grafana: every panel, query and variable follows the `datasource` variable
    (no hard-wired uid), and every query follows the instance variable."""
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert '"uid": "prometheus"' not in path.read_text(), "a hard-wired datasource uid"
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    first, *others = dashboard["templating"]["list"]
    assert (first["name"], first["type"], first["query"]) == ("datasource", "datasource", "prometheus")
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "instance" in variables
    for variable in others:
        assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel without a query: {panel['title']}"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']} ignores the instance variable"
        width = panel["gridPos"]["x"] + panel["gridPos"]["w"]
        assert width <= 24, f"{panel['title']} overflows the grid"


def _agent_dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads((GRAFANA / "dashboards/agent-service.json").read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in _panels(dashboard) if p["type"] != "row"}


def test_the_error_panels_show_server_faults_apart_from_client_outcomes() -> None:
    exprs = _agent_dashboard_exprs()
    (ratio,) = exprs["Server-fault ratio"]
    numerator, denominator = ratio.rsplit(" / ", 1)
    assert 'fault="server"' in numerator and "fault=" not in denominator, "server faults over all finished streams"
    (client,) = exprs["Client-caused endings by status"]
    assert 'fault="client"' in client and "by (method, code)" in client
    rule = next(
        r
        for g in yaml.safe_load((PROMETHEUS / "rules/agent.yml").read_text())["groups"]
        for r in g["rules"]
        if r.get("record") == "agent:stream_error_ratio:rate5m"
    )
    assert 'fault="server"' in rule["expr"] and "code=" not in rule["expr"]


def test_process_cpu_and_memory_of_the_agent_are_on_the_dashboard() -> None:
    exprs = " ".join(e for es in _agent_dashboard_exprs().values() for e in es)
    for metric in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert metric in exprs, metric
    source = (DEPLOY.parent / "services/agent/src/agent_service/telemetry/metrics.py").read_text()
    assert "ProcessCollector(registry=r)" in source


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_collector_pipelines_use_defined_components() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector/config.yaml").read_text())
    for name, pipeline in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in config[kind], f"{name}: {kind} {component} is not defined"
        assert pipeline["processors"][0] == "memory_limiter", "the memory limiter must come first"
        assert "batch" in pipeline["processors"]
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
