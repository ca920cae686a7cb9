"""Sessions: stored history survives a restart; agents in memory are bounded; old histories are carried over."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent_service.proto import agent_pb2
from agent_service.store import ANONYMOUS, SessionKey
from tests.support.servers import collect, make_settings, running_server, session_of, text_of


async def test_history_survives_a_server_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with running_server(settings) as first:
        await collect(first.stub.StreamChat(agent_pb2.ChatRequest(content="remember the number 42", session_id="keep")))
        before = session_of(first, "keep").agent.messages  # type: ignore[union-attr]
        assert len(before) == 2
    assert any((tmp_path / "anonymous" / "session" / "keep").rglob("snapshot_latest.json"))

    async with running_server(settings) as second:
        assert len(second.server.registry) == 0  # nothing in memory: history must come from disk
        responses = await collect(
            second.stub.StreamChat(agent_pb2.ChatRequest(content="what was it", session_id="keep"))
        )
        agent = session_of(second, "keep").agent
        assert agent is not None
        assert [m["role"] for m in agent.messages] == ["user", "assistant", "user", "assistant"]
        assert agent.messages[0]["content"][0]["text"] == "remember the number 42"
        assert text_of(responses).endswith("what was it")
        # A fresh session does not see it.
        fresh = await collect(second.stub.StreamChat(agent_pb2.ChatRequest(content="what was it", session_id="new")))
        assert fresh[-1].done.usage.input_tokens < responses[-1].done.usage.input_tokens


async def test_agents_in_memory_are_bounded_and_evicted_ones_reload(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, max_sessions=3)) as served:
        for index in range(5):
            request = agent_pb2.ChatRequest(content=f"hello {index}", session_id=f"lru-{index}")
            await collect(served.stub.StreamChat(request))
        cached = [
            f"lru-{index}" for index in range(5) if served.server.registry.cached(SessionKey(ANONYMOUS, f"lru-{index}"))
        ]
        assert cached == ["lru-2", "lru-3", "lru-4"]
        await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="back again", session_id="lru-0")))
        agent = session_of(served, "lru-0").agent
        assert agent is not None and len(agent.messages) == 4  # reloaded from disk, then answered
        assert len(served.server.registry) == 3


async def test_idle_sessions_leave_memory(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, session_idle_s=60)) as served:
        await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="hi", session_id="idle")))
        registry = served.server.registry
        # The turn releases the session (and stamps last_used) just after its last event.
        async with asyncio.timeout(5):
            while session_of(served, "idle").busy:  # noqa: ASYNC110 - server state, no event to wait on
                await asyncio.sleep(0.01)
        assert registry.evict_idle() == 0
        session_of(served, "idle").last_used -= 61
        assert registry.evict_idle() == 1
        assert len(registry) == 0
