"""`agentctl` as a user runs it: a real process against a real server."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.support.servers import Running


async def agentctl(target: str, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_service.cli.agentctl", "--target", target, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_chat_streams_text_and_marks_tool_calls(served: Running) -> None:
    code, out, err = await agentctl(served.target, "chat", "what is 2*21?")
    assert code == 0, err
    assert '[tool] calculator {"expression": "2*21"}' in out
    assert "[result] calculator: 2*21 = 42" in out
    assert out.rstrip().endswith("Here is what the tool returned: 2*21 = 42")
    assert "[done] stop=end_turn" in err


async def test_chat_json_and_session(served: Running) -> None:
    code, out, _ = await agentctl(served.target, "chat", "--json", "--session", "cli-1", "hello")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["session_id"] for e in events} == {"cli-1"}
    assert "done" in events[-1]


async def test_interactive_chat_reads_lines_from_stdin(served: Running) -> None:
    code, out, err = await agentctl(served.target, "chat", stdin=b"first line\nsecond line\n")
    assert code == 0, err
    assert "answering: first line" in out and "answering: second line" in out
    assert err.count("[done]") == 2


async def test_health_list_and_describe(served: Running) -> None:
    assert (await agentctl(served.target, "health"))[:2] == (0, "SERVING\n")
    code, out, _ = await agentctl(served.target, "list")
    assert code == 0 and "agent.AgentService" in out.splitlines()
    code, out, _ = await agentctl(served.target, "describe")
    assert code == 0
    assert "rpc StreamChat(agent.ChatRequest) returns (stream agent.ChatResponse)" in out
    assert "rpc BidirectionalChat(stream agent.ChatRequest) returns (stream agent.ChatResponse)" in out


async def test_failure_exits_non_zero_with_the_status_name(served: Running) -> None:
    code, _, err = await agentctl(served.target, "chat", "--session", "../escape", "hi")
    assert code != 0
    assert "INVALID_ARGUMENT" in err
    code, _, err = await agentctl("127.0.0.1:1", "--timeout", "2", "health")
    assert code != 0
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
