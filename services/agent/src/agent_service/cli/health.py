"""``agentctl health [--watch] [SERVICE]``: the grpc.health.v1 status, exit 0 only when SERVING."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_service.cli.connect import call_options
from agent_service.cli.exits import EXIT_FAILURE, EXIT_OK
from agent_service.cli.render import Renderer


def status_name(status: int) -> str:
    """Name of a serving status, tolerating values newer than this client."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return f"UNKNOWN_STATUS({status})"


def health_exit_code(status: int) -> int:
    """0 only for SERVING, so ``agentctl health && ...`` gates on real readiness."""
    return EXIT_OK if status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILURE


async def check(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """Check (or, with ``--watch``, follow until the server ends the stream) the status of ``args.service``."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=args.service)
    options = call_options(args)
    if not args.watch:
        resp = await stub.Check(request, timeout=options.timeout, metadata=options.metadata)
        out.line(status_name(resp.status))
        return health_exit_code(resp.status)
    status = health_pb2.HealthCheckResponse.UNKNOWN
    call = stub.Watch(request, timeout=options.timeout, metadata=options.metadata)
    try:
        async for resp in call:
            status = resp.status
            out.line(status_name(status))
    except asyncio.CancelledError:
        call.cancel()
        raise
    return health_exit_code(status)


def run(runner: asyncio.Runner, channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """The ``health`` command."""
    return runner.run(check(channel, args, out))
