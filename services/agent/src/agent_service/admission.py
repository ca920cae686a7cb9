"""Admission control: a hard cap on concurrent streams, refused at once when full.

grpc.aio's own `maximum_concurrent_rpcs` has had bugs and counts health checks
and reflection too; this counts only agent streams and answers
RESOURCE_EXHAUSTED immediately instead of queueing callers.
"""

from __future__ import annotations

import asyncio


class AdmissionRejectedError(RuntimeError):
    """The server is at its stream limit."""


class Admission:
    """Counts streams in flight against a fixed limit (single event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Take a slot or raise AdmissionRejectedError; pair with `leave`."""
        if self.in_flight >= self.limit:
            raise AdmissionRejectedError(f"server is at its limit of {self.limit} concurrent streams; retry later")
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
