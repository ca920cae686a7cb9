"""How agentctl shows things: stdout carries the answer text only, everything else goes to stderr.

Tool calls and results are marked on lines of their own in the answer; in-band errors,
the per-answer ``[done]`` summary (with the run id) and notes (``[cancelled]``, the
session id, a lost connection, hints) go to stderr, so ``agentctl chat "..." > answer.txt``
keeps just the answer.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from google.protobuf import json_format

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def format_done(done: Any, run_id: str = "") -> str:
    """The one-line summary of an answer; the run id is what ``agentctl chat --resume`` takes."""
    usage = done.usage
    summary = (
        f"[done] stop={done.stop_reason or '-'} tokens in={usage.input_tokens} out={usage.output_tokens}"
        f" events={done.event_count} {done.duration_ms:.0f} ms"
    )
    return f"{summary} run={run_id}" if run_id else summary


def format_event(resp: Any, *, at_line_start: bool = True) -> tuple[str, str]:
    """Render one ChatResponse as ``(stdout text, stderr text)``.

    ``at_line_start`` says whether stdout currently ends with a newline: tool
    lines, errors and summaries must start on a line of their own, but a
    blank line is not wanted when the answer text already ended one.
    """
    newline = "" if at_line_start else "\n"
    kind = resp.WhichOneof("response")
    if kind == "content":
        return resp.content.text, ""
    if kind == "tool_use":
        use = resp.tool_use
        name = use.tool_name or use.tool_id or "?"
        line = f"[tool] {name} {use.input}" if use.input else f"[tool] {name}"
        return f"{newline}{line}\n", ""
    if kind == "tool_result":
        result = resp.tool_result
        name = result.tool_name or result.tool_id or "?"
        mark = "[result]" if result.status in ("", "success") else "[result:error]"
        output = result.output if result.output.endswith("\n") else result.output + "\n"
        return f"{newline}{mark} {name}: {output}", ""
    if kind == "error":
        return newline, f"[error {resp.error.code or 'UNKNOWN'}] {resp.error.message}\n"
    if kind == "done":
        return newline, format_done(resp.done, resp.run_id) + "\n"
    return "", ""  # a heartbeat, or a oneof member newer than this client: nothing to show


def format_json(resp: Any) -> str:
    """One response as a single JSON line (proto field names, the proto3 JSON mapping otherwise)."""
    return json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True), ensure_ascii=False)


def format_rpc_error(err: Any) -> str:
    """``error: STATUS_NAME: details`` for a grpc.aio.AioRpcError."""
    code = err.code()
    name = getattr(code, "name", str(code))
    details = err.details()
    return f"error: {name}: {details}" if details else f"error: {name}"


class Renderer:
    """Writes responses and messages to stdout/stderr, tracking stdout's line state and in-band errors."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool = False, color: bool = False) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.color = color
        self.at_line_start = True
        self.saw_error = False

    def show(self, resp: Any) -> None:
        """Print one response; stdout is flushed first so that both streams interleave correctly."""
        kind = resp.WhichOneof("response")
        if kind == "error":
            self.saw_error = True
        if self.as_json:
            self._write_out(format_json(resp) + "\n")
            return
        text_out, text_err = format_event(resp, at_line_start=self.at_line_start)
        self._write_out(text_out)
        if text_err:
            self._write_err(text_err.removesuffix("\n"), dim=kind == "done")

    def line(self, text: str) -> None:
        """Print a whole line on stdout (health)."""
        self._write_out(text + "\n")

    def end_line(self) -> None:
        """Terminate a partial answer line, so that what follows starts on a line of its own."""
        self._write_out("" if self.at_line_start else "\n")

    def error(self, message: str) -> None:
        """Print ``message`` on stderr, on a line of its own."""
        self.end_line()
        self._write_err(message)

    def fail(self, message: str) -> None:
        """Report a failed outcome that no event or status carries (the command then exits 1)."""
        self.saw_error = True
        self.error(message)

    def note(self, message: str) -> None:
        """Print an informational line on stderr (dimmed on a color terminal)."""
        self.end_line()
        self._write_err(message, dim=True)

    def aside(self, message: str) -> None:
        """A note in the middle of an answer: stdout is left as it is (a newline there would change the
        answer's text), but on a terminal, where both streams share the screen, the note gets a line of its own."""
        mid_line = not self.at_line_start and _isatty(self.out) and _isatty(self.err)
        self._write_err(("\n" if mid_line else "") + message, dim=True)

    def _write_out(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")

    def _write_err(self, line: str, *, dim: bool = False) -> None:
        if dim and self.color:
            line = _DIM + line + _RESET
        self.err.write(line + "\n")
        self.err.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False
