"""One source of defaults: the settings object (agent_service/settings.py) for AGENT_*, the Envoy
template's `# @var` lines for ENVOY_*. The image, docker compose (and .env) and the Kubernetes
ConfigMaps set only what differs, each difference with its reason below (the README's table
"Where the environments differ" shows them). A restated default fails, and so does a difference
without a reason, or a reason nothing needs any more.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from pydantic import TypeAdapter

from agent_service.settings import Settings
from tests.config.stack import (
    OVERLAYS,
    REPO,
    agent_settings,
    compose_envoy_render_env,
    compose_model,
    dotenv,
    envoy_defaults,
    envoy_render_env,
    image_env,
)

# (where, NAME=value) -> why it differs from the default.
REASONS: dict[tuple[str, str], str] = {
    ("image", "AGENT_DATA_DIR=/data"): "sessions live in the image's volume",
    ("image", "AGENT_LOG_FORMAT=json"): "log collectors read JSON, also when a container has a terminal",
    ("compose", "AGENT_LOCAL_BASE_URL=http://model:8081"): "llama-server is the compose service `model`",
    ("compose", "AGENT_WORKERS=0"): "one machine, no replicas: one worker per core uses it (Kubernetes scales pods)",
    ("compose", "AGENT_OLLAMA_HOST=http://host.docker.internal:11434"): "Ollama runs on the Docker host, "
    "not on the container's loopback",
    ("compose", "AGENT_SESSION_STORE=redis://redis:6379/0"): "conversations live in the compose service `redis`",
    ("compose", "AGENT_AUTH=true"): "compose runs with auth on (the agent verifies tokens too)",
    ("compose", "AGENT_JWKS_FILE=/etc/jwks/jwks.json"): "the development identity's JWKS, mounted",
    ("compose", "AGENT_JWT_ISSUER=agent-grpc-stack-dev"): "the development identity `make up` makes",
    ("compose", "AGENT_JWT_AUDIENCES=agent-service"): "the development identity `make up` makes",
    ("compose envoy", "ENVOY_AUTH=on"): "compose runs with auth on",
    ("compose envoy", "ENVOY_JWT_ISSUER=agent-grpc-stack-dev"): "the development identity `make up` makes",
    ("compose envoy", "ENVOY_JWT_AUDIENCES=agent-service"): "the development identity `make up` makes",
    ("k8s base", "AGENT_MODEL_PROVIDER=bedrock"): "the cluster runs no llama-server; Bedrock needs none "
    "and authenticates with the pod's AWS identity",
    ("k8s base", "AGENT_SESSION_STORE=redis://redis:6379/0"): "every replica continues any conversation: "
    "the Redis StatefulSet `redis`",
    ("k8s dev", "AGENT_MODEL_PROVIDER=demo"): "dev runs anywhere, without credentials",
    ("k8s dev", "AGENT_SESSION_STORE=redis://redis:6379/0"): "from the base",
    ("k8s prod", "AGENT_MODEL_PROVIDER=bedrock"): "from the base",
    ("k8s prod", "AGENT_REFLECTION=false"): "production does not list its API",
    ("k8s prod", "AGENT_SESSION_STORE=redis://redis:6379/0"): "from the base",
    ("k8s prod", "AGENT_AUTH=true"): "production runs with auth on (the agent verifies tokens too)",
    ("k8s prod", "AGENT_JWT_ISSUER=https://idp.example.com/"): "your identity provider (an example to replace)",
    ("k8s prod", "AGENT_JWT_AUDIENCES=agent-service"): "your identity provider (an example to replace)",
    ("k8s prod", "AGENT_JWKS_URI=https://idp.example.com/.well-known/jwks.json"): "your identity provider "
    "(an example to replace)",
    ("k8s prod envoy", "ENVOY_AUTH=on"): "production runs with auth on",
    ("k8s prod envoy", "ENVOY_JWT_ISSUER=https://idp.example.com/"): "your identity provider (an example to replace)",
    ("k8s prod envoy", "ENVOY_JWT_AUDIENCES=agent-service"): "your identity provider (an example to replace)",
    ("k8s prod envoy", "ENVOY_JWKS_URI=https://idp.example.com/.well-known/jwks.json"): "your identity provider "
    "(an example to replace)",
    ("k8s envoy", "ENVOY_AGENT_MAX_STREAMS=10000"): "HPA maxReplicas (10) x AGENT_MAX_CONCURRENT_STREAMS",
    ("k8s prod envoy", "ENVOY_TLS=on"): "TLS on the second listener",
    ("k8s prod envoy", "ENVOY_TLS_CERT=/etc/envoy-tls/tls.crt"): "the Secret is mounted beside the template",
    ("k8s prod envoy", "ENVOY_TLS_KEY=/etc/envoy-tls/tls.key"): "the Secret is mounted beside the template",
}


def setting_default(name: str, provider: str) -> object:
    """The settings' default of AGENT_<NAME> for `provider` (its PROVIDER_DEFAULTS included)."""
    field = name.removeprefix("AGENT_").lower()
    assert field in Settings.model_fields, f"{name} is not a setting"
    if field == "model_provider":
        return Settings.model_fields[field].default
    return getattr(Settings.model_validate({"model_provider": provider}), field)


def parsed(name: str, value: str) -> object:
    """The value a setting takes from `value` (the field alone: its checks across fields do not apply)."""
    field = Settings.model_fields[name.removeprefix("AGENT_").lower()]
    return TypeAdapter(field.annotation).validate_python(value, strict=False)


def agent_differences(where: str, env: Mapping[str, str | None], base: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(where, NAME=value) of every AGENT_* setting in `env`; fails on one restating its default,
    which is `base` (the image's ENV) when set there, else the settings object's."""
    values = {k: v for k, v in env.items() if k.startswith("AGENT_") and v is not None}
    provider = values.get("AGENT_MODEL_PROVIDER") or base.get("AGENT_MODEL_PROVIDER") or "local"
    for name, value in values.items():
        default = parsed(name, base[name]) if name in base else setting_default(name, provider)
        assert parsed(name, value) != default, f"{where} restates {name}={value}, the default"
        yield where, f"{name}={value}"


def envoy_differences(where: str, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    defaults = envoy_defaults()
    for name, value in env.items():
        assert name in defaults, f"{where}: {name} is not a variable of the Envoy template"
        assert value != defaults[name], f"{where} restates {name}={value}, the template's default"
        yield where, f"{name}={value}"


def all_differences() -> set[tuple[str, str]]:
    found = set(agent_differences("image", image_env(), {}))
    found |= set(agent_differences("compose", compose_model()["services"]["agent"]["environment"], image_env()))
    found |= set(envoy_differences("compose envoy", compose_envoy_render_env()))
    found |= set(agent_differences("k8s base", agent_settings("base"), image_env()))
    for overlay in OVERLAYS:
        found |= set(agent_differences(f"k8s {overlay}", agent_settings(overlay), image_env()))
    base_envoy = envoy_render_env("base")
    found |= set(envoy_differences("k8s envoy", base_envoy))
    for overlay in OVERLAYS:
        own = {k: v for k, v in envoy_render_env(overlay).items() if base_envoy.get(k) != v}
        found |= set(envoy_differences(f"k8s {overlay} envoy", own))
    return found


def test_deploy_files_set_only_what_differs_from_the_defaults_each_with_its_reason() -> None:
    found = all_differences()
    assert sorted(found - set(REASONS)) == [], "a difference without a reason in REASONS"
    assert sorted(set(REASONS) - found) == [], "a reason for a difference that is gone"


def test_dotenv_restates_no_setting() -> None:
    """.env holds image tags and ports of compose itself; no AGENT_* or ENVOY_* setting."""
    settings = {f"AGENT_{name.upper()}" for name in Settings.model_fields} | set(envoy_defaults())
    assert sorted(settings & set(dotenv())) == []


def test_the_check_fails_on_a_restated_or_contradicting_default() -> None:
    """The test above can fail: a restated port, and a provider that differs without a reason."""
    with pytest.raises(AssertionError, match="restates AGENT_GRPC_PORT=50051"):
        list(agent_differences("probe", {"AGENT_GRPC_PORT": "50051"}, {}))
    with pytest.raises(AssertionError, match="restates AGENT_DATA_DIR=/data"):
        list(agent_differences("probe", {"AGENT_DATA_DIR": "/data"}, image_env()))
    with pytest.raises(AssertionError, match="restates ENVOY_GRPC_PORT=8080"):
        list(envoy_differences("probe", {"ENVOY_GRPC_PORT": "8080"}))
    assert set(agent_differences("k8s base", {"AGENT_MODEL_PROVIDER": "openai"}, {})) - set(REASONS)


def test_the_readme_shows_every_difference() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Where the environments differ", 1)[1].split("\n## ", 1)[0]
    missing = [f"{where}: {assignment}" for where, assignment in REASONS if f"`{assignment}`" not in section]
    assert missing == []
