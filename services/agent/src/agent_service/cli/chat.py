"""``agentctl chat``: one answer to a prompt, a conversation of lines on one session, or the rest of a run.

Every line of a conversation is its own StreamChat call on the same session id (made
up as ``agentctl-<hex>`` when ``--session`` is not given, and shown so the session can
be continued later). Piped lines are answered in order, and the first failed answer
ends the run with its exit code.

Runs. Each answer is a run at the server; its id ends the ``[done]`` line. Requests
ask ``on_disconnect=CONTINUE`` (unless ``--on-disconnect cancel``), so a dropped
connection does not lose the answer: agentctl resumes the run by itself and shows the
rest, each event once (``runs.py``). ``--resume RUN_ID[:SEQUENCE]`` shows a run's
events after SEQUENCE, then its live ones: the way back to an answer that agentctl
stopped following (it prints the command when that happens).

Busy sessions. ``--if-busy`` says what a request does when its session is answering
another one. A terminal conversation waits its turn (enqueue) by default; a prompt
and piped lines are refused at once (reject: ABORTED), as scripts expect.

Ctrl-C in a terminal conversation cancels the answer in progress and keeps the
session: the answer stops on the screen at once (``[cancelled]``) and the prompt comes
back. A cancelled call alone does not stop a CONTINUE run, so the next line is sent
with ``if_busy=INTERRUPT``: if the cancelled answer is still being produced, the
server stops it there, keeps its partial text in the conversation (marked
interrupted) and answers the new line. Leaving right after a Ctrl-C lets that answer
finish at the server (a note says how to see it). With ``--on-disconnect cancel`` the
server stops the answer at the Ctrl-C itself. Outside a conversation (a prompt, piped
lines) Ctrl-C exits 130, and a CONTINUE run goes on at the server: agentctl prints
the ``--resume`` command that shows the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

from agent_service.cli.connect import call_options
from agent_service.cli.exits import EXIT_FAILURE, EXIT_OK, rpc_exit_code
from agent_service.cli.lines import LineSource, PipedLines, TerminalLines, clean_text, history_path
from agent_service.cli.render import Renderer, format_rpc_error
from agent_service.cli.runs import RunFollower
from agent_service.proto import agent_pb2, agent_pb2_grpc

PROMPT = "you> "
QUIT_COMMAND = "/quit"
SESSION_PREFIX = "agentctl-"
DISCONNECT: Mapping[str, int] = MappingProxyType({"continue": agent_pb2.CONTINUE, "cancel": agent_pb2.CANCEL})
BUSY: Mapping[str, int] = MappingProxyType(
    {"reject": agent_pb2.REJECT, "enqueue": agent_pb2.ENQUEUE, "interrupt": agent_pb2.INTERRUPT}
)


@dataclass(frozen=True, slots=True)
class Policies:
    """What the requests of one command ask for when the connection drops and when the session is busy."""

    on_disconnect: int
    if_busy: int

    @property
    def resumable(self) -> bool:
        """A run asked with CONTINUE outlives a dropped connection, so it can be resumed."""
        return self.on_disconnect == agent_pb2.CONTINUE


def policies(args: argparse.Namespace, *, conversation: bool) -> Policies:
    """The policies asked on the command line, else the defaults (see the module docstring)."""
    if_busy = args.if_busy or ("enqueue" if conversation else "reject")
    return Policies(DISCONNECT[args.on_disconnect or "continue"], BUSY[if_busy])


def new_session_id() -> str:
    """A fresh session id the service accepts (letters, digits, ``-``; well under 128 characters)."""
    return SESSION_PREFIX + secrets.token_hex(8)


def build_request(
    content: str,
    session_id: str = "",
    metadata: Sequence[tuple[str, str]] = (),
    *,
    on_disconnect: int = agent_pb2.CONTINUE,
    if_busy: int = agent_pb2.REJECT,
) -> Any:
    """A ChatRequest; later ``-m`` entries win over earlier ones with the same key."""
    return agent_pb2.ChatRequest(
        content=content,
        session_id=session_id,
        metadata=dict(metadata),
        on_disconnect=on_disconnect,  # type: ignore[arg-type]
        if_busy=if_busy,  # type: ignore[arg-type]
    )


def run(runner: asyncio.Runner, channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """The ``chat`` command."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
    if args.resume is not None:
        follower = RunFollower(stub, call_options(args), out)
        return follow_one(runner, follower, follower.resume(*args.resume), out)
    if args.prompt is not None:
        chosen = policies(args, conversation=False)
        request = build_request(
            clean_text(args.prompt), args.session, args.metadata, on_disconnect=chosen.on_disconnect,
            if_busy=chosen.if_busy,
        )  # fmt: skip
        follower = RunFollower(stub, call_options(args, args.session), out, resumable=chosen.resumable)
        return follow_one(runner, follower, follower.chat(request), out)
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        return converse(runner, stub, args, out, TerminalLines(PROMPT, out, history_path()), interactive=True)
    lines = PipedLines(stdin.buffer if stdin is not None else None)
    return converse(runner, stub, args, out, lines, interactive=False)


def follow_one(
    runner: asyncio.Runner, follower: RunFollower, following: Coroutine[Any, Any, None], out: Renderer
) -> int:
    """Follow one run to its end; when agentctl stops before the run does, say how to see the rest."""
    try:
        runner.run(following)
    except KeyboardInterrupt:
        note_detached(follower, out)
        raise
    except grpc.aio.AioRpcError as err:
        out.error(format_rpc_error(err))
        note_detached(follower, out)
        return rpc_exit_code(err.code())
    return EXIT_FAILURE if out.saw_error else EXIT_OK


def note_detached(follower: RunFollower, out: Renderer) -> None:
    """For a run that goes on at the server unfollowed: the command that shows the rest of it."""
    if follower.detached:
        progress = follower.progress
        out.note(f"[run {progress.run_id} goes on at the server; {progress.resume_command()} shows the rest]")


def converse(
    runner: asyncio.Runner,
    stub: Any,
    args: argparse.Namespace,
    out: Renderer,
    lines: LineSource,
    *,
    interactive: bool,
) -> int:
    """Answer ``lines`` one by one on one session until they end or ``/quit``.

    Interactive: Ctrl-C during an answer cancels it (the next line interrupts its run,
    see the module docstring) and the conversation goes on, a failed answer is reported
    and the conversation goes on, and leaving exits 0. Otherwise Ctrl-C propagates
    (exit 130) and the first failed answer ends the run with its exit code.
    """
    session_id = args.session or new_session_id()
    if not args.session:
        out.note(f"session {session_id} (continue it later with: agentctl chat --session {session_id})")
    if interactive:
        out.note(f"Ctrl-C cancels an answer; Ctrl-D, {QUIT_COMMAND} or Ctrl-C twice exits")
    options = call_options(args, session_id)
    chosen = policies(args, conversation=interactive)
    cancelled: RunFollower | None = None  # an answer cancelled with Ctrl-C whose run may still be going
    with lines:
        while (line := lines.read()) is not None:
            if line.strip() == QUIT_COMMAND:
                break
            if not line.strip():
                continue  # the service refuses empty content; just ask again
            if_busy = agent_pb2.INTERRUPT if cancelled is not None else chosen.if_busy
            request = build_request(
                line, session_id, args.metadata, on_disconnect=chosen.on_disconnect, if_busy=if_busy
            )
            follower = RunFollower(stub, options, out, resumable=chosen.resumable)
            cancelled = None
            try:
                runner.run(follower.chat(request))
            except KeyboardInterrupt:
                if not interactive:
                    note_detached(follower, out)
                    raise
                out.note("[cancelled]")
                if follower.progress.run_id and not follower.progress.ended:
                    cancelled = follower  # its run started: the next line stops it if it still goes on
            except grpc.aio.AioRpcError as err:
                out.error(format_rpc_error(err))
                note_detached(follower, out)
                if not interactive:
                    return rpc_exit_code(err.code())
    if cancelled is not None:
        note_detached(cancelled, out)  # left right after a Ctrl-C: that answer finishes at the server
    if interactive:
        return EXIT_OK
    return EXIT_FAILURE if out.saw_error else EXIT_OK
