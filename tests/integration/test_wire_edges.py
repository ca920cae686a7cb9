"""What careless clients, attackers and misbehaving providers do at the wire, and the status each gets.

Every case here once broke a rule of the service: an undecodable request answered
UNKNOWN (or silently dropped in a bidi stream), a client-cancelled stream counted
as OK, a client's think time counted as latency, throttling retried until the
deadline, a stream outliving its cap behind a client that stopped reading, an idle
watcher holding the shutdown, a buffered provider starving health checks
(that one runs the service as a process: `test_process.py`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.proto import agent_pb2
from agent_service.server import AgentServer
from tests.support.doubles import BigChunkModel, HangingModel
from tests.support.fake_provider import failing_provider
from tests.support.servers import Running, collect, kinds, make_settings, read_until_error, running_server

STREAM_CHAT = "/agent.AgentService/StreamChat"
BIDI_CHAT = "/agent.AgentService/BidirectionalChat"
UNDECODABLE = {
    "invalid-utf8": b"\x0a\x02\xff\xfe",
    "truncated": b"\x0a\x10hi",
    "garbage": b"\xff\xff\xff\xff",
}


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _metrics(running: Running) -> str:
    endpoint = running.server.metrics_endpoint
    assert endpoint is not None
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{endpoint.port}/metrics")).text


async def _until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - server state with no event to wait on
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_an_undecodable_request_is_invalid_argument_and_counted(served: Running, payload: bytes) -> None:
    raw = served.channel.unary_stream(STREAM_CHAT, response_deserializer=agent_pb2.ChatResponse.FromString)
    responses, error = await read_until_error(raw(payload))
    assert responses == []
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is not a valid agent.ChatRequest" in (error.details() or "")
    await _until(lambda: served.server.admission.in_flight == 0)
    text = await _metrics(served)
    finished = "agent_streams_finished_total"
    assert _metric(text, finished, method="StreamChat", code="INVALID_ARGUMENT", fault="client") == 1
    assert _metric(text, "agent_rejected_calls_total", method="StreamChat", reason="invalid_argument") == 1


async def test_an_undecodable_message_mid_bidi_gets_an_error_event_and_the_stream_goes_on(served: Running) -> None:
    raw = served.channel.stream_stream(BIDI_CHAT, response_deserializer=agent_pb2.ChatResponse.FromString)

    async def messages() -> AsyncIterator[bytes]:
        yield agent_pb2.ChatRequest(content="first").SerializeToString()
        yield UNDECODABLE["invalid-utf8"]
        yield agent_pb2.ChatRequest(content="third").SerializeToString()
        yield agent_pb2.ChatRequest(content="fourth").SerializeToString()

    call = raw(messages())
    responses = await collect(call)
    assert await call.code() == grpc.StatusCode.OK
    ends = [(r.turn, r.WhichOneof("response")) for r in responses if r.WhichOneof("response") in ("done", "error")]
    assert ends == [(1, "done"), (2, "error"), (3, "done"), (4, "done")]  # 4 sent, 3 answered, 1 refused
    refused = next(r for r in responses if r.WhichOneof("response") == "error")
    assert refused.error.code == "INVALID_ARGUMENT" and "not a valid agent.ChatRequest" in refused.error.message


async def test_client_cancelled_streams_are_never_counted_ok(tmp_path: Path) -> None:
    """Each call is cancelled after its first event, while the server is still writing words."""
    calls = 120
    settings = make_settings(tmp_path, demo_token_delay_ms=0, demo_reply_words=3000, coalesce_text=False)
    async with running_server(settings) as served:

        async def cancel_after_first_event() -> None:
            call = served.stub.StreamChat(agent_pb2.ChatRequest(content="go"))
            await call.read()
            call.cancel()

        for _ in range(calls // 10):
            await asyncio.gather(*(cancel_after_first_event() for _ in range(10)))
        await _until(lambda: served.server.admission.in_flight == 0, 10)
        text = await _metrics(served)
    finished = "agent_streams_finished_total"
    assert _metric(text, finished, method="StreamChat", code="OK") == 0
    assert _metric(text, finished, method="StreamChat", code="CANCELLED", fault="client") == calls


async def test_bidi_time_to_first_chunk_excludes_the_clients_think_time(served: Running) -> None:
    requests: asyncio.Queue[agent_pb2.ChatRequest | None] = asyncio.Queue()

    async def messages() -> AsyncIterator[agent_pb2.ChatRequest]:
        while (request := await requests.get()) is not None:
            yield request

    call = served.stub.BidirectionalChat(messages())
    await _until(lambda: served.server.admission.in_flight == 1)
    await asyncio.sleep(1.0)  # the client thinks before its first message: that is the scenario, not a wait
    await requests.put(agent_pb2.ChatRequest(content="hello"))
    await requests.put(None)
    responses = await collect(call)
    assert kinds(responses)[-1] == "done"
    text = await _metrics(served)
    ttfc = "agent_stream_time_to_first_chunk_seconds"
    assert _metric(text, ttfc + "_count", method="BidirectionalChat") == 1
    assert _metric(text, ttfc + "_sum", method="BidirectionalChat") < 0.5


async def test_a_throttling_provider_is_unavailable_promptly_with_one_retry_layer(tmp_path: Path) -> None:
    with failing_provider(429) as provider:
        retries = {"provider_retry_delay_s": 1, "provider_max_attempts": 3}
        settings = make_settings(tmp_path, model_provider="openai", openai_base_url=provider.url,
                                 openai_api_key="unused", **retries)  # fmt: skip
        async with running_server(settings) as served:
            hi = agent_pb2.ChatRequest(content="hi")
            await read_until_error(served.stub.StreamChat(hi, timeout=30))  # warm-up: the SDK's first call is slow
            provider.requests.clear()
            started = time.monotonic()
            seen, error = await read_until_error(served.stub.StreamChat(hi, timeout=30))
            elapsed = time.monotonic() - started
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "ModelThrottledException" in (error.details() or "")
            assert kinds(seen) == ["error"]
            assert len(provider.requests) == 3  # strands' attempts only: the SDK's own retries are off
            assert elapsed < 6  # back-off 1 s + 2 s, not the 30 s deadline

            provider.requests.clear()
            seen, error = await read_until_error(served.stub.StreamChat(hi, timeout=1.5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # a retry that would outlast the deadline is not made
            assert len(provider.requests) == 2


async def test_a_retry_right_after_a_deadline_waits_for_the_wind_down_instead_of_aborted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, cancel_grace_s=0.5)
    async with running_server(settings, model=HangingModel(hang_calls=1)) as served:
        request = agent_pb2.ChatRequest(content="hello", session_id="retry")
        _, error = await read_until_error(served.stub.StreamChat(request, timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="again", session_id="retry")))
        assert kinds(responses)[-1] == "done"


async def test_the_server_cap_holds_when_the_client_stops_reading(tmp_path: Path) -> None:
    """13 MB of answer, one message read, no deadline from the client: the cap still ends the call."""
    settings = make_settings(tmp_path, max_stream_duration_s=1.5)
    async with running_server(settings, model=BigChunkModel(chunks=400, chunk_chars=32 * 1024)) as served:
        started = time.monotonic()
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content="a lot"))
        await call.read()
        await _until(lambda: served.server.admission.in_flight == 0, timeout_s=4)
        freed_after = time.monotonic() - started
        text = await _metrics(served)
        finished = "agent_streams_finished_total"
        assert _metric(text, finished, method="StreamChat", code="DEADLINE_EXCEEDED", fault="server") == 1
        assert _metric(text, finished, method="StreamChat", code="OK") == 0
        assert freed_after < 2.5
        _, error = await read_until_error(call)  # the status waited behind what was never read
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_long_client_deadline_does_not_lift_the_server_cap(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_stream_duration_s=0.5, cancel_grace_s=0.2)
    async with running_server(settings, model=HangingModel()) as served:
        started = time.monotonic()
        _, error = await read_until_error(served.stub.StreamChat(agent_pb2.ChatRequest(content="x"), timeout=1e6))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "server's maximum stream duration" in (error.details() or "")
        assert time.monotonic() - started < 3


async def test_drain_ends_idle_watches_and_idle_bidi_streams_at_once(tmp_path: Path) -> None:
    server = AgentServer(make_settings(tmp_path, shutdown_grace_s=5))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="agent.AgentService"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        never: asyncio.Event = asyncio.Event()

        async def silent() -> AsyncIterator[agent_pb2.ChatRequest]:
            await never.wait()
            yield agent_pb2.ChatRequest(content="never sent")

        from agent_service.proto import agent_pb2_grpc

        bidi = agent_pb2_grpc.AgentServiceStub(channel).BidirectionalChat(silent())
        await _until(lambda: server.admission.in_flight == 1)
        started = time.monotonic()
        await server.stop()
        took = time.monotonic() - started
        assert took < 1.5, f"stop took {took:.2f} s with nothing but idle streams open"
        rest = []
        while (response := await watch.read()) is not grpc.aio.EOF:
            rest.append(response.status)
        assert rest == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert await watch.code() == grpc.StatusCode.OK
        _, error = await read_until_error(bidi)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_a_call_arriving_during_the_drain_is_unavailable_not_cancelled(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, shutdown_grace_s=5, demo_token_delay_ms=20, demo_reply_words=40)
    server = AgentServer(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        from agent_service.proto import agent_pb2_grpc

        stub = agent_pb2_grpc.AgentServiceStub(channel)
        running = stub.StreamChat(agent_pb2.ChatRequest(content="finish me"))
        await running.read()
        stopping = asyncio.create_task(server.stop())
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="agent.AgentService")
        async with asyncio.timeout(5):  # the drain has begun once health says so
            while (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        _, error = await read_until_error(stub.StreamChat(agent_pb2.ChatRequest(content="too late")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (error.details() or "")
        assert kinds(await collect(running))[-1] == "done"  # the answer in flight finished within the grace
        await stopping
    finally:
        await channel.close()
