"""agentctl: a small command-line client for ``agent.AgentService``.

It exists so that a running server can be talked to without writing code: chat with
it and check its health. (To list or describe what it serves, use grpcurl and server
reflection; the README has the commands.)

Commands (global options go before the command)::

    agentctl [--target HOST:PORT] [--timeout SECONDS] [--token TOKEN] [--plaintext | --tls [--ca FILE]] COMMAND
    agentctl chat [--session ID] [-m KEY=VALUE]... [--json] [--on-disconnect continue|cancel]
                  [--if-busy reject|enqueue|interrupt] ["prompt"]
    agentctl chat --resume RUN_ID[:SEQUENCE] [--json]
    agentctl health [--watch] [SERVICE]

``--target`` defaults to ``$AGENTCTL_TARGET``, else ``localhost:50051``; ``--token``
to ``$AGENTCTL_TOKEN`` (sent as ``authorization: Bearer TOKEN``). ``chat`` with a
prompt makes one StreamChat call; without one it answers the lines of stdin one by
one on one session (see ``chat.py``): at a terminal with line editing and history,
where Ctrl-C cancels the answer in progress (the next line interrupts what is left
of it at the server) and Ctrl-D, ``/quit`` or Ctrl-C twice at an empty prompt leaves
(exit 0). Each answer is a run: its id ends the ``[done]`` line, a dropped connection
is resumed by itself without showing anything twice (``runs.py``), and ``--resume``
shows a run again from a given event. Answers go to stdout, everything else to
stderr (see ``render.py``); exit codes are in ``exits.py``.

The modules: ``args`` (command line), ``connect`` (channel, call metadata), ``render``
(output), ``lines`` (piped or typed lines) and ``interrupts`` (a Ctrl-C at the prompt
is never missed), ``runs`` (following one run across dropped connections), ``chat``
and ``health`` (the commands).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import grpc

from agent_service.cli import chat, health
from agent_service.cli.args import parse_args
from agent_service.cli.connect import open_channel
from agent_service.cli.exits import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CliError, rpc_exit_code
from agent_service.cli.render import Renderer, format_rpc_error

Command = Callable[[asyncio.Runner, Any, argparse.Namespace, Renderer], int]
_COMMANDS: dict[str, Command] = {"chat": chat.run, "health": health.run}


async def _connect(args: argparse.Namespace) -> Any:
    """Open the channel inside the runner's loop, which grpc.aio binds it to."""
    return open_channel(args)


def _run(runner: asyncio.Runner, args: argparse.Namespace, out: Renderer) -> int:
    """Run the chosen command on one channel, turning failures into an ``error:`` line and an exit code.

    The event loop runs only while a call is in progress (``runner.run`` per call), so that
    a conversation can wait for the next line outside it and Ctrl-C reaches the right place.
    """
    try:
        channel = runner.run(_connect(args))
        try:
            return _COMMANDS[args.command](runner, channel, args, out)
        finally:
            runner.run(channel.close())
    except grpc.aio.AioRpcError as err:
        out.error(format_rpc_error(err))
        return rpc_exit_code(err.code())
    except CliError as err:
        out.error(f"error: {err}")
        return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the command; returns the process exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: return its code instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    out = Renderer(sys.stdout, sys.stderr, as_json=args.command == "chat" and args.json, color=color)
    try:
        with asyncio.Runner() as runner:
            return _run(runner, args, out)
    except KeyboardInterrupt:
        # The runner cancelled the call in progress. Leave the terminal on a fresh line after
        # its "^C" echo: the exit code says the rest.
        with suppress(OSError, ValueError):
            if out.at_line_start and out.err.isatty():
                out.err.write("\n")
            out.end_line()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`agentctl ... | head`): stop quietly, and keep Python's
        # final flush of stdout from failing again at exit.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
