"""k8s/: each overlay renders with kustomize, validates against the Kubernetes schemas, and has
the properties the service relies on (hardened pods, gRPC probes, drain timing, autoscaling,
network policies, no committed secret)."""

from __future__ import annotations

import base64
import subprocess

import pytest

from tests.config.stack import (
    OVERLAYS,
    REPO,
    agent_settings,
    container,
    container_env,
    envoy_config,
    envoy_page_files,
    k8s_kinds,
    k8s_object,
    k8s_objects,
    rendered_overlay,
    tool,
)

SERVICE_NAME = "agent.AgentService"
DEPLOYMENTS = ("agent", "envoy")


def validate(manifests: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-"],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    result = validate(rendered_overlay(overlay))
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_fails_on_an_invalid_manifest() -> None:
    """The check above can fail: an unknown field is an error in --strict mode."""
    broken = rendered_overlay("dev").replace("terminationGracePeriodSeconds:", "terminationGraceSeconds:", 1)
    result = validate(broken)
    assert result.returncode != 0
    assert "terminationGraceSeconds" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_pods_are_hardened(overlay: str, deployment: str) -> None:
    pod = k8s_object(overlay, "Deployment", deployment)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    account = k8s_object(overlay, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for item in pod["containers"]:
        context = item["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert set(item["resources"][bound]) == {"cpu", "memory"}, bound
        assert "readinessProbe" in item and "livenessProbe" in item
        repository, _, tag = item["image"].rpartition(":")
        assert repository and tag and tag != "latest"
    namespace = k8s_object(overlay, "Namespace", "agent")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_uses_native_grpc_probes(overlay: str) -> None:
    agent = container(overlay, "agent")
    assert agent["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE_NAME}
    assert agent["livenessProbe"]["grpc"]["port"] == 50051
    assert agent["startupProbe"]["grpc"]["port"] == 50051


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_prestop_and_the_drain(overlay: str) -> None:
    pod = k8s_object(overlay, "Deployment", "agent")["spec"]["template"]["spec"]
    pre_stop = container(overlay, "agent")["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(agent_settings(overlay)["AGENT_SHUTDOWN_GRACE_S"])
    assert pre_stop >= 1
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_service_is_headless_with_a_grpc_port(overlay: str) -> None:
    service = k8s_object(overlay, "Service", "agent")["spec"]
    assert service["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in service["ports"]] == [("grpc", 50051)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_an_optional_secret_reference_only(overlay: str) -> None:
    assert k8s_kinds(overlay, "Secret") == []
    sources = container(overlay, "agent")["envFrom"]
    assert {"secretRef": {"name": "agent-provider-credentials", "optional": True}} in sources
    assert any(source.get("configMapRef", {}).get("name", "").startswith("agent-settings-") for source in sources)
    secret_like = ("KEY", "SECRET", "TOKEN", "PASSWORD")
    for config_map in k8s_kinds(overlay, "ConfigMap"):
        assert not [key for key in config_map.get("data", {}) if any(word in key for word in secret_like)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_envoy_reach_grpc_and_only_prometheus_reach_metrics(overlay: str) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in k8s_kinds(overlay, "NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    envoy = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}}
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policies["agent"]["ingress"]}
    assert rules == {(50051,): [envoy], (9464,): [prometheus]}
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policies["envoy"]["ingress"]}
    assert rules == {(8080, 8443): None, (9902,): [prometheus]}


def test_prod_scales_on_cpu_and_streams_in_flight_and_keeps_three_replicas() -> None:
    hpa = k8s_object("prod", "HorizontalPodAutoscaler", "agent")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "agent"}
    assert hpa["minReplicas"] >= 3 and hpa["maxReplicas"] > hpa["minReplicas"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "agent_streams_in_flight"
    for name in DEPLOYMENTS:
        assert k8s_object("prod", "Deployment", name)["spec"]["replicas"] >= 3
        assert k8s_object("prod", "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1


def test_prod_turns_reflection_off_and_tls_on() -> None:
    assert agent_settings("prod")["AGENT_REFLECTION"] == "false"
    env = container_env("prod", "envoy")
    assert env["ENVOY_TLS"] == "on"
    pod = k8s_object("prod", "Deployment", "envoy")["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "envoy-tls"
    mount = next(m for m in container("prod", "envoy")["volumeMounts"] if m["name"] == "tls")
    assert env["ENVOY_TLS_CERT"] == mount["mountPath"] + "/tls.crt"
    assert env["ENVOY_TLS_KEY"] == mount["mountPath"] + "/tls.key"
    ports = {p["name"]: p["port"] for p in k8s_object("prod", "Service", "envoy")["spec"]["ports"]}
    assert ports == {"grpc": 8080, "grpc-tls": int(env["ENVOY_TLS_PORT"])}
    annotations = k8s_object("prod", "Deployment", "agent")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_dev_runs_one_demo_replica_with_reflection() -> None:
    settings = agent_settings("dev")
    assert (settings["AGENT_MODEL_PROVIDER"], settings["AGENT_REFLECTION"]) == ("demo", "true")
    assert k8s_kinds("dev", "HorizontalPodAutoscaler") == []
    for name in DEPLOYMENTS:
        assert k8s_object("dev", "Deployment", name)["spec"]["replicas"] == 1
    assert "ENVOY_TLS" not in container_env("dev", "envoy")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_mounts_the_deploy_envoy_files_themselves(overlay: str) -> None:
    """The ConfigMap is generated from deploy/envoy (no copy): its content is those files' bytes."""
    config_map = k8s_object(overlay, "ConfigMap", "envoy-template")
    files = {name: value.encode() for name, value in config_map.get("data", {}).items()}
    files |= {name: base64.b64decode(value) for name, value in config_map.get("binaryData", {}).items()}
    assert files == {name: (REPO / "deploy" / "envoy" / name).read_bytes() for name in files}
    assert {"envoy.yaml", "agent.pb", "docker-entrypoint.sh"} <= set(files)
    volume = next(
        v for v in k8s_object(overlay, "Deployment", "envoy")["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    )
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    env = container_env(overlay, "envoy")
    mount = next(m for m in container(overlay, "envoy")["volumeMounts"] if m["name"] == volume["name"])
    assert env["ENVOY_TEMPLATE"] == mount["mountPath"] + "/envoy.yaml"
    assert env["ENVOY_DESCRIPTOR_SET"] == mount["mountPath"] + "/agent.pb"
    assert container(overlay, "envoy")["command"] == ["sh", mount["mountPath"] + "/docker-entrypoint.sh"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_mounts_the_chat_page_files_themselves_where_the_template_reads_them(overlay: str) -> None:
    """ConfigMap `envoy-web` holds deploy/web's files, mounted back in the repository's layout."""
    config_map = k8s_object(overlay, "ConfigMap", "envoy-web")
    files = {name: value.encode() for name, value in config_map.get("data", {}).items()}
    files |= {name: base64.b64decode(value) for name, value in config_map.get("binaryData", {}).items()}
    pod = k8s_object(overlay, "Deployment", "envoy")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    items = {item["key"]: item["path"] for item in volume["configMap"]["items"]}
    assert set(items) == set(files)
    for key, path in items.items():
        assert files[key] == (REPO / "deploy" / "web" / path).read_bytes(), path
    (mount,) = [m for m in container(overlay, "envoy")["volumeMounts"] if m["name"] == volume["name"]]
    env = container_env(overlay, "envoy")
    assert env["ENVOY_WEB_ROOT"] == mount["mountPath"]
    served = envoy_page_files(envoy_config(env))
    assert served and set(served.values()) == {f"{mount['mountPath']}/{path}" for path in items.values()}


def test_every_object_lands_in_the_agent_namespace() -> None:
    for overlay in OVERLAYS:
        for obj in k8s_objects(overlay):
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "agent", obj["metadata"]["name"]
