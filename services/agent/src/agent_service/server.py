"""Assembles the grpc.aio server around the chat core: servicer, health, reflection, metrics, drain.

`AgentServer` is the whole service as an object (tests start several on
ephemeral ports in one process); `main` is the `agent-service` console script:
one process, or with `AGENT_WORKERS` > 1 a supervisor of that many worker
processes on one port (`agent_service.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from strands.models import Model

from agent_service import __version__
from agent_service.core import ChatCore
from agent_service.core.admission import Admission
from agent_service.core.runner import AgentRunner
from agent_service.core.sessions import SessionRegistry
from agent_service.logs import configure_logging
from agent_service.rpc.health import HealthServicer
from agent_service.rpc.servicer import SERVICE_NAME, AgentServicer
from agent_service.settings import Settings
from agent_service.telemetry import tracing
from agent_service.telemetry.metrics import Metrics, MetricsEndpoint

HEALTH_SERVICES = ("", SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the drain, what is left (health checks, reflection, calls racing the shutdown) gets this long.
_FINAL_STOP_GRACE_S = 1.0


class AgentServer:
    """The agent service's gRPC server and everything it owns."""

    def __init__(
        self, settings: Settings, model: Model | None = None, traced: bool = False, worker: int | None = None
    ) -> None:
        """`traced`: a global tracer provider is installed, so RPCs get server spans.

        `worker`: this server is that worker of a group sharing its port (SO_REUSEPORT);
        its metrics go to the group's multiprocess files, served by the supervisor.
        """
        self.settings = settings
        self.worker = worker
        self.log = structlog.get_logger("agent_service")
        self.metrics: Metrics | None = None
        if settings.metrics_enabled:
            self.metrics = Metrics(
                settings.resolved_model_id(), __version__, settings.model_provider, multiprocess=worker is not None
            )
        self.core = ChatCore(settings, model, self.metrics, self.log)
        self.health = HealthServicer(settings.deadline_margin_ms / 1000)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.server = grpc.aio.server(
            interceptors=[tracing.server_interceptor()] if traced else None,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Alone, a taken port must fail, not be silently shared; a worker shares its group's port.
                ("grpc.so_reuseport", 0 if worker is None else 1),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self.server.add_generic_rpc_handlers((AgentServicer(self.core).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def registry(self) -> SessionRegistry:
        return self.core.registry

    @property
    def runner(self) -> AgentRunner:
        return self.core.runner

    @property
    def admission(self) -> Admission:
        return self.core.admission

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await self.server.start()
        if self.metrics is not None and self.worker is None:
            core = self.core
            self.metrics_endpoint = self.metrics.serve(
                self.settings.metrics_host, self.settings.metrics_port, serving=lambda: core.serving
            )
        for name in HEALTH_SERVICES:
            await self.health.set(name, _SERVING)
        self.core.store_monitor.on_change(self._store_changed)
        await self.core.start()
        self.log.info(
            "server.start",
            address=address,
            port=self.port,
            provider=self.settings.model_provider,
            model=self.settings.resolved_model_id(),
            reflection=self.settings.reflection,
            store=self.core.store.name,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )
        return self.port

    def _store_changed(self, available: bool) -> None:
        """The agent service is ready only while its session store answers (the process itself stays live)."""
        task = asyncio.get_running_loop().create_task(
            self.health.set(SERVICE_NAME, _SERVING if available else _NOT_SERVING)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, then stop.

        Health turns NOT_SERVING (Watch streams get it and end), new calls are refused
        with UNAVAILABLE (proxies retry those on another replica), idle bidi streams
        end, and answers in flight get the grace to finish; only then does the gRPC
        server stop, cancelling whatever is left. With nothing in flight this takes
        milliseconds, not the grace.
        """
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.log.info("server.drain", grace_s=grace, streams_in_flight=self.core.admission.in_flight)
        await self.health.enter_graceful_shutdown()
        await self.core.drain(grace)
        await self.server.stop(_FINAL_STOP_GRACE_S)
        # Cancelled handlers finish their clean-up (and hand runs to the runner) after stop() returns.
        await self.core.admission.wait_idle(timeout_s=5)
        await self.core.aclose()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self._stopped.set()
        self.log.info("server.stop")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(
    settings: Settings,
    traced: bool,
    worker: int | None = None,
    alongside: Callable[[AgentServer, asyncio.Event], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (or `alongside` sets the event it is given), then drain.

    `alongside` runs from start-up until the drain has ended (a worker's heartbeat).
    """
    server = AgentServer(settings, traced=traced, worker=worker)
    await server.start()
    # Everything imported and built so far lives as long as the process: move it out of the
    # collector's reach, so full collections scan only what calls allocate (GC pauses were
    # the p99 of time to first chunk).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    companion = loop.create_task(alongside(server, stop)) if alongside is not None else None
    await stop.wait()
    await server.stop()
    if companion is not None:
        companion.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await companion


def main() -> None:
    """The `agent-service` console script."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing.record_content(settings.trace_content)
    if (workers := settings.resolved_workers()) > 1:
        from agent_service.workers import run_group  # imports this module: only now

        sys.exit(run_group(settings, workers))
    provider = tracing.configure_tracing() if tracing.tracing_requested(os.environ) else None
    try:
        asyncio.run(serve(settings, traced=provider is not None))
    finally:
        if provider is not None:
            provider.shutdown()  # flushes spans still batched


if __name__ == "__main__":
    main()
