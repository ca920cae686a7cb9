"""Real agent servers on ephemeral loopback ports, and small client helpers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from strands.models import Model

from agent_service.core.sessions import Session
from agent_service.proto import agent_pb2, agent_pb2_grpc
from agent_service.server import AgentServer
from agent_service.settings import Settings
from agent_service.store import ANONYMOUS, SessionKey


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: demo model, loopback, an ephemeral port, fast words."""
    values: dict[str, Any] = {
        "model_provider": "demo",
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "data_dir": data_dir,
        "demo_token_delay_ms": 0,
        "cancel_grace_s": 0.5,
        "shutdown_grace_s": 2,
        "log_format": "json",
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Running:
    server: AgentServer
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.AgentServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(
    settings: Settings, model: Model | None = None, traced: bool = False
) -> AsyncIterator[Running]:
    server = AgentServer(settings, model=model, traced=traced)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Running(server, channel, agent_pb2_grpc.AgentServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(0.5)


async def collect(call: Any) -> list[agent_pb2.ChatResponse]:
    """Read a streaming call to its end (with `read()`, so it works after earlier reads too)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def read_until_error(call: Any) -> tuple[list[agent_pb2.ChatResponse], grpc.aio.AioRpcError]:
    """Read a call that must fail: the responses before the failure, and the error."""
    responses: list[agent_pb2.ChatResponse] = []
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
    except grpc.aio.AioRpcError as error:
        return responses, error
    raise AssertionError(f"the call succeeded after {len(responses)} responses")


def session_of(running: Running, session_id: str) -> Session:
    """The server's in-memory state of an anonymous caller's session (it must be cached)."""
    session = running.server.registry.cached(SessionKey(ANONYMOUS, session_id))
    assert session is not None, f"session {session_id!r} is not in memory"
    return session


def kinds(responses: Iterable[agent_pb2.ChatResponse]) -> list[str]:
    return [str(r.WhichOneof("response")) for r in responses]


def text_of(responses: Iterable[agent_pb2.ChatResponse]) -> str:
    return "".join(r.content.text for r in responses if r.WhichOneof("response") == "content")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
