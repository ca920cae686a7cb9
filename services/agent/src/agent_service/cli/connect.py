"""The channel and the per-call options that agentctl's global options ask for."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent_service.cli.args import effective_timeout
from agent_service.cli.exits import CliError

# The header the service (and Envoy's session affinity) reads the session id from.
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What every call of one command carries: its deadline and its metadata."""

    timeout: float | None
    metadata: tuple[tuple[str, str], ...]


def call_metadata(token: str = "", session_id: str = "") -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer TOKEN`` when a token is given, ``x-session-id`` when a session is."""
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if session_id:
        metadata.append((SESSION_HEADER, session_id))
    return tuple(metadata)


def call_options(args: argparse.Namespace, session_id: str = "") -> CallOptions:
    """The options of the calls of ``args.command``, on ``session_id`` if any."""
    return CallOptions(effective_timeout(args), call_metadata(args.token, session_id))


def open_channel(args: argparse.Namespace) -> Any:
    """A grpc.aio channel to ``args.target``, plaintext or TLS; call it with the event loop running."""
    if not args.tls:
        return grpc.aio.insecure_channel(args.target)
    root = None
    if args.ca is not None:
        try:
            root = Path(args.ca).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --ca file: {exc}") from None
    return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=root))
