"""Prometheus metrics after mixed traffic: every family moves as the traffic says it should."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from agent_service.proto import agent_pb2
from tests.support.servers import collect, make_settings, read_until_error, running_server


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_follow_the_traffic(tmp_path: Path, span_exporter) -> None:
    # 20 ms a word: the two slow answers (about 65 words) stream for over a second, so they are surely in flight.
    settings = make_settings(tmp_path, max_concurrent_streams=2, demo_token_delay_ms=20)
    async with running_server(settings, traced=True) as served:
        url = f"http://127.0.0.1:{served.server.metrics_endpoint.port}/metrics"
        ok = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="what is 3*3", session_id="m1")))
        await read_until_error(served.stub.StreamChat(agent_pb2.ChatRequest(content="")))
        slow = [
            served.stub.StreamChat(agent_pb2.ChatRequest(content="word " * 60, session_id=f"slow{i}")) for i in range(2)
        ]
        firsts = [await call.read() for call in slow]
        _, rejected = await read_until_error(served.stub.StreamChat(agent_pb2.ChatRequest(content="no room")))
        assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with httpx.AsyncClient() as client:
            during = _samples((await client.get(url)).text)
            assert _value(during, "agent_streams_in_flight", method="StreamChat") == 2
            answers = [ok] + [[first, *await collect(call)] for first, call in zip(firsts, slow, strict=True)]
            await asyncio.sleep(0.05)
            text = (await client.get(url)).text
            openmetrics = await client.get(url, headers={"Accept": "application/openmetrics-text"})

    samples = _samples(text)
    assert _value(samples, "agent_streams_in_flight", method="StreamChat") == 0
    assert _value(samples, "agent_streams_started_total", method="StreamChat") == 5
    finished = "agent_streams_finished_total"
    assert _value(samples, finished, method="StreamChat", code="OK", fault="none") == 3
    assert _value(samples, finished, method="StreamChat", code="INVALID_ARGUMENT", fault="client") == 1
    assert _value(samples, finished, method="StreamChat", code="RESOURCE_EXHAUSTED", fault="server") == 1
    assert _value(samples, "agent_rejected_calls_total", method="StreamChat", reason="invalid_argument") == 1
    assert _value(samples, "agent_rejected_calls_total", method="StreamChat", reason="admission") == 1
    assert _value(samples, "agent_stream_time_to_first_chunk_seconds_count", method="StreamChat", model="demo") == 3
    chunks = sum(1 for answer in answers for r in answer if r.WhichOneof("response") == "content")
    gaps = _value(samples, "agent_stream_inter_chunk_seconds_count", method="StreamChat", model="demo")
    assert gaps == chunks - 3  # one gap fewer than chunks, per answer
    assert _value(samples, "agent_stream_text_chunks_sum", method="StreamChat") == chunks
    assert _value(samples, "agent_stream_duration_seconds_count", method="StreamChat", code="OK", fault="none") == 3
    assert _value(samples, "agent_tool_calls_total", tool="calculator", outcome="success") == 1
    assert _value(samples, "agent_tool_duration_seconds_count", tool="calculator") == 1
    output_tokens = _value(samples, "agent_model_tokens_total", type="output", model="demo")
    assert output_tokens == sum(answer[-1].done.usage.output_tokens for answer in answers)
    assert _value(samples, "agent_model_tokens_total", type="input", model="demo") > 0
    assert _value(samples, "agent_sessions_active") == 3
    assert _value(samples, "agent_streams_limit") == 2
    assert _value(samples, "agent_build_info", version="0.1.0", provider="demo", model="demo") == 1
    assert not any("session" in dict(labels) for _, labels in samples)  # never a session id as a label

    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert "agent_stream_time_to_first_chunk_seconds_bucket" in openmetrics.text
    assert '# {trace_id="' in openmetrics.text  # exemplars link samples to traces


async def test_healthz_follows_the_drain(tmp_path: Path) -> None:
    """The container health check's endpoint: 200 SERVING until the drain, then 503."""
    async with running_server(make_settings(tmp_path)) as served:
        url = f"http://127.0.0.1:{served.server.metrics_endpoint.port}/healthz"
        async with httpx.AsyncClient() as client:
            serving = await client.get(url)
            assert (serving.status_code, serving.text.strip()) == (200, "SERVING")
            served.server.core.begin_drain()
            draining = await client.get(url)
            assert (draining.status_code, draining.text.strip()) == (503, "NOT_SERVING")


async def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, metrics_enabled=False)) as served:
        assert served.server.metrics_endpoint is None
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="still works")))
        assert responses[-1].WhichOneof("response") == "done"
