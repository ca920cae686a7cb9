"""agentctl's command line: the parser, its value checks and the defaults that depend on the command."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

TARGET_ENV = "AGENTCTL_TARGET"
TOKEN_ENV = "AGENTCTL_TOKEN"
DEFAULT_TARGET = "localhost:50051"
# A health check should fail fast against a dead server; answers and watches are open-ended.
DEFAULT_TIMEOUT = 5.0
DISCONNECT_POLICIES = ("continue", "cancel")
BUSY_POLICIES = ("reject", "enqueue", "interrupt")


def _positive_float(text: str) -> float:
    """Parse ``--timeout``: a zero or negative deadline would fail every call, so refuse it up front."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _is_header_value(text: str) -> bool:
    """Whether ``text`` can travel as a plain gRPC header value (visible ASCII, no spaces)."""
    return all("!" <= char <= "~" for char in text)


def _token(text: str) -> str:
    """Parse ``--token``; the value is never echoed back, it may be a secret."""
    if not _is_header_value(text):
        raise argparse.ArgumentTypeError(f"the token (--token or ${TOKEN_ENV}) must be visible ASCII without spaces")
    return text


def _session_id(text: str) -> str:
    """Parse ``--session``: it is sent as the ``x-session-id`` header, so it must be header-safe.

    The server's own, stricter rule answers INVALID_ARGUMENT; this only keeps values grpc
    cannot send at all from becoming a local exception.
    """
    if not _is_header_value(text):
        raise argparse.ArgumentTypeError(f"must be visible ASCII without spaces: {text!r}")
    return text


def parse_run_ref(text: str) -> tuple[str, int]:
    """Parse ``--resume RUN_ID[:SEQUENCE]``: the run, and the last sequence already seen (0: from the start)."""
    run_id, sep, sequence = text.partition(":")
    if not run_id or not _is_header_value(run_id):
        raise argparse.ArgumentTypeError(f"expected RUN_ID[:SEQUENCE], got {text!r}")
    if not sep:
        return run_id, 0
    if not (sequence.isascii() and sequence.isdigit()):
        raise argparse.ArgumentTypeError(f"SEQUENCE must be a number >= 0, got {sequence!r}")
    return run_id, int(sequence)


def parse_metadata_item(text: str) -> tuple[str, str]:
    """Parse one ``-m KEY=VALUE``; the value may itself contain ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; ``environ`` is injectable so the environment defaults can be tested."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="agentctl", description="Command-line client for agent.AgentService.")
    parser.add_argument(
        "--target",
        default=env.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"server address (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"deadline of each call, i.e. of each answer in a chat (default: none for chat and "
        f"health --watch, {DEFAULT_TIMEOUT:g} s for health)",
    )
    parser.add_argument(
        "--token",
        type=_token,
        default=env.get(TOKEN_ENV, ""),
        metavar="TOKEN",
        help=f"send 'authorization: Bearer TOKEN' with every call (default: ${TOKEN_ENV}, "
        "which keeps the token out of the process list)",
    )
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--plaintext", dest="tls", action="store_false", default=False, help="no TLS (default)")
    security.add_argument("--tls", dest="tls", action="store_true", default=False, help="use TLS")
    parser.add_argument("--ca", metavar="FILE", help="PEM root certificates for --tls (default: the system's)")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser(
        "chat", help="chat with the agent: one answer to PROMPT, else a conversation read from stdin"
    )
    chat.add_argument(
        "prompt", nargs="?", help="one message (one StreamChat call); omit it to chat line by line on one session"
    )
    chat.add_argument(
        "--session",
        type=_session_id,
        metavar="ID",
        default="",
        help="session to continue (without a prompt, a new agentctl-... id is made up when omitted)",
    )
    chat.add_argument(
        "-m",
        "--metadata",
        type=parse_metadata_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata entry (repeatable)",
    )
    chat.add_argument("--json", action="store_true", help="print each response as one JSON line")
    chat.add_argument(
        "--on-disconnect",
        choices=DISCONNECT_POLICIES,
        help="when the connection drops mid-answer: 'continue' (default) lets the answer run on at the server "
        "and agentctl resumes it; 'cancel' stops it (and so does Ctrl-C, at once)",
    )
    chat.add_argument(
        "--if-busy",
        choices=BUSY_POLICIES,
        help="when the session is answering another request: 'reject' (ABORTED), 'enqueue' (wait in line) or "
        "'interrupt' (stop that answer); default: enqueue in a terminal conversation, else reject",
    )
    chat.add_argument(
        "--resume",
        type=parse_run_ref,
        metavar="RUN_ID[:SEQUENCE]",
        help="show the rest of a run (the events after SEQUENCE, default 0: all of it), then its live events",
    )

    health = commands.add_parser("health", help="grpc.health.v1 check (exit 0 only when SERVING)")
    health.add_argument("service", nargs="?", default="", help='service name (default: "", the whole server)')
    health.add_argument("--watch", action="store_true", help="stream status changes until interrupted")
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse and cross-check options that argparse cannot relate by itself."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.ca is not None and not args.tls:
        parser.error("--ca requires --tls")
    if args.command == "chat" and args.resume is not None and _asks_a_new_answer(args):
        parser.error("--resume follows a run that exists: no prompt, --session, -m, --on-disconnect or --if-busy")
    return args


def _asks_a_new_answer(args: argparse.Namespace) -> bool:
    return args.prompt is not None or any((args.session, args.metadata, args.on_disconnect, args.if_busy))


def effective_timeout(args: argparse.Namespace) -> float | None:
    """The deadline of each call: the explicit one, else none for open-ended streams, else the fast-fail default."""
    if args.timeout is not None:
        return float(args.timeout)
    if args.command == "chat" or (args.command == "health" and args.watch):
        return None
    return DEFAULT_TIMEOUT
