"""Fixtures of the system tests: the agent service behind a real Envoy front door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_service.proto import agent_pb2_grpc
from tests.support.servers import Running, make_settings, running_server
from tests.system.front_door import Envoy, render_config, running_envoy


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long_stream: a deliberately long stream through Envoy (about 21 s)")


@dataclass
class FrontDoor:
    """One agent server (in-process) behind one Envoy, and a gRPC channel to Envoy's front door."""

    agent: Running
    envoy: Envoy
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.AgentServiceStub


@asynccontextmanager
async def front_door(
    tmp_path: Path, envoy_vars: dict[str, str] | None = None, **settings: Any
) -> AsyncIterator[FrontDoor]:
    async with running_server(make_settings(tmp_path / "agent-data", **settings)) as agent:
        config = render_config(tmp_path / "envoy.yaml", ENVOY_AGENT_PORT=str(agent.server.port), **(envoy_vars or {}))
        async with running_envoy(config, tmp_path) as envoy:
            channel = grpc.aio.insecure_channel(envoy.target)
            try:
                yield FrontDoor(agent, envoy, channel, agent_pb2_grpc.AgentServiceStub(channel))
            finally:
                await channel.close()


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    async with front_door(tmp_path) as running:
        yield running
