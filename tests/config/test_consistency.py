"""Every port, service name and path agrees across docker compose (.env), k8s/, the Envoy template
(rendered by render.py with each environment's variables, as its containers do), the service's
own settings, and the Prometheus, Grafana and OpenTelemetry collector configurations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent_service.server import SERVICE_NAME
from agent_service.settings import Settings
from tests.config.stack import (
    OVERLAYS,
    REPO,
    compose_envoy_render_env,
    compose_model,
    compose_settings,
    container,
    container_ports,
    dotenv,
    envoy_cluster_address,
    envoy_config,
    envoy_defaults,
    envoy_listeners,
    envoy_render_env,
    k8s_object,
    k8s_settings,
    load_yaml,
)


def port(value: Any) -> int:
    return int(value)


def services() -> dict[str, Any]:
    services: dict[str, Any] = compose_model()["services"]
    return services


def compose_envoy() -> dict[str, Any]:
    """Envoy's config as compose's one-shot `envoy-config` renders it."""
    return envoy_config(compose_envoy_render_env())


def k8s_envoy(overlay: str) -> dict[str, Any]:
    """Envoy's config as the k8s init container renders it."""
    return envoy_config(envoy_render_env(overlay))


def host_port(address: str) -> tuple[str, int]:
    host, _, number = address.rpartition(":")
    return host, int(number)


def scrape_targets() -> dict[str, tuple[str, int, str]]:
    """Prometheus jobs → (host, port, metrics path)."""
    config = load_yaml("deploy/prometheus/prometheus.yml")
    targets = {}
    for job in config["scrape_configs"]:
        (target,) = [t for group in job["static_configs"] for t in group["targets"]]
        targets[job["job_name"]] = (*host_port(target), job.get("metrics_path", "/metrics"))
    return targets


# --- the agent's gRPC port -------------------------------------------------------------------


def test_agent_grpc_port_agrees_everywhere() -> None:
    expected = Settings.model_fields["grpc_port"].default
    assert compose_settings().grpc_port == expected
    assert envoy_cluster_address(compose_envoy(), "agent") == ("agent", expected)
    assert port(envoy_defaults()["ENVOY_AGENT_PORT"]) == expected
    for overlay in OVERLAYS:
        assert k8s_settings(overlay).grpc_port == expected
        assert container_ports(overlay, "agent")["grpc"] == expected
        assert k8s_object(overlay, "Service", "agent")["spec"]["ports"][0]["port"] == expected
        assert envoy_cluster_address(k8s_envoy(overlay), "agent") == ("agent", expected)
        assert container(overlay, "agent")["readinessProbe"]["grpc"]["port"] == expected


def test_the_agent_is_found_by_the_same_name_everywhere() -> None:
    """compose service `agent` = k8s headless Service `agent` = the Envoy cluster's DNS name."""
    assert "agent" in services()
    assert envoy_defaults()["ENVOY_AGENT_HOST"] == "agent"
    for overlay in OVERLAYS:
        assert k8s_object(overlay, "Service", "agent")["spec"]["clusterIP"] == "None"
        assert envoy_cluster_address(k8s_envoy(overlay), "agent")[0] == "agent"


def test_health_checks_ask_for_the_agent_service() -> None:
    assert SERVICE_NAME == "agent.AgentService"
    (cluster,) = [c for c in compose_envoy()["static_resources"]["clusters"] if c["name"] == "agent"]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAME
    for overlay in OVERLAYS:
        assert container(overlay, "agent")["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


# --- metrics ---------------------------------------------------------------------------------


def test_agent_metrics_port_and_path_agree_everywhere() -> None:
    expected = Settings.model_fields["metrics_port"].default
    assert compose_settings().metrics_port == expected
    assert scrape_targets()["agent"] == ("agent", expected, "/metrics")
    annotations = k8s_object("prod", "Deployment", "agent")["spec"]["template"]["metadata"]["annotations"]
    assert (port(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (expected, "/metrics")
    for overlay in OVERLAYS:
        assert k8s_settings(overlay).metrics_port == expected
        assert container_ports(overlay, "agent")["metrics"] == expected


def test_envoy_metrics_listener_agrees_everywhere() -> None:
    """Prometheus scrapes Envoy's read-only metrics listener; the admin itself stays on loopback."""
    expected = port(envoy_defaults()["ENVOY_METRICS_PORT"])
    config = compose_envoy()
    assert envoy_listeners(config)["metrics"] == expected
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    routes = config["static_resources"]["listeners"][-1]["filter_chains"][0]["filters"][0]["typed_config"]
    paths = [r["match"].get("path") for r in routes["route_config"]["virtual_hosts"][0]["routes"]]
    assert "/stats/prometheus" in paths and "/ready" in paths
    assert scrape_targets()["envoy"] == ("envoy", expected, "/stats/prometheus")
    annotations = k8s_object("prod", "Deployment", "envoy")["spec"]["template"]["metadata"]["annotations"]
    assert (port(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (
        expected,
        "/stats/prometheus",
    )
    for overlay in OVERLAYS:
        assert envoy_listeners(k8s_envoy(overlay))["metrics"] == expected
        assert container_ports(overlay, "envoy")["metrics"] == expected
        assert container(overlay, "envoy")["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}


def test_envoy_admin_port_agrees_with_the_compose_healthcheck() -> None:
    admin = compose_envoy()["admin"]["address"]["socket_address"]["port_value"]
    assert admin == port(envoy_defaults()["ENVOY_ADMIN_PORT"])
    assert f"/dev/tcp/127.0.0.1/{admin}" in services()["envoy"]["healthcheck"]["test"][-1]


# --- the front door --------------------------------------------------------------------------


def test_front_door_port_agrees_everywhere() -> None:
    expected = port(envoy_defaults()["ENVOY_GRPC_PORT"])
    assert envoy_listeners(compose_envoy())["front_door"] == expected
    assert [p["target"] for p in services()["envoy"]["ports"]] == [expected]
    for overlay in OVERLAYS:
        assert envoy_listeners(k8s_envoy(overlay))["front_door"] == expected
        assert container_ports(overlay, "envoy")["grpc"] == expected
        ports = {p["name"]: p["port"] for p in k8s_object(overlay, "Service", "envoy")["spec"]["ports"]}
        assert ports.get("grpc", expected) == expected  # prod's Service exposes the TLS port only


def test_tls_listener_exists_in_prod_only_and_uses_the_mounted_secret() -> None:
    expected = port(envoy_defaults()["ENVOY_TLS_PORT"])
    assert "front_door_tls" not in envoy_listeners(compose_envoy())
    assert "front_door_tls" not in envoy_listeners(k8s_envoy("dev"))
    prod = k8s_envoy("prod")
    assert envoy_listeners(prod)["front_door_tls"] == expected == container_ports("prod", "envoy")["grpc-tls"]
    (tls,) = [listener for listener in prod["static_resources"]["listeners"] if listener["name"] == "front_door_tls"]
    context = tls["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    certificate = context["tls_certificates"][0]
    env = envoy_render_env("prod")
    assert certificate["certificate_chain"]["filename"] == env["ENVOY_TLS_CERT"]
    assert certificate["private_key"]["filename"] == env["ENVOY_TLS_KEY"]


# --- the model, traces, dashboards ---------------------------------------------------------------


def test_the_agent_reaches_the_model_service() -> None:
    model_port = port(dotenv()["MODEL_PORT"])
    url = urlsplit(services()["agent"]["environment"]["AGENT_LOCAL_BASE_URL"])
    assert (url.hostname, url.port) == ("model", model_port)
    assert port(services()["model"]["environment"]["MODEL_PORT"]) == model_port
    assert services()["model"]["environment"]["MODEL_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{model_port}/health" in " ".join(services()["model"]["healthcheck"]["test"])


def test_traces_go_to_the_collector_and_on_to_jaeger() -> None:
    collector = load_yaml("deploy/otel-collector/config.yaml")
    receiver_port = host_port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    assert receiver_port == port(envoy_defaults()["ENVOY_OTEL_PORT"])
    url = urlsplit(services()["agent"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (url.hostname, url.port) == ("otel-collector", receiver_port)
    assert envoy_cluster_address(compose_envoy(), "otel_collector") == ("otel-collector", receiver_port)
    assert "otel-collector" in services()
    exporters = [e for name, e in collector["exporters"].items() if name.startswith("otlp")]
    # `${env:TRACES_OTLP_ENDPOINT:-jaeger:4317}`: compose sets no TRACES_OTLP_ENDPOINT, so Jaeger.
    defaults = [re.fullmatch(r"\$\{env:TRACES_OTLP_ENDPOINT:-(.+)\}", e["endpoint"]) for e in exporters]
    assert any(d and host_port(d.group(1)) == ("jaeger", 4317) for d in defaults)
    assert "TRACES_OTLP_ENDPOINT" not in (services()["otel-collector"].get("environment") or {})
    assert "jaeger" in services()
    mount = {v["target"]: v["source"] for v in services()["otel-collector"]["volumes"]}
    config_arg = next(a for a in services()["otel-collector"]["command"] if a.startswith("--config="))
    assert mount[config_arg.removeprefix("--config=")] == str(REPO / "deploy/otel-collector/config.yaml")


def test_grafana_finds_prometheus_jaeger_and_the_dashboards() -> None:
    datasources = {
        d["uid"]: urlsplit(d["url"])
        for d in load_yaml("deploy/grafana/provisioning/datasources/datasources.yml")["datasources"]
    }
    assert (datasources["prometheus"].hostname, datasources["prometheus"].port) == (
        "prometheus",
        port(dotenv()["PROMETHEUS_PORT"]),
    )
    assert (datasources["jaeger"].hostname, datasources["jaeger"].port) == ("jaeger", port(dotenv()["JAEGER_UI_PORT"]))
    mounts = {v["target"]: v["source"] for v in services()["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == str(REPO / "deploy/grafana/provisioning")
    (provider,) = load_yaml("deploy/grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert mounts[provider["options"]["path"]] == str(REPO / "deploy/grafana/dashboards")
    assert list((REPO / "deploy/grafana/dashboards").glob("*.json"))


def test_prometheus_loads_its_rules_from_the_mounted_directory() -> None:
    prometheus = services()["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"] if v["type"] == "bind"}
    config_file = next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    assert mounts[config_file] == str(REPO / "deploy/prometheus/prometheus.yml")
    config_dir = config_file.rsplit("/", 1)[0]
    for pattern in load_yaml("deploy/prometheus/prometheus.yml")["rule_files"]:
        directory, _, glob = f"{config_dir}/{pattern}".rpartition("/")
        assert directory in mounts, pattern
        assert list(REPO.joinpath(mounts[directory]).glob(glob)), pattern
    assert scrape_targets()["prometheus"][1] == port(dotenv()["PROMETHEUS_PORT"])
    assert any(a == f"--web.listen-address=:{dotenv()['PROMETHEUS_PORT']}" for a in prometheus["command"])


def _export_targets() -> dict[str, str]:
    """Where telemetry is sent, by who sends it: each must be a compose service."""
    collector = load_yaml("deploy/otel-collector/config.yaml")["exporters"]["otlp/jaeger"]["endpoint"]
    collector_default = collector.rsplit(":-", 1)[1].rstrip("}") if ":-" in collector else collector
    agent_endpoint = services()["agent"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    return {
        "agent traces": urlsplit(agent_endpoint).hostname or "",
        "envoy traces": envoy_defaults()["ENVOY_OTEL_HOST"],
        "collector export": collector_default.split(":")[0],
        **{f"scrape {job}": host for job, (host, _, _) in scrape_targets().items() if host != "localhost"},
    }


@pytest.mark.parametrize("sender", ["agent traces", "envoy traces", "collector export", "scrape agent", "scrape envoy"])
def test_every_scrape_and_export_target_is_a_compose_service(sender: str) -> None:
    target = _export_targets()[sender]
    assert target in services(), f"{sender} goes to {target!r}, which compose does not run"


# --- images, bind mounts, shutdown ---------------------------------------------------------------


def test_image_tags_agree_between_env_and_kustomize() -> None:
    env = dotenv()
    expected = {
        "agent": f"{env['AGENT_IMAGE']}:{env['AGENT_IMAGE_TAG']}",
        "envoy": env["ENVOY_IMAGE"],
    }
    for overlay in OVERLAYS:
        for deployment, image in expected.items():
            assert container(overlay, deployment)["image"] == image
    assert services()["agent"]["image"] == expected["agent"]
    assert services()["envoy"]["image"] == expected["envoy"]
    for overlay in OVERLAYS:
        (redis,) = k8s_object(overlay, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
        assert redis["image"] == env["REDIS_IMAGE"] == services()["redis"]["image"]


# Made by `make up` before compose starts (deploy/local/dev_identity.py), git-ignored.
MADE_AT_UP = REPO / "dev-identity"


def test_every_bind_mount_source_exists() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and not Path(volume["source"]).is_relative_to(MADE_AT_UP):
                assert REPO.joinpath(volume["source"]).exists(), f"{name}: {volume['source']} is missing"


def test_compose_stops_the_agent_after_its_drain_grace() -> None:
    grace = compose_settings().shutdown_grace_s
    stop = dotenv()["AGENT_STOP_GRACE_PERIOD"]
    assert stop.endswith("s") and float(stop[:-1]) >= grace + 2
    for overlay in OVERLAYS:
        assert k8s_settings(overlay).shutdown_grace_s == grace


def test_the_autoscaler_metric_is_one_the_agent_exports() -> None:
    (pods_metric,) = [
        m["pods"]["metric"]["name"]
        for m in k8s_object("prod", "HorizontalPodAutoscaler", "agent")["spec"]["metrics"]
        if m["type"] == "Pods"
    ]
    source = (REPO / "services/agent/src/agent_service/telemetry/metrics.py").read_text()
    assert f'"{pods_metric}"' in source, f"{pods_metric} is not a metric of the agent"
