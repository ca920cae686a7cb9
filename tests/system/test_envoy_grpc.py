"""gRPC through the Envoy front door: both RPCs, health, reflection (grpcurl), deadlines, TLS,
the access log and the metrics listener."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.integration.test_grpcurl import GRPCURL
from tests.support.servers import collect, kinds, read_until_error, text_of
from tests.system.conftest import FrontDoor, front_door
from tests.system.front_door import grpc_web_frame, parse_grpc_web, prometheus_value, self_signed_cert


async def test_stream_chat_through_envoy_is_logged_with_trace_and_upstream(door: FrontDoor) -> None:
    call = door.stub.StreamChat(
        agent_pb2.ChatRequest(content="what is 5+5"), metadata=(("x-session-id", "envoy-log"),), timeout=30
    )
    responses = await collect(call)
    assert kinds(responses)[:2] == ["tool_use", "tool_result"]
    assert kinds(responses)[-1] == "done"
    assert "10" in text_of(responses)
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert {r.session_id for r in responses} == {"envoy-log"}

    (entry,) = await door.envoy.access_log_of("/agent.AgentService/StreamChat")
    assert entry["grpc_status"] == "OK" and entry["grpc_status_code"] == 0
    assert entry["upstream_host"] == door.agent.target
    assert entry["session_id"] == "envoy-log"
    assert re.fullmatch(r"[0-9a-f]{32}", entry["trace_id"])
    assert entry["traceparent"].split("-")[1] == entry["trace_id"]
    assert int(entry["grpc_messages"]["response_message_count"]) == len(responses)
    assert int(entry["grpc_messages"]["request_message_count"]) == 1
    assert isinstance(entry["duration_ms"], int) and entry["protocol"] == "HTTP/2"


async def test_an_incoming_traceparent_is_continued(door: FrontDoor) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    await collect(door.stub.StreamChat(agent_pb2.ChatRequest(content="hi"), metadata=(("traceparent", traceparent),)))
    (entry,) = await door.envoy.access_log_of("/agent.AgentService/StreamChat")
    assert entry["trace_id"] == trace_id


async def test_bidirectional_chat_through_envoy(door: FrontDoor) -> None:
    call = door.stub.BidirectionalChat(timeout=30)
    await call.write(agent_pb2.ChatRequest(content="first question"))
    await call.write(agent_pb2.ChatRequest(content="what is 6*7"))
    await call.done_writing()
    responses = await collect(call)
    assert [r.turn for r in responses if r.WhichOneof("response") == "done"] == [1, 2]
    second = [r for r in responses if r.turn == 2]
    assert "42" in text_of(second)
    assert await call.code() == grpc.StatusCode.OK


async def test_health_through_envoy(door: FrontDoor) -> None:
    stub = health_pb2_grpc.HealthStub(door.channel)
    for service in ("", "agent.AgentService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_health_watch_with_a_deadline_ends_deadline_exceeded_through_envoy(door: FrontDoor) -> None:
    """Envoy enforces the deadline too; a stream it resets reaches the client as INTERNAL (a third of the
    time, before the service ended its Watch a margin before the deadline)."""
    stub = health_pb2_grpc.HealthStub(door.channel)
    request = health_pb2.HealthCheckRequest(service="agent.AgentService")

    async def watch() -> grpc.StatusCode:
        call = stub.Watch(request, timeout=0.3)
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = [await watch() for _ in range(30)]
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes


async def test_a_client_deadline_ends_with_deadline_exceeded(tmp_path: Path) -> None:
    """Repeated on purpose: Envoy enforces grpc-timeout too, and if its stream reset won the race
    (the agent's AGENT_DEADLINE_MARGIN_MS set to 0 shows it) some calls would end INTERNAL instead."""
    async with front_door(tmp_path, demo_token_delay_ms=40, demo_reply_words=100) as door:
        full_answer_s = 100 * 0.040
        for _ in range(6):
            started = time.monotonic()
            call = door.stub.StreamChat(agent_pb2.ChatRequest(content="tell me a long story"), timeout=0.3)
            responses, error = await read_until_error(call)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert "content" in kinds(responses)  # the answer was streaming when the deadline hit
            assert time.monotonic() - started < full_answer_s / 2


async def test_the_deadline_header_reaches_the_agent_and_ends_the_stream_cleanly(tmp_path: Path) -> None:
    """A gRPC-Web client has no timer of its own: only the forwarded grpc-timeout can end the call,
    and it must end with DEADLINE_EXCEEDED in the trailer frame, not a cut connection."""
    async with front_door(tmp_path, demo_token_delay_ms=40, demo_reply_words=100) as door:
        request = agent_pb2.ChatRequest(content="tell me a long story").SerializeToString()
        async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
            started = time.monotonic()
            response = await client.post(
                "/agent.AgentService/StreamChat",
                content=grpc_web_frame(request),
                headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "grpc-timeout": "400m"},
            )
            elapsed = time.monotonic() - started
        messages, trailers = parse_grpc_web(response.content)
        assert trailers.get("grpc-status") == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert messages, "nothing streamed before the deadline"
        assert elapsed < 100 * 0.040 / 2


async def grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_grpcurl_lists_describes_and_streams_through_envoy(door: FrontDoor) -> None:
    target = door.envoy.target
    code, out, err = await grpcurl("-plaintext", target, "list")
    assert code == 0, err
    assert {"agent.AgentService", "grpc.health.v1.Health"} <= set(out.split())

    code, out, err = await grpcurl("-plaintext", target, "describe", "agent.AgentService")
    assert code == 0, err
    assert "rpc StreamChat ( .agent.ChatRequest ) returns ( stream .agent.ChatResponse )" in out

    request = json.dumps({"content": "what is 5+5"})
    code, out, err = await grpcurl("-plaintext", "-d", request, target, "agent.AgentService/StreamChat")
    assert code == 0, err
    events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert events[0]["tool_use"]["tool_name"] == "calculator"
    assert events[-1]["done"]["stop_reason"] == "end_turn"

    (entry,) = await door.envoy.access_log_of("/agent.AgentService/StreamChat")
    assert entry["grpc_status"] == "OK" and entry["user_agent"].startswith("grpcurl/")
    assert await door.envoy.access_log_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", count=3)


async def test_the_tls_listener_serves_grpc_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls_vars = {"ENVOY_TLS": "on", "ENVOY_TLS_CERT": str(cert), "ENVOY_TLS_KEY": str(key)}
    async with front_door(tmp_path, envoy_vars=tls_vars) as door:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(door.envoy.tls_target, credentials) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            responses = await collect(stub.StreamChat(agent_pb2.ChatRequest(content="hello over tls"), timeout=30))
        assert kinds(responses)[-1] == "done"

        # A client that does not trust the certificate is refused.
        async with grpc.aio.secure_channel(door.envoy.tls_target, grpc.ssl_channel_credentials()) as channel:
            _, error = await read_until_error(
                agent_pb2_grpc.AgentServiceStub(channel).StreamChat(agent_pb2.ChatRequest(content="hi"), timeout=5)
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE

        (entry,) = await door.envoy.access_log_of("/agent.AgentService/StreamChat")
        assert entry["tls_version"] in ("TLSv1.2", "TLSv1.3")


async def test_the_metrics_listener_exposes_prometheus_stats_and_nothing_else_of_the_admin(door: FrontDoor) -> None:
    responses = await collect(door.stub.StreamChat(agent_pb2.ChatRequest(content="count me"), timeout=30))
    async with httpx.AsyncClient(base_url=door.envoy.metrics_url, timeout=10) as client:
        # Stats are flushed to the admin periodically; wait for the per-method counters.
        deadline = time.monotonic() + 10
        while True:
            metrics = (await client.get("/stats/prometheus")).text
            total = prometheus_value(
                metrics,
                "envoy_cluster_grpc_total",
                {
                    "envoy_cluster_name": "agent",
                    "envoy_grpc_bridge_service": "agent.AgentService",
                    "envoy_grpc_bridge_method": "StreamChat",
                },
            )
            if total or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert total == 1, [line for line in metrics.splitlines() if "grpc" in line][:40]
        labels = {"envoy_grpc_bridge_service": "agent.AgentService", "envoy_grpc_bridge_method": "StreamChat"}
        assert prometheus_value(metrics, "envoy_cluster_grpc_response_message_count", labels) == len(responses)
        assert prometheus_value(metrics, "envoy_cluster_membership_healthy", {"envoy_cluster_name": "agent"}) == 1
        assert (await client.get("/ready")).status_code == 200
        for admin_only in ("/clusters", "/config_dump", "/quitquitquit", "/healthcheck/fail"):
            assert (await client.get(admin_only)).status_code == 404
            assert (await client.post(admin_only)).status_code == 404
