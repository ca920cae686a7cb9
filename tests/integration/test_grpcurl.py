"""grpcurl (a foreign client that knows nothing but reflection) against the service."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from tests.support.servers import Running

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_grpcurl_lists_describes_and_streams(served: Running) -> None:
    code, out, _ = await grpcurl(served.target, "list")
    assert code == 0 and "agent.AgentService" in out.split()

    code, out, _ = await grpcurl(served.target, "describe", "agent.ChatResponse")
    assert code == 0 and "agent.Done done = 6;" in out

    request = json.dumps({"content": "what is 5+5", "session_id": "curl"})
    code, out, err = await grpcurl("-d", request, served.target, "agent.AgentService/StreamChat")
    assert code == 0, err
    events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert events[0]["tool_use"]["tool_name"] == "calculator"
    assert events[1]["tool_result"]["output"] == "5+5 = 10"
    assert events[-1]["done"]["stop_reason"] == "end_turn"


async def test_grpcurl_reports_the_status_of_bad_input(served: Running) -> None:
    code, _, err = await grpcurl("-d", '{"content": ""}', served.target, "agent.AgentService/StreamChat")
    assert code != 0
    assert "InvalidArgument" in err and "content must not be empty" in err
