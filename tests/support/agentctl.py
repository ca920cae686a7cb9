"""Running agentctl as a user does: its own process, stdin piped, stdout and stderr collected."""

from __future__ import annotations

import asyncio
import os
import re
import sys

# No AGENTCTL_* variables of the person running the tests.
ENV = {name: value for name, value in os.environ.items() if not name.startswith("AGENTCTL_")}
RUN_TIMEOUT_S = 60
# The end of an answer's [done] line on stderr: the run id.
DONE_RUN_ID = re.compile(r"\[done\] stop=end_turn .* run=([0-9a-f]{32})$", re.MULTILINE)
# What agentctl says when it stops following a run that goes on at the server.
GOES_ON = re.compile(r"\[run ([0-9a-f]{32}) goes on at the server; agentctl chat --resume (\S+) shows the rest]")
_FILLER = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]


def demo_answer(prompt: str, words: int = 0) -> str:
    """The demo model's text for `prompt`: its acknowledgement, padded with its filler (or cut) to `words`
    words when `words` is set (AGENT_DEMO_REPLY_WORDS)."""
    text = f"This is the demo model answering: {prompt}".split()
    return " ".join((text + _FILLER * words)[:words] if words else text)


async def agentctl(
    target: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``agentctl --target TARGET ARGS``: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_service.cli.agentctl", "--target", target, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=ENV | (env or {}),
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout=RUN_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
