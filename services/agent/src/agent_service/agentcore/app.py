"""The AgentCore Runtime face: the bedrock-agentcore SDK's app over the chat core, and `agent-agentcore`.

`agent-agentcore` serves `BedrockAgentCoreApp` on `AGENT_AGENTCORE_HOST:AGENT_AGENTCORE_PORT`
(8080, which the Runtime expects): `POST /invocations` (`invocation.py`, formats in
`protocol.py`), `GET /ping` (`HealthyBusy` while any answer streams, so the Runtime
keeps a working session's microVM) and `/ws` (`websocket.py`).

Everything runs on the server's one event loop: `/invocations` is this package's own
route, ahead of the SDK's, because the SDK runs handlers on a worker thread's loop
and parses bodies without a size or depth limit. The rules, statuses and telemetry
are the gRPC service's: one chat core, one error table, the same metric families.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import structlog
import uvicorn
from bedrock_agentcore.runtime import BedrockAgentCoreApp, PingStatus, RequestContext
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.websockets import WebSocket
from strands.models import Model

from agent_service import __version__
from agent_service.agentcore.invocation import Invocations
from agent_service.agentcore.websocket import serve_websocket
from agent_service.core import ChatCore
from agent_service.logs import configure_logging
from agent_service.settings import Settings
from agent_service.telemetry import tracing
from agent_service.telemetry.metrics import Metrics


class AgentCoreFace:
    """The BedrockAgentCoreApp serving the chat core; `app` is the ASGI application."""

    def __init__(self, settings: Settings, model: Model | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("agent_service.agentcore")
        self.metrics: Metrics | None = None
        if settings.metrics_enabled:
            self.metrics = Metrics(settings.resolved_model_id(), __version__, settings.model_provider)
        self.core = ChatCore(settings, model, self.metrics, self.log)
        self.app = BedrockAgentCoreApp(lifespan=self._lifespan)
        self.app.logger.setLevel("WARNING")  # call.start / call.end are the invocation's log lines
        self.app.router.routes.insert(0, Route("/invocations", Invocations(self.core), methods=["POST"]))
        self.app.ping(self.ping)
        self.app.websocket(self._websocket)

    @property
    def in_flight(self) -> int:
        """Answers and conversations in progress (read from any thread)."""
        return self.core.admission.in_flight

    def ping(self) -> PingStatus:
        """`/ping`: HealthyBusy while any answer streams, so the Runtime does not reclaim the session."""
        return PingStatus.HEALTHY_BUSY if self.in_flight else PingStatus.HEALTHY

    def begin_drain(self) -> None:
        """Refuse new calls and end idle conversations (called when the process is told to stop)."""
        self.core.admission.draining = True
        self.core.draining.set()

    async def _websocket(self, websocket: WebSocket, _context: RequestContext) -> None:
        await serve_websocket(self.core, websocket)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Start the core on the server's loop; at shutdown (after uvicorn's graceful wait) wind it down."""
        await self.core.start()
        self.log.info("agentcore.ready", provider=self.settings.model_provider, model=self.core.model_name)
        yield
        await self.core.drain(0)
        await self.core.aclose()
        self.log.info("agentcore.stop")


class _DrainingServer(uvicorn.Server):
    """uvicorn, telling the face to drain as soon as a stop signal arrives (before its graceful wait)."""

    def __init__(self, config: uvicorn.Config, face: AgentCoreFace) -> None:
        super().__init__(config)
        self._face = face

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing to drain
            asyncio.get_running_loop().call_soon_threadsafe(self._face.begin_drain)
        super().handle_exit(sig, frame)


def main() -> None:
    """The `agent-agentcore` console script: the AgentCore Runtime HTTP face."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing.record_content(settings.trace_content)
    provider = tracing.configure_tracing() if tracing.tracing_requested(os.environ) else None
    face = AgentCoreFace(settings)
    core = face.core
    endpoint = (
        face.metrics.serve(settings.metrics_host, settings.metrics_port, serving=lambda: core.serving)
        if face.metrics
        else None
    )
    face.log.info(
        "agentcore.start",
        address=f"{settings.agentcore_host}:{settings.agentcore_port}",
        provider=settings.model_provider,
        metrics_port=endpoint.port if endpoint else None,
    )
    # uvicorn drains on SIGTERM/SIGINT, then restores the previous handlers and re-raises the
    # signal; with these no-op handlers in place a drained server exits 0, like `agent-service`.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    config = uvicorn.Config(
        face.app,
        host=settings.agentcore_host,
        port=settings.agentcore_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    try:
        _DrainingServer(config, face).run()
    finally:
        if endpoint is not None:
            endpoint.close()
        if provider is not None:
            provider.shutdown()  # flushes spans still batched


def _ignore(_signum: int, _frame: Any) -> None:
    pass


if __name__ == "__main__":
    main()
