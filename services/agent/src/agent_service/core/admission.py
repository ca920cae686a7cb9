"""Admission control: a hard cap on concurrent streams, refused at once when full or draining.

grpc.aio's own `maximum_concurrent_rpcs` counts health checks and reflection too and
queues callers; this counts only agent streams and answers at once: RESOURCE_EXHAUSTED
when full, UNAVAILABLE while the server drains (a status proxies retry on another
replica, unlike the CANCELLED a call cut by the shutdown itself would get).
"""

from __future__ import annotations

import asyncio

from agent_service.core.errors import ChatError, ErrorKind

DRAINING_MESSAGE = "the server is shutting down; retry (another replica will answer)"


class Admission:
    """Counts streams in flight against a fixed limit (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Take a slot or raise ChatError; pair with `leave`."""
        if self.draining:
            raise ChatError(ErrorKind.UNAVAILABLE, DRAINING_MESSAGE)
        if self.in_flight >= self.limit:
            raise ChatError(
                ErrorKind.RESOURCE_EXHAUSTED, f"server is at its limit of {self.limit} concurrent streams; retry later"
            )
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (bounded) until no stream is in flight; True if that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
