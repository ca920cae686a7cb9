"""The journal of a turn in progress: the partial answer, kept in the store while it streams.

strands saves the history message by message: the user's prompt as soon as the turn
starts, the answer when it is complete. If the process dies in between, what the
client already received would be lost; the journal keeps it (at most
`INTERVAL_S` behind), so the next holder of the session closes the turn with it
(`SessionRegistry._load`). Writes are best-effort and never delay the answer: a
background task writes the latest text at most every `INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent_service.store import Lease, StoreUnavailableError

INTERVAL_S = 0.25
STOP_WAIT_S = 1.5


class TurnJournal:
    """Writes a turn's partial answer to its lease, throttled, in the background."""

    def __init__(self, lease: Lease, interval_s: float = INTERVAL_S) -> None:
        self._lease = lease
        self._interval_s = interval_s
        self._parts: list[str] = []
        self._changed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def progress(self, parts: list[str]) -> None:
        """The text handed out so far in this answer message (the list is read when written)."""
        self._parts = parts
        self._changed.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())

    async def stop(self) -> None:
        """No more writes (the turn is being closed); a write under way finishes first.

        Cancelling a store command in flight costs more than letting it finish: the Redis
        client drops (and slowly closes) its connection.
        """
        self._stopped.set()
        if self._writer is None:
            return
        done, _ = await asyncio.wait({self._writer}, timeout=STOP_WAIT_S)
        if not done:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def clear(self) -> None:
        """The turn is closed in the history: its journal goes."""
        if self._writer is not None:
            await self._lease.clear_journal()

    async def _write_forever(self) -> None:
        with contextlib.suppress(StoreUnavailableError):  # best effort: a lost write only costs partial text
            while not self._stopped.is_set():
                self._changed.clear()
                await self._lease.write_journal("".join(self._parts))
                with contextlib.suppress(TimeoutError):  # the next write no sooner than the interval
                    await asyncio.wait_for(self._stopped.wait(), self._interval_s)
                if not self._stopped.is_set():
                    await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        changed = asyncio.ensure_future(self._changed.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stopped.cancel()
