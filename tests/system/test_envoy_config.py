"""The one Envoy template and its one renderer: how render.py renders, that the commands compose and
Kubernetes run (render.py in the agent image) produce a config Envoy accepts, that Envoy accepts
every variant, and that the settings that keep streams alive are there."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.envoy import render
from tests.config.stack import compose_model, container, envoy_render_env, init_container, k8s_object
from tests.support.scripts import dev_identity
from tests.system.front_door import REPO, envoy_command, render_config, self_signed_cert


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (item,) = [i for i in items if i["name"] == name]
    return item


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        envoy_command(config, "--mode", "validate", "--log-level", "warn"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_like_a_container(command: list[str], env: dict[str, str], mounts: dict[str, Path]) -> None:
    """Run a container's render command here: the same render.py and environment, the command's paths mapped."""

    def local(value: str) -> str:
        for target, source in mounts.items():
            if value == target or value.startswith(target + "/"):
                return str(source) + value[len(target) :]
        return value

    assert command[0] == "python"
    environ = {"PATH": os.environ["PATH"], **env}
    result = subprocess.run(
        [sys.executable, *map(local, command[1:])], env=environ, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# Variables whose empty default means "not used" (the meaning says what then).
EMPTY_BY_DEFAULT = {"ENVOY_JWT_ISSUER", "ENVOY_JWT_AUDIENCES", "ENVOY_JWKS_URI", "ENVOY_CORS_ORIGINS"}
# Variables the template reads only through a value render.py derives from them (a list).
READ_THROUGH_DERIVED = {"ENVOY_JWT_AUDIENCES", "ENVOY_CORS_ORIGINS"}


def test_every_placeholder_is_declared_with_a_default_and_a_meaning() -> None:
    text = render.TEMPLATE.read_text()
    declared = render.variables(text)
    derived = render.derived_names(text)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    used |= set(re.findall(r"^# @if ([A-Za-z_][A-Za-z0-9_]*)", text, flags=re.MULTILINE))
    assert used | READ_THROUGH_DERIVED == set(declared) | set(derived), "placeholders and declarations differ"
    assert set(derived) <= set(render.DERIVED) and all(derived.values())
    assert all(var.meaning for var in declared.values())
    assert {name for name, var in declared.items() if not var.default} == EMPTY_BY_DEFAULT
    for variant in ({"ENVOY_TLS": "on"}, {"ENVOY_AUTH": "on"}, {"ENVOY_AUTH": "on", "ENVOY_JWKS_URI": "https://idp/k"}):
        assert "${" not in render.render(variant, environ={})


def test_derived_values_follow_the_variables() -> None:
    def rendered(**values: str) -> dict[str, Any]:
        return yaml.safe_load(render.render(values, environ={}))

    default = rendered()
    filters = [f["name"] for f in hcm_of(default)["http_filters"]]
    assert "envoy.filters.http.jwt_authn" not in filters and "jwks" not in names(
        default["static_resources"]["clusters"]
    )
    cors = hcm_of(default)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == []

    config = rendered(
        ENVOY_AUTH="on",
        ENVOY_JWT_AUDIENCES="agent-service, other",
        ENVOY_CORS_ORIGINS="https://app.example.com,http://localhost:5173",
    )
    provider = by_name(hcm_of(config)["http_filters"], "envoy.filters.http.jwt_authn")["typed_config"]["providers"][
        "idp"
    ]
    assert provider["audiences"] == ["agent-service", "other"]
    assert provider["local_jwks"] == {"filename": "/etc/jwks/jwks.json"} and "remote_jwks" not in provider
    cors = hcm_of(config)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == [
        {"exact": "https://app.example.com"},
        {"exact": "http://localhost:5173"},
    ]

    config = rendered(ENVOY_AUTH="on", ENVOY_JWKS_URI="https://idp.example.com:8443/keys")
    provider = by_name(hcm_of(config)["http_filters"], "envoy.filters.http.jwt_authn")["typed_config"]["providers"][
        "idp"
    ]
    assert provider["remote_jwks"]["http_uri"] == {
        "uri": "https://idp.example.com:8443/keys",
        "cluster": "jwks",
        "timeout": "5s",
    }
    assert "local_jwks" not in provider
    jwks = by_name(config["static_resources"]["clusters"], "jwks")
    address = jwks["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "idp.example.com", "port_value": 8443}
    assert jwks["transport_socket"]["typed_config"]["sni"] == "idp.example.com"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ENVOY_AUTH": "on", "ENVOY_JWKS_URI": "http://idp.example.com/keys"}, "https://"),
        ({"ENVOY_CORS_ORIGINS": "https://app.example.com/path"}, "not an origin"),
        ({"ENVOY_CORS_ORIGINS": "*"}, "not an origin"),
    ],
)
def test_bad_values_of_derived_variables_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(render.RenderError, match=message):
        render.render(values, environ={})


def hcm_of(config: dict[str, Any]) -> dict[str, Any]:
    front: dict[str, Any] = by_name(config["static_resources"]["listeners"], "front_door")
    return front["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def names(items: list[dict[str, Any]]) -> list[str]:
    return [item["name"] for item in items]


def test_precedence_is_argument_then_environment_then_default() -> None:
    template = "# @var A=1 | a\n# @var B=2 | b\n# @var C=3 | c\nx: [${A}, ${B}, ${C}]  # ${A}\n"
    assert render.render({"A": "arg"}, environ={"A": "env", "B": "env"}, template_text=template) == (
        "# @var A=1 | a\n# @var B=2 | b\n# @var C=3 | c\nx: [arg, env, 3]  # arg\n"
    )


def test_a_condition_keeps_its_block_or_the_else_block() -> None:
    template = "# @var A=on | a\n# @if A\nx: 1\n# @else\nx: 2\n# @endif\ny: 3\n"
    kept = [line for line in render.render({}, environ={}, template_text=template).splitlines() if line[0] != "#"]
    assert kept == ["x: 1", "y: 3"]
    kept = [
        line for line in render.render({"A": "off"}, environ={}, template_text=template).splitlines() if line[0] != "#"
    ]
    assert kept == ["x: 2", "y: 3"]


@pytest.mark.parametrize(
    "template",
    [
        "x: ${NOPE}\n",
        "# @var A=1 | a\n# @if NOPE\nx: 1\n# @endif\n",
        "# @var A=1 | a\n# @if A\n# @if A\n# @endif\n# @endif\n",
        "# @var A=1 | a\n# @if A\nx: 1\n",
        "# @var A=1 | a\n# @else\nx: 1\n",
    ],
    ids=["placeholder", "condition", "nested", "unclosed", "else-alone"],
)
def test_undeclared_names_and_unbalanced_conditions_are_errors(tmp_path: Path, template: str) -> None:
    with pytest.raises(render.RenderError):
        render.render({}, environ={}, template_text=template)
    if "NOPE" not in template:
        return
    (tmp_path / "t.yaml").write_text(template)
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy/envoy/render.py"), "--template", str(tmp_path / "t.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "NOPE" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_template_or_unwritable_output_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    for args in (["--template", str(tmp_path / "missing.yaml")], ["-o", str(tmp_path / "no-such-dir" / "envoy.yaml")]):
        result = subprocess.run(
            [sys.executable, str(REPO / "deploy/envoy/render.py"), *args], capture_output=True, text=True, check=False
        )
        assert result.returncode == 2 and result.stderr.startswith("render.py: ") and "Traceback" not in result.stderr


def test_multi_line_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(render.RenderError):
        render.render({"ENVOY_AGENT_HOST": "agent\nadmin: {}"}, environ={})
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy/envoy/render.py"), "-o", str(tmp_path / "out.yaml")],
        env={"PATH": os.environ["PATH"], "ENVOY_AGENT_HOST": "agent\nadmin: {}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "ENVOY_AGENT_HOST" in result.stderr and not (tmp_path / "out.yaml").exists()


def as_seen_by_envoy(text: str, mounts: Mapping[str, Path]) -> str:
    """A rendered config with the paths of Envoy's container mounts mapped to their files here."""
    for target, source in sorted(mounts.items(), key=lambda item: -len(item[0])):  # files before directories
        if source.suffix:
            text = text.replace(target, str(source))
        else:
            text = text.replace(target.rstrip("/") + "/", str(source) + "/")
    return text


def test_compose_renders_with_render_py_a_config_envoy_accepts(tmp_path: Path) -> None:
    """compose's one-shot `envoy-config` command, run here with its environment and mounts mapped;
    Envoy then validates it with its own mounts (the descriptor set, the chat page) mapped."""
    services = compose_model()["services"]
    one_shot = services["envoy-config"]
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    mounts = {v["target"]: Path(v["source"]) for v in one_shot["volumes"] if v["type"] == "bind"}
    (volume,) = [v["target"] for v in one_shot["volumes"] if v["type"] == "volume"]
    mounts[volume] = rendered
    run_like_a_container(one_shot["command"], one_shot.get("environment") or {}, mounts)
    config = rendered / "envoy.yaml"
    assert config.read_text() == render.render({}, environ=one_shot.get("environment") or {})
    # Envoy reads what it was told to, and the files its config names where the envoy service mounts them.
    envoy = services["envoy"]
    assert envoy["command"][:2] == ["-c", f"{volume}/envoy.yaml"]
    envoy_mounts = {v["target"]: Path(v["source"]) for v in envoy["volumes"] if v["type"] == "bind"}
    assert envoy_mounts[render.variables()["ENVOY_WEB_ROOT"].default] == render.WEB_ROOT
    # The JWKS `make up` writes (deploy/local/dev_identity.py), made here.
    jwks_target = render.variables()["ENVOY_JWKS_FILE"].default
    assert envoy_mounts[jwks_target] == REPO / "dev-identity" / "jwks.json"
    envoy_mounts[jwks_target] = dev_identity().ensure(tmp_path / "dev-identity").jwks
    local = tmp_path / "local.yaml"
    local.write_text(as_seen_by_envoy(config.read_text(), envoy_mounts))
    result = validate(local)
    assert result.returncode == 0, result.stderr
    assert str(render.WEB_ROOT / "index.html") in local.read_text()


def config_map_files(overlay: str, volume: dict[str, Any], directory: Path) -> Path:
    """A ConfigMap volume's files laid out in `directory` as the kubelet lays them out (its `items`)."""
    config_map = k8s_object(overlay, "ConfigMap", volume["configMap"]["name"])
    files = {name: value.encode() for name, value in config_map.get("data", {}).items()}
    files |= {name: base64.b64decode(value) for name, value in config_map.get("binaryData", {}).items()}
    items = {item["key"]: item["path"] for item in volume["configMap"].get("items", [])} or {k: k for k in files}
    for key, path in items.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(files[key])
    return directory


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kubernetes_renders_with_render_py_a_config_envoy_accepts(tmp_path: Path, overlay: str) -> None:
    """The Envoy pod's init container command, run here with its environment and mounts mapped; Envoy
    then validates it with the pod's volumes (the ConfigMaps' files, prod's TLS Secret) laid out here."""
    init = init_container(overlay, "envoy", "envoy-config")
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    mounts = {m["mountPath"]: rendered for m in init["volumeMounts"] if m["name"] == "rendered"}
    mounts |= {m["mountPath"]: REPO / "deploy/envoy" for m in init["volumeMounts"] if m["name"] == "template"}
    run_like_a_container(init["command"], envoy_render_env(overlay), mounts)
    text = (rendered / "envoy.yaml").read_text()
    assert text == render.render({}, environ=envoy_render_env(overlay))

    pod = k8s_object(overlay, "Deployment", "envoy")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    envoy_mounts: dict[str, Path] = {}
    for mount in container(overlay, "envoy")["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            envoy_mounts[mount["mountPath"]] = config_map_files(overlay, volume, tmp_path / mount["name"])
        elif "secret" in volume:  # prod's TLS Secret: a certificate made here
            (tmp_path / "tls").mkdir()
            self_signed_cert(tmp_path / "tls")
            envoy_mounts[mount["mountPath"]] = tmp_path / "tls"
    local = tmp_path / "local.yaml"
    local.write_text(as_seen_by_envoy(text, envoy_mounts))
    config_lines = [line for line in local.read_text().splitlines() if not line.lstrip().startswith("#")]
    from_image = [line for line in config_lines if "/etc/" in line]
    # Every file the config names comes from a volume, but the image's own CA bundle (verifies the JWKS URI).
    assert all(render.variables()["ENVOY_JWKS_CA"].default in line for line in from_image), from_image
    result = validate(local)
    assert result.returncode == 0, result.stderr
    listeners = [listener["name"] for listener in load(local)["static_resources"]["listeners"]]
    assert listeners == (
        ["front_door", "front_door_tls", "metrics"] if overlay == "prod" else ["front_door", "metrics"]
    )


@pytest.mark.parametrize(("tls", "affinity"), [("off", "on"), ("on", "off")])
def test_envoy_validates_every_variant(tmp_path: Path, tls: str, affinity: str) -> None:
    cert, key = self_signed_cert(tmp_path)
    config = render_config(
        tmp_path / "envoy.yaml",
        ENVOY_TLS=tls,
        ENVOY_TLS_CERT=str(cert),
        ENVOY_TLS_KEY=str(key),
        ENVOY_SESSION_AFFINITY=affinity,
    )
    result = validate(config)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "deprecated" not in result.stderr.lower(), result.stderr


def test_envoy_rejects_a_broken_render(tmp_path: Path) -> None:
    """The validation above can fail: a missing descriptor set is refused."""
    config = render_config(tmp_path / "envoy.yaml", ENVOY_DESCRIPTOR_SET=str(tmp_path / "missing.pb"))
    assert validate(config).returncode != 0


def test_envoy_rejects_a_web_root_without_the_page(tmp_path: Path) -> None:
    """The page's files are read at start: a wrong ENVOY_WEB_ROOT fails loudly, not with empty pages."""
    config = render_config(tmp_path / "envoy.yaml", ENVOY_WEB_ROOT=str(tmp_path / "missing"))
    result = validate(config)
    assert result.returncode != 0 and "index.html" in result.stderr


def test_the_chat_page_routes_shadow_nothing(tmp_path: Path) -> None:
    """The page's routes are exact paths after the agent's prefixes and before the catch-all 404."""
    hcm = by_name(load(render_config(tmp_path / "envoy.yaml"))["static_resources"]["listeners"], "front_door")[
        "filter_chains"
    ][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    matches = [{k: v for k, v in route["match"].items() if k != "headers"} for route in host["routes"]]
    assert matches == [
        {"path": "/v1/chat:stream"},
        {"safe_regex": {"regex": "/v1/runs/[^/]+/events"}},
        {"prefix": "/v1/"},
        {"prefix": "/agent.AgentService/"},
        {"prefix": "/grpc.health.v1.Health/"},
        {"prefix": "/grpc.reflection."},
        {"path": "/"},
        {"path": "/chat.js"},
        {"path": "/chat.css"},
        {"prefix": "/"},
    ]
    files = {
        route["match"]["path"]: Path(route["direct_response"]["body"]["filename"])
        for route in host["routes"]
        if "filename" in route.get("direct_response", {}).get("body", {})
    }
    assert {path: file.relative_to(render.WEB_ROOT).as_posix() for path, file in files.items()} == {
        "/": "index.html",
        "/chat.js": "dist/chat.js",
        "/chat.css": "chat.css",
    }
    for route in host["routes"][6:9]:  # a POST to / (say) is not the page: it gets the 404
        (header,) = route["match"]["headers"]
        assert header == {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}
    largest = max(file.stat().st_size for file in files.values())
    assert largest < hcm["route_config"]["max_direct_response_body_size_bytes"] // 4  # room to grow


def test_the_config_is_streaming_safe_and_sticky(tmp_path: Path) -> None:
    config = load(render_config(tmp_path / "envoy.yaml"))
    resources = config["static_resources"]
    hcm = by_name(resources["listeners"], "front_door")["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["codec_type"] == "AUTO"
    assert hcm["stream_idle_timeout"] == "300s"
    assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.buffer",
        "sse-event-ids",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.grpc_stats",
        "grpc-status-recorder",
        "envoy.filters.http.router",
    ]
    transcoder = by_name(hcm["http_filters"], "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    assert transcoder["services"] == ["agent.AgentService"]
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert by_name(hcm["http_filters"], "envoy.filters.http.grpc_stats")["typed_config"]["emit_filter_state"] is True

    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    proxied = [r for r in routes if "route" in r and r["match"].get("prefix") != "/v1/"]
    assert [r["match"].get("prefix") for r in proxied][2:] == [
        "/agent.AgentService/",
        "/grpc.health.v1.Health/",
        "/grpc.reflection.",
    ]
    for route in proxied[:2]:  # the JSON door before transcoding: no retry, no deadline of Envoy's own
        assert route["route"] == {"cluster": "agent", "timeout": "0s"}
    for route in proxied[2:]:
        action = route["route"]
        assert action["cluster"] == "agent"
        assert action["timeout"] == "0s"
        assert action["retry_policy"]["retry_on"] == "unavailable"
        assert 1 <= action["retry_policy"]["num_retries"] <= 3
        if route["match"]["prefix"].startswith("/grpc.health"):
            # The agent ends a Watch at the deadline itself; an idle Watch is not idle.
            assert "max_stream_duration" not in action
            assert action["idle_timeout"] == "0s"
            continue
        # Envoy enforces the client's deadline (no cap), never with an offset (see the template).
        assert action["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
        assert action["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
    mappers = hcm["local_reply_config"]["mappers"]
    assert mappers[0]["body_format_override"]["content_type"] == "application/json"

    agent = by_name(resources["clusters"], "agent")
    assert agent["type"] == "STRICT_DNS"
    assert agent["lb_policy"] == "RING_HASH"
    without_affinity = load(render_config(tmp_path / "no-affinity.yaml", ENVOY_SESSION_AFFINITY="off"))
    assert by_name(without_affinity["static_resources"]["clusters"], "agent")["lb_policy"] == "LEAST_REQUEST"
    fronts = [listener for listener in resources["listeners"] if listener["name"].startswith("front_door")]
    assert fronts and all(listener["traffic_direction"] == "INBOUND" for listener in fronts)  # drain.sh drains them
    assert "traffic_direction" not in by_name(resources["listeners"], "metrics")
    options = agent["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "connection_keepalive" in options["explicit_http_config"]["http2_protocol_options"]
    (check,) = agent["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "agent.AgentService"}
    assert check["interval"] == check["no_traffic_interval"] == "0.5s"  # tests render a short interval
    assert agent["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    (thresholds,) = agent["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] == thresholds["max_pending_requests"] == 1000  # AGENT_MAX_CONCURRENT_STREAMS
    assert agent["outlier_detection"]["enforcing_consecutive_5xx"] == 0

    defaults = render.variables()
    assert defaults["ENVOY_HEALTH_INTERVAL"].default == "2s"
    assert defaults["ENVOY_GRPC_PORT"].default == "8080"
    assert defaults["ENVOY_TLS_PORT"].default == "8443"
    assert defaults["ENVOY_ADMIN_PORT"].default == "9901"
    assert defaults["ENVOY_OTEL_HOST"].default == "otel-collector"
    assert defaults["ENVOY_OTEL_PORT"].default == "4317"


def test_render_py_cli_writes_the_config(tmp_path: Path) -> None:
    out = tmp_path / "cli.yaml"
    result = subprocess.run(
        [sys.executable, str(render.TEMPLATE.parent / "render.py"), "-o", str(out), "ENVOY_GRPC_PORT=18080"],
        env={"PATH": os.environ["PATH"], "ENVOY_AGENT_PORT": "15051"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    front = by_name(load(out)["static_resources"]["listeners"], "front_door")
    assert front["address"]["socket_address"]["port_value"] == 18080
    agent = by_name(load(out)["static_resources"]["clusters"], "agent")
    endpoint = agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "agent", "port_value": 15051}


def test_readme_documents_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name in render.variables() if f"`{name}`" not in readme]
    assert missing == []
