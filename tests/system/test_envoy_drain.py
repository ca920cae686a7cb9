"""Stopping Envoy without cutting streams: deploy/envoy/drain.sh (the Kubernetes preStop) and
deploy/envoy/serve.sh (compose's entrypoint, draining on SIGTERM), each against a real Envoy."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import httpx

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.servers import collect, free_port, kinds, make_settings, running_server
from tests.system.front_door import ENVOY, REPO, render_config, running_envoy, wait_until

DRAIN_SH = REPO / "deploy/envoy/drain.sh"
SERVE_SH = REPO / "deploy/envoy/serve.sh"
WORDS, DELAY_MS = 30, 100.0  # a 3 s answer
DRAIN_TIME_S = 2  # Envoy's --drain-time-s here: new connections are refused after it
ENVOY_DRAIN_ARGS = ("--drain-time-s", str(DRAIN_TIME_S), "--drain-strategy", "immediate")


async def _stream(target: str) -> tuple[list[agent_pb2.ChatResponse], float]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).StreamChat(
            agent_pb2.ChatRequest(content="tell me a story"), timeout=30
        )
        responses = await collect(call)
        return responses, time.monotonic()


async def _sse(url: str) -> tuple[list[str], float]:
    lines = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", "/v1/chat:stream", json={"content": "tell me a story"}) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
    return lines, time.monotonic()


async def _refused(target: str) -> bool:
    host, port = target.split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def test_drain_sh_lets_streams_in_flight_finish_and_returns_once_they_have(tmp_path: Path) -> None:
    """The preStop: streams running when it starts finish complete (gRPC and SSE); it returns after the last
    one ended, well within its bound; the front door then refuses connections, the metrics listener still answers."""
    settings = make_settings(tmp_path / "data", demo_token_delay_ms=DELAY_MS, demo_reply_words=WORDS)
    async with running_server(settings) as agent:
        config = render_config(tmp_path / "envoy.yaml", ENVOY_AGENT_PORT=str(agent.server.port))
        async with running_envoy(config, tmp_path, extra_args=ENVOY_DRAIN_ARGS) as envoy:
            grpc_stream = asyncio.create_task(_stream(envoy.target))
            sse_stream = asyncio.create_task(_sse(envoy.url))
            await wait_until(lambda: agent.server.admission.in_flight == 2, "both streams running")
            started = time.monotonic()
            drain = await asyncio.create_subprocess_exec(
                "bash",
                str(DRAIN_SH),
                env={"PATH": os.environ["PATH"], "ENVOY_ADMIN_PORT": envoy.admin.split(":")[1], "DRAIN_MIN_S": "1"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(drain.communicate(), timeout=40)
            returned = time.monotonic()
            (responses, grpc_ended), (events, sse_ended) = await grpc_stream, await sse_stream
            assert drain.returncode == 0, output
            assert "nothing in flight" in output.decode(), output
            assert kinds(responses) == ["content"] * WORDS + ["done"]
            assert len(events) == WORDS + 1 and '"done"' in events[-1]
            assert max(grpc_ended, sse_ended) <= returned < max(grpc_ended, sse_ended) + 2
            assert returned - started < 10
            assert await _refused(envoy.target), "the front door still accepts connections after the drain time"
            async with httpx.AsyncClient(timeout=5) as client:
                assert (await client.get(f"{envoy.metrics_url}/ready")).status_code == 200


async def test_serve_sh_drains_on_sigterm_then_stops_envoy(tmp_path: Path) -> None:
    """compose's entrypoint: SIGTERM (docker compose stop) lets the stream in flight finish, then Envoy exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "envoy").symlink_to(ENVOY)  # the image has envoy on PATH
    settings = make_settings(tmp_path / "data", demo_token_delay_ms=DELAY_MS, demo_reply_words=WORDS)
    async with running_server(settings) as agent:
        admin_port = str(free_port())
        config = render_config(
            tmp_path / "envoy.yaml", ENVOY_AGENT_PORT=str(agent.server.port), ENVOY_ADMIN_PORT=admin_port
        )
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "ENVOY_ADMIN_PORT": admin_port, "DRAIN_MIN_S": "1"}
        async with running_envoy(
            config, tmp_path, extra_args=ENVOY_DRAIN_ARGS, launcher=("bash", str(SERVE_SH)), env=env
        ) as envoy:
            stream = asyncio.create_task(_stream(envoy.target))
            await wait_until(lambda: agent.server.admission.in_flight == 1, "the stream running")
            envoy.process.send_signal(signal.SIGTERM)
            responses, ended = await stream
            code = await asyncio.wait_for(envoy.process.wait(), timeout=40)
            exited = time.monotonic()
            assert kinds(responses) == ["content"] * WORDS + ["done"]
            assert code == 0
            assert ended <= exited < ended + 3
