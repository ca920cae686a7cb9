"""k8s/: each overlay renders with kustomize, validates against the Kubernetes schemas, and has
the properties the service relies on (hardened pods, gRPC probes, drain timing, autoscaling,
network policies, no committed secret)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.config.stack import (
    OVERLAYS,
    REPO,
    agent_settings,
    container,
    dotenv,
    envoy_config,
    envoy_defaults,
    envoy_page_files,
    envoy_render_env,
    init_container,
    k8s_kinds,
    k8s_object,
    k8s_objects,
    k8s_settings,
    rendered_overlay,
    tool,
)

SERVICE_NAME = "agent.AgentService"
DEPLOYMENTS = ("agent", "envoy")
STATEFUL_SETS = ("redis",)
# Deployments of the monitoring component (prod uses it).
MONITORING = ("otel-collector",)


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


@pytest.mark.parametrize(
    ("overlay", "kind", "name"),
    [(o, "Deployment", d) for o in OVERLAYS for d in DEPLOYMENTS]
    + [(o, "StatefulSet", s) for o in OVERLAYS for s in STATEFUL_SETS]
    + [("prod", "Deployment", d) for d in MONITORING],
)
def test_pods_are_hardened(overlay: str, kind: str, name: str) -> None:
    pod = k8s_object(overlay, kind, name)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    account = k8s_object(overlay, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for item in pod["containers"] + pod.get("initContainers", []):
        context = item["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert set(item["resources"][bound]) == {"cpu", "memory"}, bound
        repository, _, tag = item["image"].rpartition(":")
        assert repository and tag and tag != "latest"
    for item in pod["containers"]:
        assert "readinessProbe" in item and "livenessProbe" in item
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
    drain = k8s_settings(overlay).shutdown_grace_s
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
    front_door = (8443,) if overlay == "prod" else (8080, 8443)  # prod: TLS only
    assert rules == {front_door: None, (9902,): [prometheus]}
    agent = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent"}}}
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policies["redis"]["ingress"]}
    assert rules == {(6379,): [agent]}


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


def test_prod_turns_reflection_off_and_tls_on_and_exposes_only_tls() -> None:
    assert k8s_settings("prod").reflection is False
    env = envoy_render_env("prod")
    assert env["ENVOY_TLS"] == "on"
    pod = k8s_object("prod", "Deployment", "envoy")["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "envoy-tls"
    mount = next(m for m in container("prod", "envoy")["volumeMounts"] if m["name"] == "tls")
    assert env["ENVOY_TLS_CERT"] == mount["mountPath"] + "/tls.crt"
    assert env["ENVOY_TLS_KEY"] == mount["mountPath"] + "/tls.key"
    # Only the TLS port is exposed: no plaintext door in production.
    ports = {p["name"]: p["port"] for p in k8s_object("prod", "Service", "envoy")["spec"]["ports"]}
    assert ports == {"grpc-tls": int(env.get("ENVOY_TLS_PORT", envoy_defaults()["ENVOY_TLS_PORT"]))}
    annotations = k8s_object("prod", "Deployment", "agent")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_dev_runs_one_demo_replica_with_reflection() -> None:
    settings = k8s_settings("dev")
    assert (settings.model_provider, settings.reflection) == ("demo", True)
    assert k8s_kinds("dev", "HorizontalPodAutoscaler") == []
    for name in DEPLOYMENTS:
        assert k8s_object("dev", "Deployment", name)["spec"]["replicas"] == 1
    assert "ENVOY_TLS" not in envoy_render_env("dev")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_config_is_rendered_by_render_py_from_the_deploy_envoy_files_themselves(overlay: str) -> None:
    """The ConfigMap is generated from deploy/envoy (no copy): its content is those files' bytes. The
    init container runs render.py from it (with the agent image's Python) into an emptyDir, and Envoy
    starts on that file."""
    config_map = k8s_object(overlay, "ConfigMap", "envoy-template")
    files = {name: value.encode() for name, value in config_map.get("data", {}).items()}
    files |= {name: base64.b64decode(value) for name, value in config_map.get("binaryData", {}).items()}
    assert files == {name: (REPO / "deploy" / "envoy" / name).read_bytes() for name in files}
    assert set(files) == {"envoy.yaml", "agent.pb", "render.py", "drain.sh"}
    pod = k8s_object(overlay, "Deployment", "envoy")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (template,) = [
        name for name, v in volumes.items() if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
    ]

    render = init_container(overlay, "envoy", "envoy-config")
    assert render["image"] == container(overlay, "agent")["image"], "the agent image has the Python render.py needs"
    mounts = {m["name"]: m["mountPath"] for m in render["volumeMounts"]}
    (rendered,) = set(mounts) - {template}
    assert "emptyDir" in volumes[rendered]
    out = mounts[rendered] + "/envoy.yaml"
    assert render["command"] == ["python", mounts[template] + "/render.py", "-o", out]

    envoy = container(overlay, "envoy")
    envoy_mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    assert envoy_mounts[rendered]["mountPath"] == mounts[rendered] and envoy_mounts[rendered]["readOnly"] is True
    assert envoy["command"] == ["envoy"] and envoy["args"][:2] == ["-c", out]
    descriptor = envoy_render_env(overlay).get("ENVOY_DESCRIPTOR_SET", "/etc/envoy/agent.pb")
    assert descriptor == envoy_mounts[template]["mountPath"] + "/agent.pb"


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
    assert mount["readOnly"] is True
    # The init container renders the template (its defaults, then its env); Envoy reads the files at start.
    render_env = envoy_render_env(overlay)
    assert {**envoy_defaults(), **render_env}["ENVOY_WEB_ROOT"] == mount["mountPath"]
    assert volume["name"] not in {m["name"] for m in init_container(overlay, "envoy", "envoy-config")["volumeMounts"]}
    served = envoy_page_files(envoy_config(render_env))
    assert served and set(served.values()) == {f"{mount['mountPath']}/{path}" for path in items.values()}


def test_every_object_lands_in_the_agent_namespace() -> None:
    for overlay in OVERLAYS:
        for obj in k8s_objects(overlay):
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "agent", obj["metadata"]["name"]


def test_the_monitoring_component_ships_the_collector_and_points_the_traces_at_it() -> None:
    """prod uses k8s/components/monitoring: the collector of deploy/otel-collector/config.yaml runs in
    the namespace, the agent exports to it and Envoy's default collector host is its Service."""
    config_map = k8s_object("prod", "ConfigMap", "otel-collector-config")
    assert config_map["data"] == {"config.yaml": (REPO / "deploy/otel-collector/config.yaml").read_text()}
    pod = k8s_object("prod", "Deployment", "otel-collector")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    collector = container("prod", "otel-collector")
    (mount,) = collector["volumeMounts"]
    assert collector["args"] == [f"--config={mount['mountPath']}/config.yaml"]
    assert {e["name"] for e in collector["env"]} == {"TRACES_OTLP_ENDPOINT"}
    assert collector["readinessProbe"]["httpGet"]["port"] == "health"
    assert collector["image"] == dotenv()["OTEL_COLLECTOR_IMAGE"], "the image compose runs"
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert ports["health"] == 13133 and ports["otlp-grpc"] == 4317
    service = k8s_object("prod", "Service", "otel-collector")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"otlp-grpc": 4317, "otlp-http": 4318}

    assert k8s_settings("prod").model_provider  # the ConfigMap still parses
    endpoint = agent_settings("prod")["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == f"http://{service['metadata']['name']}:4317"
    assert envoy_defaults()["ENVOY_OTEL_HOST"] == service["metadata"]["name"]
    assert "ENVOY_OTEL_HOST" not in envoy_render_env("prod")

    policy = next(p for p in k8s_kinds("prod", "NetworkPolicy") if p["metadata"]["name"] == "otel-collector")["spec"]
    (rule,) = policy["ingress"]
    senders = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]}
    assert senders == {"agent", "envoy"} and {p["port"] for p in rule["ports"]} == {4317, 4318}


def test_without_the_monitoring_component_nothing_exports_traces() -> None:
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in agent_settings("dev")
    assert [d for d in k8s_kinds("dev", "Deployment") if d["metadata"]["name"] == "otel-collector"] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_conversations_live_in_the_redis_stateful_set_not_on_the_agent_pods(overlay: str) -> None:
    url = urlsplit(k8s_settings(overlay).session_store)
    service = k8s_object(overlay, "Service", url.hostname or "")["spec"]
    assert url.scheme == "redis" and service["clusterIP"] == "None"
    assert [p["port"] for p in service["ports"]] == [url.port]
    redis = k8s_object(overlay, "StatefulSet", "redis")["spec"]
    assert redis["serviceName"] == url.hostname and service["selector"] == redis["selector"]["matchLabels"]
    (claim,) = redis["volumeClaimTemplates"]
    (server,) = redis["template"]["spec"]["containers"]
    assert {m["name"]: m["mountPath"] for m in server["volumeMounts"]} == {claim["metadata"]["name"]: "/data"}
    args = server["args"]
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert args[0] == "redis-server" and option["--appendonly"] == "yes"
    assert option["--maxmemory-policy"] == "noeviction"
    assert "PONG" in " ".join(server["readinessProbe"]["exec"]["command"])
    assert server["image"] == dotenv()["REDIS_IMAGE"]
    # The agent keeps nothing on pod-local disk but /tmp.
    agent = container(overlay, "agent")
    assert [m["mountPath"] for m in agent["volumeMounts"]] == ["/tmp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_drains_before_it_stops(overlay: str) -> None:
    """preStop drain.sh (from the template ConfigMap), Envoy's drain flags, and a grace that covers the script."""
    pod = k8s_object(overlay, "Deployment", "envoy")["spec"]["template"]["spec"]
    envoy = container(overlay, "envoy")
    command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    template = next(m["mountPath"] for m in envoy["volumeMounts"] if m["name"] == "template")
    assert command == ["bash", f"{template}/drain.sh"]
    drain = (REPO / "deploy/envoy/drain.sh").read_text()
    min_s = int(re.search(r"min_s=\$\{DRAIN_MIN_S:-(\d+)\}", drain).group(1))  # type: ignore[union-attr]
    max_s = int(re.search(r"max_s=\$\{DRAIN_MAX_S:-(\d+)\}", drain).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] >= min_s + max_s + 2
    args = envoy["args"]
    assert args[args.index("--drain-strategy") + 1] == "immediate"
    assert int(args[args.index("--drain-time-s") + 1]) > min_s, "new connections are served while endpoints update"


def test_the_managed_redis_component_takes_the_url_from_a_secret_and_drops_the_stateful_set() -> None:
    """prod with k8s/components/managed-redis, as the README shows (a kustomization referring to both)."""
    overlay = Path(tempfile.mkdtemp(prefix=".image-overlay.", dir=REPO / "k8s"))  # git-ignored, like make k8s-manifests
    try:
        (overlay / "kustomization.yaml").write_text(
            "resources:\n  - ../overlays/prod\ncomponents:\n  - ../components/managed-redis\n"
        )
        result = subprocess.run(
            [tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(overlay)
    assert result.returncode == 0, result.stderr
    assert validate(result.stdout).returncode == 0
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert not [o for o in objects if o["metadata"]["name"] == "redis"], "the in-cluster Redis is gone"
    (agent,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "agent"]
    (server,) = agent["spec"]["template"]["spec"]["containers"]
    (store,) = [e for e in server["env"] if e["name"] == "AGENT_SESSION_STORE"]
    assert store["valueFrom"] == {"secretKeyRef": {"name": "agent-session-store", "key": "url"}}


def test_prod_runs_with_auth_on_at_envoy_and_the_agent_for_one_identity_provider() -> None:
    settings = k8s_settings("prod")
    envoy = {**envoy_defaults(), **envoy_render_env("prod")}
    assert settings.auth is True and envoy["ENVOY_AUTH"] == "on"
    assert settings.jwt_issuer == envoy["ENVOY_JWT_ISSUER"]
    assert settings.jwt_audiences == envoy["ENVOY_JWT_AUDIENCES"]
    assert settings.jwks_uri == envoy["ENVOY_JWKS_URI"] and settings.jwks_uri.startswith("https://")
    assert settings.reflection is False
    for overlay in ("base", "dev"):  # dev (and the base) stay open: nothing to sign tokens in a dev cluster
        assert envoy_render_env(overlay).get("ENVOY_AUTH") is None
