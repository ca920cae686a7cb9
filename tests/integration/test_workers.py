"""`AGENT_WORKERS=2`: a supervisor and two worker processes on one port, as real processes.

Connections (not calls) are spread by the kernel, so every test opens channels of their own
(`grpc.use_local_subchannel_pool`: one connection each) until both workers answered, and tells
which worker served a call from the `worker` field of its `call.end` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.fake_provider import StreamingProvider, streaming_provider
from tests.support.processes import CHANNEL_READY_S, ServiceProcess, service_process
from tests.support.servers import collect, free_port, kinds, read_until_error

# The service (or its client) as real processes: the system tier, not the edit loop's.
pytestmark = pytest.mark.system

START_S = 60  # the group's start-up: two workers building their server
MAX_CHANNELS = 40  # each new connection lands on either worker: 2**-39 to miss one


def _lines(service: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.log.read_text().splitlines() if line.strip()]


async def _until(found: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `found()` until it returns something other than None; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (value := found()) is None:
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.02)
    return value


async def _group_started(service: ServiceProcess) -> dict[str, Any]:
    """The supervisor's `server.start` line: written once every worker serves."""

    def started() -> dict[str, Any] | None:
        assert service.process.poll() is None, service.log.read_text()[-3000:]
        return next((line for line in _lines(service) if line["event"] == "server.start" and "workers" in line), None)

    return dict(await _until(started, START_S, "the group's server.start"))


async def _served_by(service: ServiceProcess, session_id: str) -> int:
    """The worker whose call.end line carries `session_id` (the line can follow the client's end of the call)."""

    def worker() -> int | None:
        ends = [line for line in _lines(service) if line["event"] == "call.end"]
        mine = [line for line in ends if line.get("session_id") == session_id]
        return mine[-1]["worker"] if mine else None

    return int(await _until(worker, 10, f"call.end of {session_id}"))


@contextlib.asynccontextmanager
async def _channels_on_both_workers(
    service: ServiceProcess, target: str, prompt: str = "probe"
) -> AsyncIterator[tuple[dict[int, list[agent_pb2_grpc.AgentServiceStub]], int]]:
    """Channels, each its own connection, grouped by the worker serving them; and the number of probe calls made.

    Each new channel answers one probe call on a session of its own, until both workers have one.
    """
    channels: list[grpc.aio.Channel] = []
    by_worker: dict[int, list[agent_pb2_grpc.AgentServiceStub]] = {}
    try:
        for number in itertools.count():
            assert number < MAX_CHANNELS, f"{MAX_CHANNELS} connections all landed on worker {list(by_worker)}"
            channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_S)
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            session_id = f"probe-{number}"
            answer = await collect(stub.StreamChat(agent_pb2.ChatRequest(content=prompt, session_id=session_id)))
            assert kinds(answer)[-1] == "done"
            by_worker.setdefault(await _served_by(service, session_id), []).append(stub)
            if len(by_worker) == 2:
                yield by_worker, number + 1
                return
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def _workers_env(**extra: str) -> dict[str, str]:
    return {"AGENT_WORKERS": "2", "AGENT_METRICS_PORT": str(free_port()), **extra}


async def test_calls_on_several_connections_land_on_both_workers_and_the_supervisor_counts_them_all(
    tmp_path: Path,
) -> None:
    # AGENT_GRPC_PORT=0: the supervisor picks one free port and both workers bind it.
    env = _workers_env(AGENT_GRPC_PORT="0", AGENT_DEMO_TOKEN_DELAY_MS="0")
    with service_process(tmp_path, **env) as service:
        started = await _group_started(service)
        assert started["workers"] == 2 and len(set(started["pids"])) == 2
        target = f"127.0.0.1:{started['port']}"
        async with _channels_on_both_workers(service, target) as (by_worker, calls):
            assert set(by_worker) == {0, 1}
            base = f"http://127.0.0.1:{started['metrics_port']}"
            async with httpx.AsyncClient() as client:
                health = await client.get(f"{base}/healthz")
                assert (health.status_code, health.text.strip()) == (200, "SERVING")

                async def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                    return _samples((await client.get(f"{base}/metrics")).text)

                samples = await scraped()
                # Each worker holds the probe sessions it served; it reports them every heartbeat.
                deadline = time.monotonic() + 5
                while _total(samples, "agent_sessions_active") != calls and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    samples = await scraped()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
        lines = _lines(service)

    ends = [line for line in lines if line["event"] == "call.end"]
    assert len(ends) == calls and {line["worker"] for line in ends} == {0, 1}
    assert {line["pid"] for line in lines if line["event"] == "worker.start"} == set(started["pids"])
    assert _total(samples, "agent_streams_started_total") == calls
    assert _total(samples, "agent_streams_finished_total") == calls
    assert _value(samples, "agent_streams_finished_total", method="StreamChat", code="OK", fault="none") == calls
    assert _total(samples, "agent_stream_duration_seconds_count") == calls
    assert _total(samples, "agent_streams_in_flight") == 0
    assert _total(samples, "agent_sessions_active") == calls
    assert _total(samples, "agent_streams_limit") == 2 * 1000  # each worker admits its own AGENT_MAX_CONCURRENT_STREAMS
    assert _value(samples, "agent_build_info", version="0.1.0", provider="demo", model="demo") == 1
    assert _total(samples, "process_resident_memory_bytes") > 0  # the group's, summed
    assert "Traceback" not in service.log.read_text()


def _openai_env(provider: StreamingProvider, data_dir: Path) -> dict[str, str]:
    return _workers_env(
        AGENT_MODEL_PROVIDER="openai",
        AGENT_OPENAI_BASE_URL=provider.url,
        AGENT_OPENAI_API_KEY="unused",
        AGENT_SESSION_STORE="files",
        AGENT_DATA_DIR=str(data_dir),
    )


async def test_the_files_store_lease_holds_across_workers_and_no_turn_is_lost(tmp_path: Path) -> None:
    with (
        streaming_provider(words=20, delay_s=0.05) as provider,  # 1 s answers: the race outlasts the busy wait
        service_process(tmp_path, **_openai_env(provider, tmp_path / "data")) as service,
    ):
        await _group_started(service)
        async with _channels_on_both_workers(service, service.target) as (by_worker, _):
            stubs = [by_worker[0][0], by_worker[1][0]]
            for turn in range(6):
                request = agent_pb2.ChatRequest(content=f"turn {turn}", session_id="shared")
                assert kinds(await collect(stubs[turn % 2].StreamChat(request, timeout=30)))[-1] == "done"
                assert await _served_by(service, "shared") == turn % 2
            # At once on both workers: the files store's lock lets exactly one answer.
            racing = stubs[0].StreamChat(agent_pb2.ChatRequest(content="turn 6", session_id="shared"), timeout=30)
            await racing.read()
            _, error = await read_until_error(
                stubs[1].StreamChat(agent_pb2.ChatRequest(content="too soon", session_id="shared"), timeout=30)
            )
            assert error.code() == grpc.StatusCode.ABORTED
            assert kinds(await collect(racing))[-1] == "done"
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    last = provider.histories()[-1]
    assert [text for role, text in last if role == "user"] == [f"turn {turn}" for turn in range(7)]
    assert all(a[0] != b[0] for a, b in itertools.pairwise(last))  # every answer kept between its prompts


async def test_sigterm_drains_every_worker_then_the_group_exits_zero(tmp_path: Path) -> None:
    with service_process(tmp_path, **_workers_env()) as service:
        started = await _group_started(service)
        async with _channels_on_both_workers(service, service.target) as (by_worker, _):
            # One answer of about 1 s in flight on each worker (the demo model echoes the prompt, 20 ms a word).
            calls = [
                by_worker[worker][0].StreamChat(agent_pb2.ChatRequest(content="word " * 40), timeout=30)
                for worker in (0, 1)
            ]
            for call in calls:
                await call.read()
            service.process.send_signal(signal.SIGTERM)
            for call in calls:
                assert kinds(await collect(call))[-1] == "done"
        assert service.process.wait(timeout=30) == 0
        lines = _lines(service)
    drains = [line for line in lines if line["event"] == "server.drain"]
    assert sorted(line["worker"] for line in drains if "worker" in line) == [0, 1]
    assert {line["streams_in_flight"] for line in drains if "worker" in line} == {1}
    assert lines[-1]["event"] == "server.stop" and lines[-1]["clean"] is True
    for pid in started["pids"]:
        assert not psutil.pid_exists(pid), f"worker {pid} outlived the group"
    assert not Path(started["metrics_dir"]).exists()  # the workers' metric files go with the group


async def test_a_killed_worker_is_restarted_and_health_returns(tmp_path: Path) -> None:
    with service_process(tmp_path, **_workers_env(AGENT_DEMO_TOKEN_DELAY_MS="0")) as service:
        started = await _group_started(service)
        healthz = f"http://127.0.0.1:{started['metrics_port']}/healthz"
        async with httpx.AsyncClient() as client:
            assert (await client.get(healthz)).status_code == 200
            doomed = started["pids"][0]
            psutil.Process(doomed).send_signal(signal.SIGKILL)

            async def status(code: int) -> bool:
                return (await client.get(healthz)).status_code == code

            async def until_status(code: int, timeout_s: float) -> None:
                deadline = time.monotonic() + timeout_s
                while not await status(code):
                    assert time.monotonic() < deadline, f"/healthz did not answer {code} within {timeout_s} s"
                    await asyncio.sleep(0.02)

            await until_status(503, 5)  # the group is short of a worker
            await until_status(200, 30)  # ... until its replacement serves
        lines = _lines(service)
        exits = [line for line in lines if line["event"] == "worker.exit"]
        assert [(line["pid"], line["exit"]) for line in exits] == [(doomed, "SIGKILL")]
        restarted = [line for line in lines if line["event"] == "worker.start" and line["worker"] == 0]
        assert len(restarted) == 2 and restarted[-1]["pid"] != doomed
        async with _channels_on_both_workers(service, service.target) as (by_worker, _):
            assert set(by_worker) == {0, 1}  # the new worker 0 takes connections
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0


def test_a_port_taken_by_another_program_fails_the_group_at_once(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        with service_process(tmp_path, **_workers_env(AGENT_GRPC_PORT=port)) as service:
            assert service.process.wait(timeout=30) == 1
            lines = _lines(service)
    assert [line["event"] for line in lines] == ["server.failed"]
    assert "Traceback" not in service.log.read_text()
