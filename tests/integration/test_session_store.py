"""The session stores, files and Redis (Debian's redis-server on an ephemeral port): leases, fencing,
replicas sharing conversations, crash-safe turns, store failures and restarts.

What the model receives is read from a fake OpenAI-compatible provider that records every
request, so "the history is well-formed" means what a provider with strict role
alternation would see.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strands.session import FileSessionManager
from strands.types.session import SessionAgent, SessionMessage

from agent_service.proto import agent_pb2
from agent_service.store import ANONYMOUS, FileStore, RedisStore, SessionBusyError, SessionKey, StoreUnavailableError
from tests.support.fake_provider import StreamingProvider, streaming_provider
from tests.support.redis_server import RedisServer, redis_server
from tests.support.servers import Running, collect, make_settings, read_until_error, running_server, text_of

KEY = SessionKey(ANONYMOUS, "s1")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def provider() -> Iterator[StreamingProvider]:
    with streaming_provider(words=4) as fake:
        yield fake


def settings_for(tmp_path: Path, store: str, provider: StreamingProvider, **overrides: Any) -> Any:
    return make_settings(tmp_path / "data", session_store=store, model_provider="openai", openai_base_url=provider.url,
                         openai_api_key="unused", **overrides)  # fmt: skip


@asynccontextmanager
async def replicas(count: int, settings: Any) -> AsyncIterator[list[Running]]:
    """`count` servers sharing one store (and, for the files store, one data directory)."""
    async with running_server(settings) as first:
        if count == 1:
            yield [first]
            return
        async with replicas(count - 1, settings) as rest:
            yield [first, *rest]


def ask(running: Running, content: str, session_id: str = "conv", **kwargs: Any) -> Any:
    return running.stub.StreamChat(agent_pb2.ChatRequest(content=content, session_id=session_id), **kwargs)


def alternates(history: list[tuple[str, str]]) -> bool:
    return all(a[0] != b[0] for a, b in itertools.pairwise(history)) and history[0][0] == "user"


# --- the lease ---------------------------------------------------------------------------------------------------


async def test_a_lease_is_exclusive_until_released(store_url: str, tmp_path: Path) -> None:
    store = FileStore(tmp_path) if store_url == "files" else RedisStore(store_url, lease_s=5)
    try:
        first = await store.lease(KEY)
        started = time.monotonic()
        with pytest.raises(SessionBusyError, match="busy"):
            await store.lease(KEY)
        assert time.monotonic() - started < 1  # refused at once, not queued
        other = await store.lease(SessionKey(ANONYMOUS, "s2"))  # another session is independent
        await other.release()
        await first.write("k", b"v1")
        await first.release()
        with pytest.raises(StoreUnavailableError, match="after its lease was released"):
            await first.write("k", b"v2")
        second = await store.lease(KEY)
        assert await second.read("k") == b"v1"
        await second.release()
    finally:
        await store.aclose()


async def test_a_write_with_an_expired_lease_is_fenced_off(redis: RedisServer) -> None:
    """A replica that paused past its lease cannot overwrite the turn of the one that took over."""
    store = RedisStore(redis.url, lease_s=0.3)
    try:
        paused = await store.lease(KEY)
        paused._renewal.cancel()  # type: ignore[attr-defined]  # the process stops renewing (a long GC pause)
        lost: list[bool] = []
        paused.on_lost(lambda: lost.append(True))
        async with asyncio.timeout(5):
            while True:
                try:
                    taker = await store.lease(KEY)
                    break
                except SessionBusyError:
                    await asyncio.sleep(0.05)
        await taker.write("snapshot", b"the new turn")
        with pytest.raises(StoreUnavailableError, match=r"lease .* was lost"):
            await paused.write("snapshot", b"the stale turn")
        assert lost == [True]
        assert await taker.read("snapshot") == b"the new turn"
        await taker.release()
    finally:
        await store.aclose()


async def test_a_lapsed_lease_nobody_took_is_taken_back(redis: RedisServer) -> None:
    """A holder whose event loop stalled past its lease keeps its turn when nobody else was granted the session."""
    store = RedisStore(redis.url, lease_s=0.3)
    try:
        stalled = await store.lease(KEY)
        stalled._renewal.cancel()  # type: ignore[attr-defined]
        async with asyncio.timeout(5):
            lease_key = f"agent:{{{KEY.owner}/{KEY.session_id}}}:lease"
            while await store.call(lambda client: client.exists(lease_key)):  # noqa: ASYNC110 - Redis state
                await asyncio.sleep(0.05)
        await stalled.write("snapshot", b"still mine")  # takes the lease back
        with pytest.raises(SessionBusyError):
            await store.lease(KEY)
        assert await stalled.read("snapshot") == b"still mine"
        await stalled.release()
    finally:
        await store.aclose()


# --- replicas ----------------------------------------------------------------------------------------------------


async def test_one_conversation_alternates_replicas_and_the_model_sees_all_of_it(
    store_url: str, tmp_path: Path, provider: StreamingProvider
) -> None:
    async with replicas(2, settings_for(tmp_path, store_url, provider)) as servers:
        for turn in range(6):
            responses = await collect(ask(servers[turn % 2], f"turn {turn}"))
            assert responses[-1].WhichOneof("response") == "done"
    histories = provider.histories()
    assert len(histories) == 6
    for turn, history in enumerate(histories):
        assert [text for role, text in history if role == "user"] == [f"turn {i}" for i in range(turn + 1)]
        assert alternates(history)


async def test_the_same_session_on_two_replicas_at_once_answers_one_and_aborts_the_other(
    store_url: str, tmp_path: Path
) -> None:
    with streaming_provider(words=30, delay_s=0.02) as provider:
        async with replicas(2, settings_for(tmp_path, store_url, provider)) as (first, second):
            running = ask(first, "a long answer")
            await running.read()
            _, error = await read_until_error(ask(second, "me too"))
            assert error.code() == grpc.StatusCode.ABORTED
            assert "busy" in (error.details() or "")
            assert (await collect(running))[-1].WhichOneof("response") == "done"
            assert (await collect(ask(second, "my turn now")))[-1].WhichOneof("response") == "done"


async def test_after_a_provider_failure_the_next_turn_sends_an_alternating_history(
    store_url: str, tmp_path: Path, provider: StreamingProvider
) -> None:
    async with replicas(1, settings_for(tmp_path, store_url, provider, provider_max_attempts=1)) as (server,):
        await collect(ask(server, "first"))
        provider.fail_next = 1
        _, error = await read_until_error(ask(server, "this one fails"))
        assert error.code() == grpc.StatusCode.INTERNAL
        await collect(ask(server, "and now?"))
    last = provider.histories()[-1]
    assert alternates(last)
    assert [text for role, text in last if role == "user"] == ["first", "this one fails", "and now?"]
    assert "[interrupted: the model provider failed]" in last[3][1]


async def test_a_cancelled_answer_keeps_what_the_client_received(store_url: str, tmp_path: Path) -> None:
    with streaming_provider(words=200, delay_s=0.01) as provider:
        async with replicas(1, settings_for(tmp_path, store_url, provider)) as (server,):
            call = ask(server, "tell me everything")
            received = ""
            while len(received.split()) < 5:
                response = await call.read()
                received += response.content.text
            call.cancel()
            await collect(ask(server, "sorry, go on"))
    history = provider.histories()[-1]
    assert alternates(history)
    partial = history[1][1]
    assert partial.startswith(received.strip()) and partial.endswith("[interrupted: the request was cancelled]")
    assert "Cancelled by user" not in partial


async def test_a_history_of_the_earlier_layout_is_carried_over_and_repaired(
    tmp_path: Path, provider: StreamingProvider
) -> None:
    """Written by FileSessionManager before turns were closed: a failed call left two prompts in a row."""
    data_dir = tmp_path / "data"
    repository = FileSessionManager(session_id="old", storage_dir=str(data_dir)).session_repository  # creates it
    repository.create_agent("old", SessionAgent(agent_id="default", state={}, conversation_manager_state={}))
    old = [("user", "hello"), ("assistant", "hi!"), ("user", "lost"), ("user", "again")]
    for index, (role, text) in enumerate(old):
        message = SessionMessage.from_message({"role": role, "content": [{"text": text}]}, index)  # type: ignore[arg-type]
        repository.create_message("old", "default", message)
    async with replicas(1, settings_for(tmp_path, "files", provider)) as (server,):
        await collect(ask(server, "still there?", session_id="old"))
    history = provider.histories()[-1]
    assert alternates(history)
    assert [text for role, text in history if role == "user"] == ["hello", "lost", "again", "still there?"]


# --- store failures ----------------------------------------------------------------------------------------------


async def test_redis_down_is_unavailable_within_a_second_and_not_ready(redis: RedisServer, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, session_store=redis.url)
    async with running_server(settings) as server:
        await collect(ask(server, "hello"))
        async with asyncio.timeout(5):  # the turn's lease is released just after its last event
            while server.server.runner.settling:  # noqa: ASYNC110 - server state, no event to wait on
                await asyncio.sleep(0.01)
        redis.stop()
        started = time.monotonic()
        _, error = await read_until_error(ask(server, "anyone there?", timeout=30))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "session store is unavailable" in (error.details() or "")
        assert time.monotonic() - started < 1.0
        ephemeral = await collect(server.stub.StreamChat(agent_pb2.ChatRequest(content="no session needed")))
        assert ephemeral[-1].WhichOneof("response") == "done"

        health = health_pb2_grpc.HealthStub(server.channel)
        service = health_pb2.HealthCheckRequest(service="agent.AgentService")
        monitor = server.server.core.store_monitor
        await monitor.probe()
        assert (await health.Check(service)).status == health_pb2.HealthCheckResponse.SERVING  # one miss: no flap
        await monitor.probe()
        assert (await health.Check(service)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        liveness = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert liveness.status == health_pb2.HealthCheckResponse.SERVING  # the process itself is fine

        redis.start()
        await monitor.probe()
        await monitor.probe()
        assert (await health.Check(service)).status == health_pb2.HealthCheckResponse.SERVING
        assert (await collect(ask(server, "back?")))[-1].WhichOneof("response") == "done"


async def test_conversations_survive_a_redis_restart(
    redis: RedisServer, tmp_path: Path, provider: StreamingProvider
) -> None:
    settings = settings_for(tmp_path, redis.url, provider)
    async with running_server(settings) as server:
        await collect(ask(server, "remember 42"))
    redis.restart()  # SIGTERM, then start again from the append-only file
    async with running_server(settings) as server:
        answer = await collect(ask(server, "what was it?"))
    assert text_of(answer)
    assert [text for role, text in provider.histories()[-1] if role == "user"] == ["remember 42", "what was it?"]
