"""Replicas as real processes sharing a store: a crash mid-answer loses no turn, and two processes on one
data directory take turns on a session without losing one.

The model is a fake OpenAI-compatible provider that records what it is sent, so the
assertions are about what a provider with strict role alternation would receive.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import grpc
import pytest
from redis import Redis

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.fake_provider import StreamingProvider, streaming_provider
from tests.support.processes import CHANNEL_READY_S, service_process
from tests.support.redis_server import redis_server
from tests.support.servers import collect, read_until_error

# The service (or its client) as real processes: the system tier, not the edit loop's.
pytestmark = pytest.mark.system

LEASE_S = 2.0


def _env(provider: StreamingProvider, store: str, data_dir: Path) -> dict[str, str]:
    return {
        "AGENT_MODEL_PROVIDER": "openai",
        "AGENT_OPENAI_BASE_URL": provider.url,
        "AGENT_OPENAI_API_KEY": "unused",
        "AGENT_SESSION_STORE": store,
        "AGENT_SESSION_LEASE_S": str(LEASE_S),
        "AGENT_DATA_DIR": str(data_dir),
    }


def _alternates(history: list[tuple[str, str]]) -> bool:
    return all(a[0] != b[0] for a, b in itertools.pairwise(history))


async def _stub(channel: grpc.aio.Channel) -> agent_pb2_grpc.AgentServiceStub:
    await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_S)
    return agent_pb2_grpc.AgentServiceStub(channel)


async def test_a_replica_killed_mid_answer_loses_no_turn_and_frees_the_session_within_the_lease(
    tmp_path: Path,
) -> None:
    with (
        redis_server(tmp_path / "redis") as redis,
        streaming_provider(words=200, delay_s=0.02) as provider,
        service_process(tmp_path / "a", **_env(provider, redis.url, tmp_path / "a")) as doomed,
        service_process(tmp_path / "b", **_env(provider, redis.url, tmp_path / "b")) as survivor,
    ):
        async with grpc.aio.insecure_channel(doomed.target) as a, grpc.aio.insecure_channel(survivor.target) as b:
            doomed_stub, survivor_stub = await _stub(a), await _stub(b)
            call = doomed_stub.StreamChat(agent_pb2.ChatRequest(content="tell me a story", session_id="kill"))
            received = ""
            while len(received.split()) < 20:  # enough for the turn's journal to have been written
                received += (await call.read()).content.text
            lease_key = "agent:{anonymous/kill}:lease"
            with Redis.from_url(redis.url) as client:
                assert client.exists(lease_key)
                doomed.process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                doomed.process.wait(timeout=10)
                while client.exists(lease_key):
                    assert time.monotonic() - killed < LEASE_S + 2, "the dead replica's lease did not expire"
                    await asyncio.sleep(0.02)
                lease_expired_after = time.monotonic() - killed
            follow_up = agent_pb2.ChatRequest(content="are you still there?", session_id="kill")
            while True:  # the dead replica's lease blocks the session until it expires
                try:
                    answer = await collect(survivor_stub.StreamChat(follow_up, timeout=30))
                    break
                except grpc.aio.AioRpcError as error:
                    refused, details = error.code(), error.details()
                if refused != grpc.StatusCode.ABORTED or time.monotonic() - killed > LEASE_S + 5:
                    raise AssertionError(f"{refused} {details} {time.monotonic() - killed:.1f} s after the kill")
                await asyncio.sleep(0.1)
            assert answer[-1].WhichOneof("response") == "done"
    print(f"the killed replica's lease expired {lease_expired_after:.2f} s after SIGKILL (lease {LEASE_S} s)")
    assert lease_expired_after <= LEASE_S + 0.5
    history = provider.histories()[-1]
    assert _alternates(history)
    assert [text for role, text in history if role == "user"] == ["tell me a story", "are you still there?"]
    partial = history[1][1]
    assert partial.endswith("[interrupted: the server stopped before the answer was complete]")
    # The journal is at most a quarter of a second behind what the client had received.
    kept = partial.split("\n\n[interrupted")[0].split()
    assert kept and received.split()[: len(kept)] == kept
    assert len(kept) >= len(received.split()) - 20


async def test_two_processes_on_one_data_directory_take_turns_without_losing_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    with (
        streaming_provider(words=20, delay_s=0.05) as provider,  # 1 s answers: the race outlasts the busy wait
        service_process(tmp_path / "a", **_env(provider, "files", data_dir)) as first,
        service_process(tmp_path / "b", **_env(provider, "files", data_dir)) as second,
    ):
        async with grpc.aio.insecure_channel(first.target) as a, grpc.aio.insecure_channel(second.target) as b:
            stubs = [await _stub(a), await _stub(b)]
            for turn in range(6):
                request = agent_pb2.ChatRequest(content=f"turn {turn}", session_id="shared")
                assert (await collect(stubs[turn % 2].StreamChat(request, timeout=30)))[-1].WhichOneof("response")
            # At once on both: the file lock lets exactly one answer.
            racing = stubs[0].StreamChat(agent_pb2.ChatRequest(content="turn 6", session_id="shared"), timeout=30)
            await racing.read()
            _, error = await read_until_error(
                stubs[1].StreamChat(agent_pb2.ChatRequest(content="too soon", session_id="shared"), timeout=30)
            )
            assert error.code() == grpc.StatusCode.ABORTED
            await collect(racing)
    last = provider.histories()[-1]
    assert [text for role, text in last if role == "user"] == [f"turn {turn}" for turn in range(7)]
    assert _alternates(last)
