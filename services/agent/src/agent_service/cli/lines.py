"""Where a conversation's lines come from: a pipe, or a person at a terminal.

At a terminal, GNU readline (the standard library's ``readline``) gives line editing
and a history kept across runs in ``$XDG_STATE_HOME/agentctl/history``. Ctrl-C at the
prompt discards the line being typed; at an empty prompt it prints a hint the first
time and ends the conversation the second time in a row, like Ctrl-D. `PromptInterrupts`
makes sure that each Ctrl-C at the prompt is seen at once (readline alone can miss one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from types import ModuleType, TracebackType
from typing import BinaryIO, Protocol, TextIO

from agent_service.cli.interrupts import PromptInterrupts
from agent_service.cli.render import Renderer

HISTORY_LENGTH = 1000
EXIT_HINT = "(press Ctrl-C again or Ctrl-D to exit)"


class LineSource(Protocol):
    """Lines of a conversation, one at a time; used as a context manager."""

    def read(self) -> str | None:
        """The next line without its line ending, or None when the conversation is over."""

    def __enter__(self) -> LineSource: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def history_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/agentctl/history``; the XDG default ``~/.local/state`` when unset or relative."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    if not state or not Path(state).is_absolute():
        home = env.get("HOME") or str(Path.home())
        state = str(Path(home) / ".local" / "state")
    return Path(state) / "agentctl" / "history"


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes from argv or a terminal) replaced by U+FFFD.

    Protobuf refuses to encode them, which would otherwise surface as an exception.
    """
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class PipedLines:
    """Lines of a non-terminal stdin, read when asked for (no prompt; undecodable bytes replaced)."""

    def __init__(self, stream: BinaryIO | None) -> None:
        self._stream = stream

    def read(self) -> str | None:
        if self._stream is None:
            return None  # no stdin at all (closed descriptor): an empty conversation
        try:
            raw = self._stream.readline()
        except OSError:
            return None
        if not raw:
            return None
        return raw.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")

    def __enter__(self) -> PipedLines:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class TerminalLines:
    """Lines typed at a terminal, after a prompt, with line editing and history when stdout is the terminal too.

    ``input()`` uses readline only when stdin and stdout are both terminals, and then
    readline draws the prompt on stdout; otherwise (``agentctl chat > answers.txt``)
    the prompt goes to stderr and the terminal's own line discipline is all the editing.
    """

    def __init__(self, prompt: str, out: Renderer, history: Path | None = None) -> None:
        self._prompt = prompt
        self._out = out
        self._history = history
        self._readline = _load_readline() if out.out.isatty() else None
        # Where the prompt is drawn: a line ended at the prompt (Ctrl-C, Ctrl-D) is ended there.
        self._echo: TextIO = out.out if self._readline is not None else out.err
        self._loaded = 0
        self._interrupts = PromptInterrupts()

    def read(self) -> str | None:
        armed = False  # Ctrl-C was just pressed at an empty prompt
        while True:
            try:
                return self._input()
            except EOFError:
                self._end_prompt_line()
                return None
            except UnicodeDecodeError:
                self._out.error("error: the line is not valid UTF-8")
                armed = False
            except KeyboardInterrupt:
                typed = self._readline is not None and bool(self._readline.get_line_buffer())
                self._end_prompt_line()
                if typed:
                    armed = False  # Ctrl-C discards the line being typed, as in a shell
                elif armed:
                    return None
                else:
                    armed = True
                    self._out.note(EXIT_HINT)

    def _input(self) -> str:
        if self._readline is not None:
            with self._interrupts.waiting():
                line = input(self._prompt)
            return clean_text(line)
        self._out.err.write(self._prompt)
        self._out.err.flush()
        with self._interrupts.waiting():
            line = input()
        return clean_text(line)

    def _end_prompt_line(self) -> None:
        self._echo.write("\n")
        self._echo.flush()

    def __enter__(self) -> TerminalLines:
        self._interrupts.__enter__()
        if self._readline is not None and self._history is not None:
            with suppress(OSError):  # no history yet, or unreadable: start empty
                self._readline.read_history_file(str(self._history))
            self._loaded = self._readline.get_current_history_length()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Append this run's lines to the history file (made on demand); failing that, say nothing."""
        self._interrupts.__exit__(exc_type, exc, tb)
        if self._readline is None or self._history is None:
            return
        added = self._readline.get_current_history_length() - self._loaded
        if added <= 0:
            return
        try:
            self._history.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Prompts can be private: the file is the user's alone, like a shell's history.
            os.close(os.open(self._history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            self._readline.set_history_length(HISTORY_LENGTH)
            # Appending (not rewriting) keeps the lines of other agentctl sessions that ran meanwhile.
            self._readline.append_history_file(added, str(self._history))
        except OSError:
            pass


def _load_readline() -> ModuleType | None:
    """The readline module, imported only for a terminal (importing it changes how ``input()`` reads)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline  # deliberately lazy, see above
    except ImportError:  # a Python built without it: plain input() still works
        return None
    return readline
