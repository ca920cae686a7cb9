"""grpc.health.v1 with two endings the reference servicer lacks.

- Drain: once the server drains, every `Watch` gets NOT_SERVING and then ends, so
  an idle watcher does not hold the shutdown for its whole grace period.
- Deadline: a `Watch` ends with DEADLINE_EXCEEDED a margin before the client's
  deadline, like agent calls, so a proxy enforcing the same deadline does not reset
  the stream (which a client sees as INTERNAL).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# grpc.aio reports "no deadline" as a time remaining far in the future.
_NO_DEADLINE_S = 1e8


class _Recorded:
    """A servicer context that remembers the last status written through it."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.last_status: int | None = None

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.last_status = message.status
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """The reference aio servicer, with Watch ended at drain and before the client's deadline."""

    def __init__(self, deadline_margin_s: float) -> None:
        super().__init__()
        self._margin_s = deadline_margin_s
        self._draining = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining.set()

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        recorded = _Recorded(context)
        watching = asyncio.ensure_future(super().Watch(request, recorded))
        drained = asyncio.ensure_future(self._draining.wait())
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > _NO_DEADLINE_S else max(0.0, remaining - self._margin_s)
        try:
            done, _ = await asyncio.wait({watching, drained}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not watching.done():
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
        if watching in done:
            return watching.result()  # type: ignore[no-any-return]
        if drained in done:
            if recorded.last_status != NOT_SERVING:
                await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
            return None
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the watch reached the client's deadline")
        return None
