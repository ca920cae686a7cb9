"""Readiness follows the session store: a replica that cannot reach it says so, without flapping.

Calls that need the store would fail with UNAVAILABLE anyway; reporting NOT_SERVING
lets Envoy and Kubernetes send them to a replica that can serve them. A probe every
`INTERVAL_S`; `FAILURES` failures in a row turn readiness off, `SUCCESSES` successes
in a row turn it back on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from structlog.typing import FilteringBoundLogger

from agent_service.store import SessionStore, StoreUnavailableError

INTERVAL_S = 2.0
FAILURES = 2
SUCCESSES = 2


class StoreMonitor:
    """Probes the store in the background; `healthy` is safe to read from any thread."""

    def __init__(self, store: SessionStore, log: FilteringBoundLogger, interval_s: float = INTERVAL_S) -> None:
        self._store = store
        self._log = log
        self._interval_s = interval_s
        self.healthy = True
        self.task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._streak = 0

    def on_change(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._probe_forever())

    async def probe(self) -> None:
        """One probe; flips `healthy` after enough results in a row."""
        try:
            await self._store.check()
            ok, detail = True, ""
        except StoreUnavailableError as exc:
            ok, detail = False, exc.message
        if ok == self.healthy:
            self._streak = 0
            return
        self._streak += 1
        if self._streak < (SUCCESSES if ok else FAILURES):
            return
        self._streak = 0
        self.healthy = ok
        if ok:
            self._log.info("store.available", store=self._store.name)
        else:
            self._log.warning("store.unavailable", store=self._store.name, error=detail)
        for listener in self._listeners:
            listener(ok)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.probe()
