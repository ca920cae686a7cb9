"""Agents built ahead of time for unpersisted conversations.

A call without a session id gets a fresh strands Agent; building one (strands'
plugin, hook and tool discovery) took about half a millisecond, on the call's
path to its first token. A few are kept built instead, and a call that ends
builds the next one after its last event has gone out, so the cost leaves the
time to first chunk (the CPU is the same). Each agent serves one conversation
and is never reused.
"""

from __future__ import annotations

import asyncio

from agent_service.core.sessions import AgentFactory, Session

SPARES = 2


class SpareAgents:
    """Up to `size` agents built ahead; `session` hands out a fresh unpersisted conversation."""

    def __init__(self, factory: AgentFactory, size: int = SPARES) -> None:
        self._factory = factory
        self._size = size
        self._spares: list[Session] = []
        self._refilling = False
        self.stopped = False

    def __len__(self) -> int:
        return len(self._spares)

    def session(self) -> Session:
        """An unpersisted conversation no other call can find, with its agent built if one was spare."""
        if self._spares:
            return self._spares.pop()
        return Session(key=None)

    def refill_soon(self) -> None:
        """Build one more spare once the loop has done what is ready now (e.g. after a call's last event)."""
        if self._refilling or self.stopped or len(self._spares) >= self._size:
            return
        self._refilling = True
        asyncio.get_running_loop().call_soon(self._build)

    def _build(self) -> None:
        self._refilling = False
        if self.stopped or len(self._spares) >= self._size:
            return
        session = Session(key=None)
        session.agent, session.retry, session.manager = self._factory.create(None)
        self._spares.append(session)
