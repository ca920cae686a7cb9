"""``agentctl chat``: one answer to a prompt, or a conversation of lines on one session.

Every line of a conversation is its own StreamChat call on the same session id (made
up as ``agentctl-<hex>`` when ``--session`` is not given, and shown so the session can
be continued later). One call per answer is what lets Ctrl-C cancel just the answer in
progress: at a terminal the call is cancelled, ``[cancelled]`` is noted and the prompt
comes back, with the conversation intact. Piped lines are answered in order, and the
first failed answer ends the run with its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from agent_service.cli.connect import CallOptions, call_options
from agent_service.cli.exits import EXIT_FAILURE, EXIT_OK, rpc_exit_code
from agent_service.cli.lines import LineSource, PipedLines, TerminalLines, clean_text, history_path
from agent_service.cli.render import Renderer, format_rpc_error
from agent_service.proto import agent_pb2, agent_pb2_grpc

PROMPT = "you> "
QUIT_COMMAND = "/quit"
SESSION_PREFIX = "agentctl-"
# A cancelled answer keeps its session busy until the server has stopped it (its cancel
# grace, 2 s by default): the next line waits that long for the session, within this bound.
BUSY_WAIT_AFTER_CANCEL_S = 10.0
BUSY_RETRY_INTERVAL_S = 0.1


def new_session_id() -> str:
    """A fresh session id the service accepts (letters, digits, ``-``; well under 128 characters)."""
    return SESSION_PREFIX + secrets.token_hex(8)


def build_request(content: str, session_id: str = "", metadata: Sequence[tuple[str, str]] = ()) -> Any:
    """A ChatRequest; later ``-m`` entries win over earlier ones with the same key."""
    return agent_pb2.ChatRequest(content=content, session_id=session_id, metadata=dict(metadata))


async def answer(stub: Any, request: Any, options: CallOptions, out: Renderer, busy_wait_s: float = 0.0) -> None:
    """Stream the answer to ``request`` into ``out``; a failed call raises its AioRpcError.

    For ``busy_wait_s`` a refusal because the session is busy (ABORTED before any event)
    is retried, for the case where this client has just cancelled the session's answer.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + busy_wait_s
    while True:
        call = stub.StreamChat(request, timeout=options.timeout, metadata=options.metadata)
        received = 0
        try:
            async for resp in call:
                received += 1
                out.show(resp)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as err:
            if received or err.code() != grpc.StatusCode.ABORTED or loop.time() >= give_up:
                raise
            await asyncio.sleep(BUSY_RETRY_INTERVAL_S)
            continue
        out.end_line()
        return


def run(runner: asyncio.Runner, channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """The ``chat`` command."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
    if args.prompt is not None:
        request = build_request(clean_text(args.prompt), args.session, args.metadata)
        runner.run(answer(stub, request, call_options(args, args.session), out))
        return EXIT_FAILURE if out.saw_error else EXIT_OK
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        return converse(runner, stub, args, out, TerminalLines(PROMPT, out, history_path()), interactive=True)
    lines = PipedLines(stdin.buffer if stdin is not None else None)
    return converse(runner, stub, args, out, lines, interactive=False)


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

    Interactive: Ctrl-C during an answer cancels it and the conversation goes on, a failed
    answer is reported and the conversation goes on, and leaving exits 0. Otherwise Ctrl-C
    propagates (exit 130) and the first failed answer ends the run with its exit code.
    """
    session_id = args.session or new_session_id()
    if not args.session:
        out.note(f"session {session_id} (continue it later with: agentctl chat --session {session_id})")
    if interactive:
        out.note(f"Ctrl-C cancels an answer; Ctrl-D, {QUIT_COMMAND} or Ctrl-C twice exits")
    options = call_options(args, session_id)
    busy_wait_s = 0.0
    with lines:
        while (line := lines.read()) is not None:
            if line.strip() == QUIT_COMMAND:
                break
            if not line.strip():
                continue  # the service refuses empty content; just ask again
            request = build_request(line, session_id, args.metadata)
            wait_s, busy_wait_s = busy_wait_s, 0.0
            try:
                runner.run(answer(stub, request, options, out, wait_s))
            except KeyboardInterrupt:
                if not interactive:
                    raise
                out.note("[cancelled]")
                busy_wait_s = BUSY_WAIT_AFTER_CANCEL_S
            except grpc.aio.AioRpcError as err:
                out.error(format_rpc_error(err))
                if not interactive:
                    return rpc_exit_code(err.code())
    if interactive:
        return EXIT_OK
    return EXIT_FAILURE if out.saw_error else EXIT_OK
