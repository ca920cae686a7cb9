"""`make run` with the demo provider and `make run-agentcore` beside it, as processes on ephemeral ports.

What a newcomer sees: no model build for the demo provider, a banner for the provider that runs,
Envoy's access log in a file (not in the terminal), the chat page, and Ctrl-C stopping everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.servers import collect, free_port, read_until_error, text_of

REPO = Path(__file__).resolve().parents[2]
BANNER_END = "Ctrl-C stops everything."
START_TIMEOUT_S = 90.0


@dataclass
class MakeProcess:
    """A `make` target running in its own process group, its output collected line by line."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def read_until(self, text: str, timeout_s: float = START_TIMEOUT_S) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"make exited before {text!r}:\n" + "".join(self.lines[-40:]))
                self.lines.append(raw.decode(errors="replace"))
                if text in self.lines[-1]:
                    return "".join(self.lines)

    async def interrupt(self, timeout_s: float = 40) -> str:
        """Ctrl-C: SIGINT to the whole process group, then the rest of the output."""
        os.killpg(self.process.pid, signal.SIGINT)
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            rest = await self.process.stdout.read()
            await self.process.wait()
        self.lines.append(rest.decode(errors="replace"))
        return "".join(self.lines)


@asynccontextmanager
async def make_target(target: str, **env: str) -> AsyncIterator[MakeProcess]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ENVOY_", "MAKE", "MODEL_"))}
    process = await asyncio.create_subprocess_exec(
        "make",
        "--no-print-directory",
        target,
        cwd=REPO,
        env={**environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    running = MakeProcess(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            # Ctrl-C first: run_stack.py stops the processes it started in sessions of their own.
            os.killpg(process.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), timeout=40)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await asyncio.wait_for(process.wait(), timeout=10)


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def access_log_of(path: Path, rpc_path: str, timeout_s: float = 10) -> list[dict[str, str]]:
    """The access log entries of calls to `rpc_path`, once there is one (Envoy flushes every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        calls = [entry for entry in entries if entry["path"] == rpc_path]
        if calls or time.monotonic() > deadline:
            return calls
        await asyncio.sleep(0.1)


async def test_make_run_demo_starts_without_the_model_and_keeps_the_access_log_in_a_file(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("grpc", "envoy", "admin", "envoy_metrics", "otel", "core", "core_metrics")}
    data_dir = tmp_path / "agent-data"
    async with make_target(
        "run",
        AGENT_MODEL_PROVIDER="demo",
        AGENT_GRPC_PORT=str(ports["grpc"]),
        AGENT_METRICS_PORT="0",
        AGENT_DATA_DIR=str(data_dir),
        AGENT_SHUTDOWN_GRACE_S="2",
        ENVOY_GRPC_PORT=str(ports["envoy"]),
        ENVOY_ADMIN_PORT=str(ports["admin"]),
        ENVOY_METRICS_PORT=str(ports["envoy_metrics"]),
        ENVOY_OTEL_PORT=str(ports["otel"]),
    ) as run:
        output = await run.read_until(BANNER_END)
        assert "llama" not in output.lower(), "the demo provider must not build or start the model"
        assert "The agent is up (provider demo)" in output
        assert 'chat "what is 2*(3+4)?"' in output and "AGENT_MODEL_PROVIDER=demo make run" not in output
        access_log = data_dir / "envoy-access.log"
        assert f"tail -f {access_log}" in output
        assert "Auth is OFF" in output and "RUN_AUTH=on make run" in output

        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['envoy']}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            answer = await collect(stub.StreamChat(agent_pb2.ChatRequest(content="what is 6*7?"), timeout=20))
        assert "42" in text_of(answer)
        calls = await access_log_of(access_log, "/agent.AgentService/StreamChat")
        assert calls and calls[0]["grpc_status"] == "OK"

        # The chat page, from the repository's deploy/web (render.WEB_ROOT), as the banner says.
        page_url = f"http://127.0.0.1:{ports['envoy']}/"
        assert f"{page_url}   the chat page" in output
        async with httpx.AsyncClient(timeout=10) as client:
            page = await client.get(page_url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.content == (REPO / "deploy" / "web" / "index.html").read_bytes()

        # The AgentCore face beside it: its own HTTP and metrics ports, no collision.
        async with make_target(
            "run-agentcore",
            AGENT_MODEL_PROVIDER="demo",
            AGENT_DATA_DIR=str(data_dir),
            AGENTCORE_HTTP_PORT=str(ports["core"]),
            AGENTCORE_METRICS_PORT=str(ports["core_metrics"]),
        ) as core:
            base = f"http://127.0.0.1:{ports['core']}"
            async with httpx.AsyncClient(timeout=10) as client:
                deadline = time.monotonic() + START_TIMEOUT_S
                while True:
                    assert core.process.returncode is None, await core.interrupt()
                    try:
                        if (await client.get(f"{base}/ping")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "the AgentCore face did not answer /ping"
                    await asyncio.sleep(0.2)
                response = await client.post(f"{base}/invocations", json={"prompt": "what is 2+2?", "stream": "events"})
                metrics = await client.get(f"http://127.0.0.1:{ports['core_metrics']}/metrics")
            assert response.status_code == 200 and '"type": "done"' in response.text
            assert "4" in response.text
            assert 'method="AgentCore/invocations"' in metrics.text
            await core.interrupt()

        output = await run.interrupt()
    assert "stopping: draining the agent service" in output
    assert "error:" not in output
    assert '"event":"envoy.access"' not in output.replace(" ", ""), "access log lines belong in the file"
    for port in (ports["grpc"], ports["envoy"], ports["admin"]):
        assert port_is_closed(port)


async def test_make_run_with_auth_makes_a_development_identity_and_its_examples_carry_the_token(
    tmp_path: Path,
) -> None:
    """RUN_AUTH=on: a key, JWKS and token made at first start; Envoy and the agent require the token."""
    ports = {name: free_port() for name in ("grpc", "envoy", "admin", "envoy_metrics", "otel")}
    data_dir = tmp_path / "agent-data"
    async with make_target(
        "run",
        RUN_AUTH="on",
        AGENT_MODEL_PROVIDER="demo",
        AGENT_WORKERS="1",
        AGENT_GRPC_PORT=str(ports["grpc"]),
        AGENT_METRICS_PORT="0",
        AGENT_DATA_DIR=str(data_dir),
        AGENT_SHUTDOWN_GRACE_S="2",
        ENVOY_GRPC_PORT=str(ports["envoy"]),
        ENVOY_ADMIN_PORT=str(ports["admin"]),
        ENVOY_METRICS_PORT=str(ports["envoy_metrics"]),
        ENVOY_OTEL_PORT=str(ports["otel"]),
    ) as run:
        output = await run.read_until(BANNER_END)
        token_file = data_dir / "dev-identity" / "token"
        assert "Auth is ON" in output and str(token_file) in output
        assert f"AGENTCTL_TOKEN=$(cat {token_file}) .venv/bin/agentctl" in output
        assert f'-H "authorization: Bearer $(cat {token_file})"' in output
        token = token_file.read_text().strip()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['envoy']}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            request = agent_pb2.ChatRequest(content="what is 6*7?")
            _, refused = await read_until_error(stub.StreamChat(request, timeout=20))
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = await collect(
                stub.StreamChat(request, metadata=(("authorization", f"Bearer {token}"),), timeout=20)
            )
        assert "42" in text_of(answer)
        # The agent checks too: straight to its port, without Envoy, no token is no answer.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            _, refused = await read_until_error(
                agent_pb2_grpc.AgentServiceStub(channel).StreamChat(request, timeout=20)
            )
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        output = await run.interrupt()
    assert "error:" not in output
