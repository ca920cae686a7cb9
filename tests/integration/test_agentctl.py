"""`agentctl` as a user runs it: a real process against a real server."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.agentctl import agentctl
from tests.support.servers import Running

# agentctl runs as a process (a terminal, signals, timing): the system tier, one test at a time.
pytestmark = pytest.mark.system


async def test_chat_streams_text_and_marks_tool_calls(served: Running) -> None:
    code, out, err = await agentctl(served.target, "chat", "what is 2*21?")
    assert code == 0, err
    assert '[tool] calculator {"expression": "2*21"}' in out
    assert "[result] calculator: 2*21 = 42" in out
    assert out.rstrip().endswith("Here is what the tool returned: 2*21 = 42")
    assert "[done] stop=end_turn" in err
    assert "[done]" not in out and "session" not in err  # one prompt, no session: nothing made up


async def test_chat_json_and_session(served: Running) -> None:
    code, out, _ = await agentctl(served.target, "chat", "--json", "--session", "cli-1", "hello")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["session_id"] for e in events} == {"cli-1"}
    assert "done" in events[-1]


async def test_piped_lines_are_answered_in_order_on_one_session(served: Running) -> None:
    code, out, err = await agentctl(served.target, "chat", stdin=b"first line\n\nsecond line\n/quit\nnever sent\n")
    assert code == 0, err
    assert out.index("answering: first line") < out.index("answering: second line")
    assert "never sent" not in out
    assert "you>" not in out + err  # no prompt without a terminal
    session = re.search(r"session (agentctl-[0-9a-f]{16}) ", err)
    assert session is not None, err
    # The second answer's input counted the first exchange: both lines went to that one session.
    first_in, second_in = (int(n) for n in re.findall(r"\[done\] stop=end_turn tokens in=(\d+)", err))
    assert second_in > first_in + 2, err
    # ...which can be continued later by its id.
    code, out, err = await agentctl(served.target, "chat", "--json", "--session", session.group(1), "third line")
    assert code == 0, err
    assert int(json.loads(out.splitlines()[-1])["done"]["usage"]["input_tokens"]) > second_in


async def test_the_first_failed_piped_line_ends_the_run_with_its_code(served: Running) -> None:
    code, out, err = await agentctl(served.target, "chat", "--session", "../escape", stdin=b"one\ntwo\n")
    assert code == 10 + grpc.StatusCode.INVALID_ARGUMENT.value[0], err
    assert out == ""
    assert err.count("error: INVALID_ARGUMENT") == 1, err


async def test_health(served: Running) -> None:
    assert (await agentctl(served.target, "health"))[:2] == (0, "SERVING\n")
    assert (await agentctl(served.target, "health", "agent.AgentService"))[:2] == (0, "SERVING\n")
    code, out, err = await agentctl(served.target, "health", "no.Such")
    assert code == 10 + grpc.StatusCode.NOT_FOUND.value[0] and out == "", err
    assert "NOT_FOUND" in err
    assert (await agentctl(served.target, "list"))[0] == 2  # list/describe: grpcurl's job


async def test_failure_exits_non_zero_with_the_status_name(served: Running) -> None:
    code, _, err = await agentctl(served.target, "chat", "--session", "../escape", "hi")
    assert code == 13
    assert "INVALID_ARGUMENT" in err
    code, _, err = await agentctl("127.0.0.1:1", "--timeout", "2", "health")
    assert code in (14, 24)
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


class _RecordingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """A health service that remembers the metadata of each call."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def Check(self, request: object, context: grpc.aio.ServicerContext) -> object:  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[str, _RecordingHealth]]:
    server = grpc.aio.server()
    health = _RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", health
    finally:
        await server.stop(None)


async def test_token_is_sent_as_a_bearer_authorization() -> None:
    async with recording_server() as (target, health):
        assert (await agentctl(target, "--token", "from-flag", "health"))[0] == 0
        assert (await agentctl(target, "health", env={"AGENTCTL_TOKEN": "from-env"}))[0] == 0
        assert (await agentctl(target, "health"))[0] == 0
    authorization = [call.get("authorization") for call in health.metadata]
    assert authorization == ["Bearer from-flag", "Bearer from-env", None]
