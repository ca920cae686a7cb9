"""Replicas behind one Envoy on one Redis, without session affinity: any replica continues any
conversation. Three `agent-service` processes, a real Envoy with ENVOY_SESSION_AFFINITY=off, and a fake
model provider that records what it is sent."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import grpc

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.envoy_upstreams import with_upstreams
from tests.support.fake_provider import streaming_provider
from tests.support.processes import service_process
from tests.support.redis_server import redis_server
from tests.support.servers import collect, kinds, text_of
from tests.system.front_door import render_config, running_envoy

REPLICAS = 3
STARTUP_S = 90  # three Python processes starting at once on a busy 2-core machine
TURNS = 9  # LEAST_REQUEST picks at random among idle replicas: all on one has odds 3 x (1/3)^9


def _ended_calls(log: Path, session_id: str) -> int:
    """StreamChat calls of `session_id` this replica ended OK (its call.end log lines)."""
    ended = 0
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if (entry.get("event"), entry.get("method"), entry.get("status")) == ("call.end", "StreamChat", "OK"):
                ended += entry.get("session_id") == session_id
    return ended


async def test_a_conversation_continues_on_whichever_replica_envoy_picks(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis, streaming_provider(words=5) as provider:
        env = {
            "AGENT_MODEL_PROVIDER": "openai",
            "AGENT_OPENAI_BASE_URL": provider.url,
            "AGENT_OPENAI_API_KEY": "unused",
            "AGENT_SESSION_STORE": redis.url,
        }
        with (
            service_process(tmp_path / "r0", **env) as r0,
            service_process(tmp_path / "r1", **env) as r1,
            service_process(tmp_path / "r2", **env) as r2,
        ):
            replicas = [r0, r1, r2]
            async with asyncio.timeout(STARTUP_S):
                for replica in replicas:
                    async with grpc.aio.insecure_channel(replica.target) as channel:
                        await channel.channel_ready()
            config = render_config(tmp_path / "envoy.yaml", ENVOY_SESSION_AFFINITY="off")
            with_upstreams(config, [replica.target for replica in replicas])
            async with (
                running_envoy(config, tmp_path, upstreams=REPLICAS) as envoy,
                grpc.aio.insecure_channel(envoy.target) as channel,
            ):
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                for turn in range(TURNS):
                    request = agent_pb2.ChatRequest(content=f"turn {turn}", session_id="roaming")
                    responses = await collect(
                        stub.StreamChat(request, metadata=(("x-session-id", "roaming"),), timeout=30)
                    )
                    assert kinds(responses)[-1] == "done", kinds(responses)
                    assert text_of(responses) == f"reply-{turn + 1} w1 w2 w3 w4"
                entries = await envoy.access_log_of("/agent.AgentService/StreamChat", count=TURNS)

    served = {replica.target: _ended_calls(replica.log, "roaming") for replica in replicas}
    print(f"turns served per replica (their call.end lines): {served}")
    print(f"upstream per turn (Envoy's access log): {[entry['upstream_host'] for entry in entries]}")
    assert sum(served.values()) == TURNS
    assert sum(1 for count in served.values() if count) >= 2, f"every turn on one replica: {served}"
    assert Counter(entry["upstream_host"] for entry in entries) == Counter(
        {target: count for target, count in served.items() if count}
    )
    # Every turn the model saw the whole conversation, whichever replica asked it.
    histories = provider.histories()
    assert len(histories) == TURNS
    for turn, history in enumerate(histories):
        expected: list[tuple[str, str]] = []
        for earlier in range(turn):
            expected += [("user", f"turn {earlier}"), ("assistant", f"reply-{earlier + 1} w1 w2 w3 w4")]
        assert history == [*expected, ("user", f"turn {turn}")], f"turn {turn}"
