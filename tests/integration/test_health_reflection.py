"""gRPC health (Check, Watch, drain) and server reflection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent_service.proto import agent_pb2
from tests.support.servers import Running, collect, kinds, make_settings, running_server, session_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("service", ["", "agent.AgentService"])
async def test_health_check_serving(served: Running, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == SERVING


async def test_health_check_unknown_service_is_not_found(served: Running) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.Such"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_drain_turns_health_not_serving_finishes_streams_and_refuses_new_calls(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=20)
    running = running_server(settings)
    served = await running.__aenter__()
    try:
        health = health_pb2_grpc.HealthStub(served.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="agent.AgentService"))
        assert (await watch.read()).status == SERVING
        in_flight = served.stub.StreamChat(agent_pb2.ChatRequest(content="finish me"))
        await in_flight.read()

        stopping = asyncio.create_task(served.server.stop(grace_s=5))
        assert (await watch.read()).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="too late")))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert kinds(await collect(in_flight))[-1] == "done"  # finished within the grace period
        await stopping
    finally:
        await served.channel.close()


async def test_drain_cancels_streams_that_outlive_the_grace(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=500)
    async with running_server(settings) as served:
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content="never ends in time", session_id="drained"))
        await call.read()
        await served.server.stop(grace_s=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(call)  # grpc delivers the status after the messages already sent
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert served.server.admission.in_flight == 0
        assert not session_of(served, "drained").busy


async def _list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for reply in stub.ServerReflectionInfo(one_request()):
        names.extend(service.name for service in reply.list_services_response.service)
    return names


async def test_reflection_lists_the_services(served: Running) -> None:
    assert set(await _list_services(served.channel)) == {
        "agent.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_can_be_turned_off(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, reflection=False)) as served:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list_services(served.channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
