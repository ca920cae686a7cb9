"""Envoy's cluster behaviour with real upstreams: health-check ejection and recovery, session
affinity across two replicas, and a long stream that no timeout may cut."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.servers import collect, kinds, make_settings, read_until_error, running_server
from tests.system.conftest import front_door
from tests.system.front_door import render_config, running_envoy


async def test_an_upstream_reporting_not_serving_is_ejected_and_comes_back(tmp_path: Path) -> None:
    async with front_door(tmp_path) as door:
        await door.agent.server.health.set("agent.AgentService", health_pb2.HealthCheckResponse.NOT_SERVING)
        await door.envoy.wait_for(lambda hosts: "failed_active_hc" in "".join(hosts.values()))

        started = time.monotonic()
        call = door.stub.StreamChat(agent_pb2.ChatRequest(content="anyone there?"), timeout=30)
        responses, error = await read_until_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert responses == []
        assert time.monotonic() - started < 10  # refused by Envoy, not waited out
        (entry,) = await door.envoy.access_log_of("/agent.AgentService/StreamChat")
        assert entry["response_flags"] == "UH"  # no healthy upstream: the agent never saw the call
        assert door.agent.server.admission.in_flight == 0

        await door.agent.server.health.set("agent.AgentService", health_pb2.HealthCheckResponse.SERVING)
        await door.envoy.wait_all_healthy()
        responses = await collect(door.stub.StreamChat(agent_pb2.ChatRequest(content="back?"), timeout=30))
        assert kinds(responses)[-1] == "done"


async def test_a_session_always_reaches_the_same_replica(tmp_path: Path) -> None:
    """Two replicas on 127.0.0.1 and 127.0.0.2 (STRICT_DNS resolves both literals): every call of a
    session goes to one replica (RING_HASH on x-session-id), and the sessions spread over both."""
    async with (
        running_server(make_settings(tmp_path / "a", grpc_host="127.0.0.1")) as first,
        running_server(make_settings(tmp_path / "b", grpc_host="127.0.0.2")) as second,
    ):
        config_path = render_config(tmp_path / "envoy.yaml", ENVOY_AGENT_PORT=str(first.server.port))
        config = yaml.safe_load(config_path.read_text())
        (agent,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "agent"]
        endpoints = agent["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.2", "port_value": second.server.port}}}}
        )
        config_path.write_text(yaml.safe_dump(config))

        async with running_envoy(config_path, tmp_path, upstreams=2) as envoy:
            async with grpc.aio.insecure_channel(envoy.target) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                sessions = [f"user-{n}" for n in range(15)]  # odd: round robin would alternate replicas
                for _ in range(2):
                    for session in sessions:
                        call = stub.StreamChat(
                            agent_pb2.ChatRequest(content="hi"), metadata=(("x-session-id", session),), timeout=30
                        )
                        assert kinds(await collect(call))[-1] == "done"
            entries = await envoy.access_log_of("/agent.AgentService/StreamChat", count=2 * len(sessions))

    hosts_of: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        hosts_of[entry["session_id"]].add(entry["upstream_host"])
    assert set(hosts_of) == set(sessions)
    assert all(len(hosts) == 1 for hosts in hosts_of.values()), hosts_of
    used = set().union(*hosts_of.values())
    assert used == {first.target, f"127.0.0.2:{second.server.port}"}, "15 sessions all hashed to one replica"


@pytest.mark.long_stream
async def test_a_stream_longer_than_20_seconds_is_not_cut(tmp_path: Path) -> None:
    """The one slow test (about 21 s): Envoy's default route timeout (15 s) would cut this answer."""
    words, delay_ms = 42, 500.0
    async with front_door(tmp_path, demo_token_delay_ms=delay_ms, demo_reply_words=words) as door:
        started = time.monotonic()
        responses = await collect(door.stub.StreamChat(agent_pb2.ChatRequest(content="tell me a long story")))
        elapsed = time.monotonic() - started
    assert kinds(responses) == ["content"] * words + ["done"]
    assert elapsed > 20  # the model's own delays make it this long: the test really tested a long stream
