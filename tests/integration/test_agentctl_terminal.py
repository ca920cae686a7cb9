"""`agentctl chat` typed at a real pseudo-terminal: line editing, history, Ctrl-C and Ctrl-D.

agentctl runs as its own process with a pty as its controlling terminal, so the keys go
through the kernel's line discipline exactly as from a person: Ctrl-C (``\\x03``) becomes
SIGINT to agentctl, the Up arrow (``\\x1b[A``) reaches readline. The server runs in this
test's event loop, so the pty is read with ``add_reader``, never by blocking.
"""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import os
import pty
import re
import struct
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from tests.support.servers import make_settings, running_server

# agentctl runs as a process (a terminal, signals, timing): the system tier, one test at a time.
pytestmark = pytest.mark.system

PROMPT = "you> "
WAIT_S = 30.0
# Terminal control sequences (CSI, OSC, charset and keypad switches): not text on the screen.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>]|[\r\x07\x08]")
_FILLER = re.compile(r"\b(lorem|ipsum|dolor|amet|consectetur|adipiscing|elit)\b")
# Become a session leader, take the pty (fd 0) as controlling terminal and exec the command:
# without a controlling terminal, Ctrl-C would be just a byte. A fresh interpreter does it,
# so no Python code runs between fork and exec in this threaded test process (a preexec_fn would).
_BOOTSTRAP = "; ".join(
    (
        "import fcntl, os, sys, termios",
        "os.setsid()",
        "fcntl.ioctl(0, termios.TIOCSCTTY, 0)",
        "os.execv(sys.argv[1], sys.argv[1:])",
    )
)


class Terminal:
    """The output of a process on a pty, collected as it comes; keys are sent as bytes."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self._master = master
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._changed = asyncio.Event()
        self.raw = ""
        self.closed = False
        asyncio.get_running_loop().add_reader(master, self._on_readable)

    @property
    def screen(self) -> str:
        """The output as text: control sequences, carriage returns and backspaces removed."""
        return _CONTROL.sub("", self.raw)

    def send(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    async def expect(self, text: str, start: int = 0) -> int:
        """Wait (bounded) until ``text`` is on the screen at or after ``start``; the index just past it."""
        try:
            async with asyncio.timeout(WAIT_S):
                while (found := self.screen.find(text, start)) < 0:
                    if self.closed:
                        raise AssertionError(f"the terminal closed before {text!r}:\n{self.screen[start:]}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {text!r} within {WAIT_S} s:\n{self.screen[start:]}") from None
        return found + len(text)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), WAIT_S)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the last process holding the pty exited
            data = b""
        if data:
            self.raw += self._decoder.decode(data)
        else:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self._master)
        self._changed.set()

    def close(self) -> None:
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)


@asynccontextmanager
async def agentctl_on_a_terminal(tmp_path: Path, *args: str) -> AsyncIterator[Terminal]:
    """``agentctl ARGS`` (the installed console script) with a fresh pty as its terminal."""
    agentctl = Path(sys.executable).parent / "agentctl"
    assert agentctl.exists(), "the agentctl console script is missing: run `make install`"
    env = {name: value for name, value in os.environ.items() if not name.startswith("AGENTCTL_")}
    # A known terminal, no personal readline configuration, history under the test's directory.
    env |= {"TERM": "xterm", "INPUTRC": os.devnull, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BOOTSTRAP, str(agentctl), *args, stdin=slave, stdout=slave, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    terminal = Terminal(process, master)
    try:
        yield terminal
    finally:
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.kill()
            await asyncio.wait_for(process.wait(), WAIT_S)
        terminal.close()


async def test_ctrl_c_cancels_the_answer_and_the_conversation_goes_on(tmp_path: Path) -> None:
    # 400 words, 20 ms apart: an answer takes 8 s, time enough to interrupt it.
    settings = make_settings(tmp_path / "data", demo_token_delay_ms=20, demo_reply_words=400)
    async with (
        running_server(settings) as running,
        agentctl_on_a_terminal(tmp_path, "--target", running.target, "chat") as term,
    ):
        at = await term.expect(PROMPT)
        assert re.search(r"session agentctl-[0-9a-f]{16} \(continue it later", term.screen)
        term.send("first question\r")
        started = await term.expect("answering: first question", at)
        await term.expect("lorem", started)  # the answer is streaming
        term.send("\x03")
        cancelled = await term.expect("[cancelled]", started)
        at = await term.expect(PROMPT, cancelled)
        shown = term.screen[started : cancelled - len("[cancelled]")]
        assert "[done]" not in shown
        assert len(shown.split()) < 300, "the whole answer (392 more words) came despite Ctrl-C"

        term.send("second question\r")
        second = await term.expect("This is the demo model answering: second question", at)
        done = await term.expect("[done]", second)
        # Nothing of the cancelled answer came after [cancelled]: just the prompt, the line and the new answer.
        assert not _FILLER.search(term.screen[cancelled:second])
        # Same session: the model saw the first exchange too (a fresh session counts only "second question"),
        # and the first answer was stopped when the second line came (INTERRUPT): run to its end, it alone
        # would count 400 words.
        at = await term.expect(" ms", done)
        tokens_in = re.search(r"tokens in=(\d+)", term.screen[done:at])
        assert tokens_in is not None and 2 < int(tokens_in.group(1)) < 400, term.screen[done:at]

        at = await term.expect(PROMPT, at)
        term.send("\x1b[A")  # Up: readline recalls the previous line
        await term.expect("second question", at)
        assert "^[[A" not in term.raw  # what a terminal shows when nobody handles the key
        term.send("\x15")  # Ctrl-U clears the recalled line, so that Ctrl-D means end of input
        term.send("\x04")
        assert await term.exit_code() == 0, term.screen
    history = (tmp_path / "state" / "agentctl" / "history").read_text().splitlines()
    assert history == ["first question", "second question"]


async def test_ctrl_c_at_the_prompt_discards_the_line_then_hints_then_exits(tmp_path: Path) -> None:
    async with (
        running_server(make_settings(tmp_path / "data")) as running,
        agentctl_on_a_terminal(tmp_path, "--target", running.target, "chat", "--session", "typed-1") as term,
    ):
        at = await term.expect(PROMPT)
        assert "session typed-1" not in term.screen  # a given session id needs no reminder
        term.send("half typed")
        at = await term.expect("half typed", at)  # readline has it (keys sent before would be flushed by SIGINT)
        term.send("\x03")
        at = await term.expect(PROMPT, at)
        assert "Ctrl-C again" not in term.screen  # discarding a typed line is no request to leave
        term.send("\x03")
        at = await term.expect("(press Ctrl-C again or Ctrl-D to exit)", at)
        at = await term.expect(PROMPT, at)
        term.send("\x03")
        assert await term.exit_code() == 0, term.screen
    assert not (tmp_path / "state" / "agentctl" / "history").exists()  # nothing was entered


async def test_every_ctrl_c_at_the_prompt_is_seen_at_once(tmp_path: Path) -> None:
    """Each Ctrl-C brings the prompt back without waiting for another key, even when the SIGINT comes
    as readline is about to wait for one (readline alone then slept through it; see cli/interrupts.py)."""
    async with (
        running_server(make_settings(tmp_path / "data")) as running,
        agentctl_on_a_terminal(tmp_path, "--target", running.target, "chat", "--session", "typed-2") as term,
    ):
        at = await term.expect(PROMPT)
        for round_ in range(100):
            term.send(f"line {round_}")
            at = await term.expect(f"line {round_}", at)
            term.send("\x03")  # discards the typed line
            at = await term.expect(PROMPT, at)
        assert "Ctrl-C again" not in term.screen
        term.send("\x04")
        assert await term.exit_code() == 0, term.screen
