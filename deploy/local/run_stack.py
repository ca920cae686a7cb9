#!/usr/bin/env python3
"""`make run`: the stack on localhost without Docker, in the foreground.

Starts the local model server (unless another provider is chosen with
AGENT_MODEL_PROVIDER), then the agent service on loopback; waits until each is
healthy, prints how to call it, and on Ctrl-C (or SIGTERM) drains the agent
first, then stops the model. If any process dies, the others are stopped too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


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
                raise RuntimeError(f"agent service exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="agent.AgentService"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"agent service at {target} not SERVING after {timeout_s:.0f} s")


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


def main() -> int:
    env = dict(os.environ)
    env.setdefault("AGENT_MODEL_PROVIDER", "local")
    env.setdefault("AGENT_GRPC_HOST", "127.0.0.1")
    env.setdefault("AGENT_GRPC_PORT", "50051")
    env.setdefault("AGENT_DATA_DIR", str(REPO / "agent-data"))
    env.setdefault("AGENT_LOG_FORMAT", "console")
    model_port = env.setdefault("MODEL_PORT", "8081")
    env.setdefault("AGENT_LOCAL_BASE_URL", f"http://127.0.0.1:{model_port}")
    grace_s = float(env.get("AGENT_SHUTDOWN_GRACE_S", "20"))
    target = f"127.0.0.1:{env['AGENT_GRPC_PORT']}"

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
        print(
            f"""
The agent is up. Try, in another terminal:
  .venv/bin/agentctl --target {target} chat "what time is it?"
  .venv/bin/agentctl --target {target} chat            # interactive, bidirectional
  .venv/bin/agentctl --target {target} health
  .venv/bin/grpcurl -plaintext {target} list
  .venv/bin/grpcurl -plaintext -d '{{"content": "hello"}}' {target} agent.AgentService/StreamChat
Tool calls need a model that makes them: `AGENT_MODEL_PROVIDER=demo make run` shows them with the demo model.
Ctrl-C stops everything.
""",
            flush=True,
        )
        while not stopping:
            for name, process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited unexpectedly with code {process.returncode}")
            time.sleep(0.2)
        print("\nstopping: draining the agent service, then the model")
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for name, process in reversed(processes):
            stop(process, name, grace_s + 5 if name == "agent" else 10)


if __name__ == "__main__":
    raise SystemExit(main())
