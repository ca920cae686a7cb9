"""The `agent-service` console script as a real process: start-up, SIGTERM drain, exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.servers import collect, free_port, kinds


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = dict(
        os.environ,
        AGENT_MODEL_PROVIDER="demo",
        AGENT_GRPC_HOST="127.0.0.1",
        AGENT_GRPC_PORT=str(port),
        AGENT_DEMO_TOKEN_DELAY_MS="20",
        AGENT_SHUTDOWN_GRACE_S="1.5",
        AGENT_DATA_DIR=str(tmp_path),
    )
    process = subprocess.Popen([sys.executable, "-m", "agent_service.server"], env=env)
    try:
        yield process, f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("reply_words", "expected"),
    [(20, "done"), (1000, grpc.StatusCode.UNAVAILABLE)],
    ids=["finishes-within-grace", "cancelled-after-grace"],
)
async def test_sigterm_drains_then_exits_zero(service_process, reply_words: int, expected) -> None:
    process, target = service_process
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        # The demo model echoes the prompt, so a long prompt makes a long answer.
        call = stub.StreamChat(agent_pb2.ChatRequest(content="word " * reply_words))
        await call.read()
        process.send_signal(signal.SIGTERM)
        if expected == "done":
            assert kinds(await collect(call))[-1] == "done"
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(call)
            assert caught.value.code() == expected
    assert process.wait(timeout=15) == 0
