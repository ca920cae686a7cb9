"""Assembles the grpc.aio server: servicer, health, reflection, limits, signals and drain.

`AgentServer` is the whole service as an object (tests start several on
ephemeral ports in one process); `main` is the `agent-service` console script.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from strands.models import Model

from agent_service import __version__
from agent_service.admission import Admission
from agent_service.logs import configure_logging
from agent_service.models import build_model
from agent_service.proto import agent_pb2, agent_pb2_grpc
from agent_service.runner import AgentRunner
from agent_service.servicer import AgentServicer
from agent_service.sessions import AgentFactory, SessionRegistry
from agent_service.settings import Settings
from agent_service.telemetry import tracing
from agent_service.telemetry.metrics import Metrics, MetricsEndpoint
from agent_service.validation import RequestLimits

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING


class AgentServer:
    """The agent service's gRPC server and everything it owns."""

    def __init__(self, settings: Settings, model: Model | None = None, traced: bool = False) -> None:
        """`traced`: a global tracer provider is installed, so RPCs get server spans."""
        self.settings = settings
        self.log = structlog.get_logger("agent_service")
        self.registry = SessionRegistry(AgentFactory(settings, model or build_model(settings)), settings)
        self.runner = AgentRunner(self.registry, settings.cancel_grace_s, settings.coalesce_text)
        self.admission = Admission(settings.max_concurrent_streams)
        self.health = health.aio.HealthServicer()
        self.metrics: Metrics | None = None
        if settings.metrics_enabled:
            self.metrics = Metrics(settings.resolved_model_id(), __version__, settings.model_provider)
            self.metrics.sessions_active.set_function(lambda: len(self.registry))
            self.metrics.streams_limit.set(settings.max_concurrent_streams)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.server = grpc.aio.server(
            interceptors=[tracing.server_interceptor()] if traced else None,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port must fail, not be silently shared
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        servicer = AgentServicer(
            runner=self.runner,
            registry=self.registry,
            admission=self.admission,
            limits=RequestLimits.from_settings(settings),
            max_stream_duration_s=settings.max_stream_duration_s,
            deadline_margin_s=settings.deadline_margin_ms / 1000,
            bidi_read_ahead=settings.bidi_read_ahead,
            log=self.log,
            metrics=self.metrics,
            model=settings.resolved_model_id(),
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._evictor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await self.server.start()
        if self.metrics is not None:
            self.metrics_endpoint = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        for name in HEALTH_SERVICES:
            await self.health.set(name, _SERVING)
        interval = max(1.0, min(60.0, self.settings.session_idle_s / 4))
        self._evictor = asyncio.create_task(self.registry.evict_idle_forever(interval))
        self.log.info(
            "server.start",
            address=address,
            port=self.port,
            provider=self.settings.model_provider,
            model=self.settings.resolved_model_id(),
            reflection=self.settings.reflection,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let streams finish within the grace, then cancel them."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.log.info("server.drain", grace_s=grace, streams_in_flight=self.admission.in_flight)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # Cancelled handlers finish their clean-up (and hand runs to the runner) after stop() returns.
        await self.admission.wait_idle(timeout_s=5)
        await self.runner.aclose(self.settings.cancel_grace_s * 2 + 1)
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self._stopped.set()
        self.log.info("server.stop")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings, traced: bool) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    server = AgentServer(settings, traced=traced)
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
    await stop.wait()
    await server.stop()


def main() -> None:
    """The `agent-service` console script."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing.record_content(settings.trace_content)
    provider = tracing.configure_tracing() if tracing.tracing_requested(os.environ) else None
    try:
        asyncio.run(serve(settings, traced=provider is not None))
    finally:
        if provider is not None:
            provider.shutdown()  # flushes spans still batched


if __name__ == "__main__":
    main()
