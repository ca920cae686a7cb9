"""Traces: the RPC span continues the caller's trace and strands' spans nest under it."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.servers import collect, free_port, make_settings, read_until_error, running_server

PARENT_ID = "b7ad6b7169203331"


def _traceparent() -> tuple[str, tuple[tuple[str, str], ...]]:
    """A fresh trace id per call, so spans of other tests never match."""
    trace_id = secrets.token_hex(16)
    return trace_id, (("traceparent", f"00-{trace_id}-{PARENT_ID}-01"),)


@pytest.fixture
async def traced(tmp_path: Path, span_exporter: InMemorySpanExporter) -> AsyncIterator:
    span_exporter.clear()
    async with running_server(make_settings(tmp_path), traced=True) as served:
        yield served


def _tree(exporter: InMemorySpanExporter, trace_id: str) -> tuple[list[ReadableSpan], dict[int, ReadableSpan]]:
    spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    return spans, {s.context.span_id: s for s in spans}


async def _ended_tree(exporter, trace_id: str, rpc: str):
    """The trace's spans once the server span `rpc` has ended (just after the call's last message)."""
    async with asyncio.timeout(5):
        while not any(s.name == rpc for s in _tree(exporter, trace_id)[0]):  # noqa: ASYNC110 - exporter state
            await asyncio.sleep(0.01)
    return _tree(exporter, trace_id)


def _parent(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> str:
    assert span.parent is not None
    return by_id[span.parent.span_id].name


async def test_health_checks_and_reflection_are_not_traced(traced, span_exporter) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    trace_id, traceparent = _traceparent()
    await health_pb2_grpc.HealthStub(traced.channel).Check(health_pb2.HealthCheckRequest(), metadata=traceparent)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    reflect = reflection_pb2_grpc.ServerReflectionStub(traced.channel).ServerReflectionInfo(
        iter([listing]), metadata=traceparent
    )
    assert [r async for r in reflect]
    await collect(traced.stub.StreamChat(agent_pb2.ChatRequest(content="hi"), metadata=traceparent))
    spans, _ = await _ended_tree(span_exporter, trace_id, "/agent.AgentService/StreamChat")
    assert not [s.name for s in spans if "Health" in s.name or "Reflection" in s.name]


async def test_stream_chat_span_tree_continues_the_callers_trace(traced, span_exporter) -> None:
    trace_id, traceparent = _traceparent()
    request = agent_pb2.ChatRequest(content="what is 2+2", session_id="traced")
    await collect(traced.stub.StreamChat(request, metadata=traceparent))
    spans, by_id = await _ended_tree(span_exporter, trace_id, "/agent.AgentService/StreamChat")

    (rpc,) = [s for s in spans if s.name == "/agent.AgentService/StreamChat"]
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == PARENT_ID
    attributes = dict(rpc.attributes or {})
    assert attributes["rpc.method"] == "StreamChat" and attributes["rpc.service"] == "agent.AgentService"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["gen_ai.conversation.id"] == "traced"
    assert attributes["gen_ai.operation.name"] == "invoke_agent" and attributes["gen_ai.request.model"] == "demo"
    assert attributes["agent.text_chunks"] > 0 and attributes["agent.time_to_first_chunk_ms"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0

    (invoke,) = [s for s in spans if s.name.startswith("invoke_agent")]
    assert _parent(invoke, by_id) == rpc.name
    cycles = [s for s in spans if s.name == "execute_event_loop_cycle"]
    assert cycles and all(_parent(c, by_id) == invoke.name for c in cycles)
    chats = [s for s in spans if s.name == "chat"]
    assert len(chats) == 2 and all(_parent(c, by_id) == "execute_event_loop_cycle" for c in chats)
    (tool,) = [s for s in spans if s.name == "execute_tool calculator"]
    assert _parent(tool, by_id) == "execute_event_loop_cycle"
    for span in (invoke, *chats, tool):
        assert dict(span.attributes or {})["gen_ai.conversation.id"] == "traced"
    assert dict(invoke.attributes or {})["gen_ai.usage.input_tokens"] > 0


async def test_prompts_and_answers_are_not_on_spans_by_default(traced, span_exporter) -> None:
    trace_id, traceparent = _traceparent()
    secret = "my secret prompt 7*6"
    await collect(traced.stub.StreamChat(agent_pb2.ChatRequest(content=secret), metadata=traceparent))
    spans, _ = await _ended_tree(span_exporter, trace_id, "/agent.AgentService/StreamChat")
    dumped = json.dumps([json.loads(s.to_json()) for s in spans])
    assert "my secret prompt" not in dumped and "= 42" not in dumped
    assert "[REDACTED]" in dumped


async def test_bidi_has_one_agent_span_per_answered_message(traced, span_exporter) -> None:
    trace_id, traceparent = _traceparent()

    async def requests():
        for content in ("one", "two", "three"):
            yield agent_pb2.ChatRequest(content=content)

    await collect(traced.stub.BidirectionalChat(requests(), metadata=traceparent))
    spans, by_id = await _ended_tree(span_exporter, trace_id, "/agent.AgentService/BidirectionalChat")
    (rpc,) = [s for s in spans if s.name == "/agent.AgentService/BidirectionalChat"]
    answers = [s for s in spans if s.name.startswith("invoke_agent")]
    assert len(answers) == 3
    assert all(_parent(a, by_id) == rpc.name for a in answers)


async def test_failed_call_span_carries_the_status(tmp_path: Path, span_exporter: InMemorySpanExporter) -> None:
    trace_id, traceparent = _traceparent()
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=200)
    async with running_server(settings, traced=True) as served:
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content="long"), metadata=traceparent, timeout=0.3)
        _, error = await read_until_error(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    spans, _ = _tree(span_exporter, trace_id)
    (rpc,) = [s for s in spans if s.name == "/agent.AgentService/StreamChat"]
    assert dict(rpc.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP trace service, as a collector serves it: records what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.system  # the service as a process, exporting to a real OTLP receiver
async def test_spans_are_exported_over_otlp_grpc(tmp_path: Path) -> None:
    collector = _Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    otlp_port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    port = free_port()
    env = dict(
        os.environ,
        AGENT_MODEL_PROVIDER="demo",
        AGENT_DEMO_TOKEN_DELAY_MS="0",
        AGENT_GRPC_HOST="127.0.0.1",
        AGENT_GRPC_PORT=str(port),
        AGENT_METRICS_ENABLED="false",
        AGENT_DATA_DIR=str(tmp_path),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_SERVICE_NAME="agent-under-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
    )
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_service.server", env={**env, "AGENT_LOG_FORMAT": "json"}, stderr=log_file
        )
    try:
        trace_id, traceparent = _traceparent()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            await collect(stub.StreamChat(agent_pb2.ChatRequest(content="what time is it"), metadata=traceparent))
        process.send_signal(signal.SIGTERM)  # shutdown flushes the batch processor
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await receiver.stop(0)

    spans = [
        (span, resource.resource)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = {span.name for span, _ in spans if span.trace_id.hex() == trace_id}
    assert {"/agent.AgentService/StreamChat", "execute_event_loop_cycle", "chat", "execute_tool get_time"} <= names
    assert any(name.startswith("invoke_agent") for name in names)
    rpc_span = next(span for span, _ in spans if span.name == "/agent.AgentService/StreamChat")
    logs = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    (end,) = [line for line in logs if line["event"] == "call.end"]
    assert (end["trace_id"], end["span_id"]) == (trace_id, rpc_span.span_id.hex())
    assert end["status"] == "OK" and end["method"] == "StreamChat" and end["chunks"] > 0
    resource_attributes = {a.key: a.value.string_value for a in spans[0][1].attributes}
    assert resource_attributes["service.name"] == "agent-under-test"
    assert resource_attributes["deployment.environment"] == "test"
