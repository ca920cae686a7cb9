"""The `agent-service` console script as a real process: start-up, SIGTERM drain, exit code, its log lines,
and an event loop that stays responsive while a provider floods it."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.processes import CHANNEL_READY_S, service_process
from tests.support.servers import collect, kinds, read_until_error

# The service (or its client) as real processes: the system tier, not the edit loop's.
pytestmark = pytest.mark.system

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def _ready(channel: grpc.aio.Channel) -> None:
    await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_S)


@pytest.mark.parametrize(
    ("reply_words", "expected"),
    [(20, "done"), (1000, grpc.StatusCode.UNAVAILABLE)],
    ids=["finishes-within-grace", "cancelled-after-grace"],
)
async def test_sigterm_drains_then_exits_zero(tmp_path: Path, reply_words: int, expected) -> None:
    with service_process(tmp_path) as service:
        process, target = service.process, service.target
        async with grpc.aio.insecure_channel(target) as channel:
            await _ready(channel)
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            # The demo model echoes the prompt, so a long prompt makes a long answer.
            call = stub.StreamChat(agent_pb2.ChatRequest(content="word " * reply_words))
            await call.read()
            process.send_signal(signal.SIGTERM)
            if expected == "done":
                assert kinds(await collect(call))[-1] == "done"
            else:
                _, error = await read_until_error(call)
                assert error.code() == expected
        assert process.wait(timeout=15) == 0


async def test_an_undecodable_request_is_logged_like_any_call_without_a_traceback(tmp_path: Path) -> None:
    with service_process(tmp_path) as service:
        process, target = service.process, service.target
        async with grpc.aio.insecure_channel(target) as channel:
            await _ready(channel)
            raw = channel.unary_stream("/agent.AgentService/StreamChat")
            _, error = await read_until_error(raw(b"\x0a\x02\xff\xfe"))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        logged = service.log.read_text()
    assert "Traceback" not in logged
    lines = [json.loads(line) for line in logged.splitlines()]  # every line is JSON
    ends = [line for line in lines if line.get("event") == "call.end"]
    assert [(end["method"], end["status"], end["fault"]) for end in ends] == [
        ("StreamChat", "INVALID_ARGUMENT", "client")
    ]


def _health_latencies(target: str, stop: threading.Event, latencies: list[float]) -> Callable[[], None]:
    def run() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="agent.AgentService")
            while not stop.is_set():
                started = time.monotonic()
                stub.Check(request, timeout=30)
                latencies.append(time.monotonic() - started)
                stop.wait(0.02)

    return run


def test_a_buffered_provider_does_not_starve_health_checks(tmp_path: Path) -> None:
    """A 100,000-word answer handed over without a pause (demo model, no delay) while health checks run.

    The answer is read by grpcurl in a process of its own and the checks come from a
    thread of this one, so what is measured is the service's own event loop.
    """
    settings = {"AGENT_DEMO_TOKEN_DELAY_MS": "0", "AGENT_DEMO_REPLY_WORDS": "100000", "AGENT_MAX_TOKENS": "200000"}
    with service_process(tmp_path, **settings) as service:
        target = service.target
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_S)
        stop, latencies = threading.Event(), []
        checker = threading.Thread(target=_health_latencies(target, stop, latencies))
        checker.start()
        try:
            flood = subprocess.run(
                [GRPCURL, "-plaintext", "-d", '{"content": "flood"}', target, "agent.AgentService/StreamChat"],
                capture_output=True,
                timeout=120,
                check=True,
            )
        finally:
            stop.set()
            checker.join(timeout=30)
    assert flood.stdout.count(b'"done"') == 1
    assert len(latencies) >= 5, "the answer ended before the health checks could measure anything"
    assert max(latencies) < 0.5, f"a health check waited {max(latencies):.2f} s behind the answer"
