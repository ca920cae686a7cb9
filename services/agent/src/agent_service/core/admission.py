"""Admission control: hard caps on concurrent streams, refused at once when full or draining.

Two caps: the server's (`AGENT_MAX_CONCURRENT_STREAMS`) and each caller's
(`AGENT_MAX_STREAMS_PER_PRINCIPAL`, counted per principal, or per address for
anonymous callers), so one caller (1,000 idle bidi streams on one connection) cannot
take every slot while others wait. grpc.aio's own `maximum_concurrent_rpcs` counts
health checks and reflection too and queues callers; this counts only agent streams
and answers at once: RESOURCE_EXHAUSTED when full, UNAVAILABLE while the server drains
(a status proxies retry on another replica, unlike the CANCELLED a call cut by the
shutdown itself would get).
"""

from __future__ import annotations

import asyncio

from agent_service.core.errors import ChatError, ErrorKind, Fault

DRAINING_MESSAGE = "the server is shutting down; retry (another replica will answer)"


class Admission:
    """Counts streams in flight against the server's and each caller's limit (one event loop: no lock needed)."""

    def __init__(self, limit: int, per_caller: int | None = None) -> None:
        self.limit = limit
        self.per_caller = per_caller or limit
        self.in_flight = 0
        self.draining = False
        self._by_caller: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, caller: str = "") -> None:
        """Take a slot for `caller` (its limit key) or raise ChatError; pair with `leave(caller)`."""
        if self.draining:
            raise ChatError(ErrorKind.UNAVAILABLE, DRAINING_MESSAGE)
        if self.in_flight >= self.limit:
            raise ChatError(
                ErrorKind.RESOURCE_EXHAUSTED, f"server is at its limit of {self.limit} concurrent streams; retry later"
            )
        held = self._by_caller.get(caller, 0)
        if held >= self.per_caller:
            raise ChatError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"you have {held} streams open, the limit per caller; close one or retry later",
                Fault.CLIENT,
            )
        self._by_caller[caller] = held + 1
        self.in_flight += 1
        self._idle.clear()

    def leave(self, caller: str = "") -> None:
        held = self._by_caller.get(caller, 0) - 1
        if held > 0:
            self._by_caller[caller] = held
        else:
            self._by_caller.pop(caller, None)
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
