"""Writing runs' events to the store's run log: in batches, for every run of the process at once.

Each run used to flush its own events every 10 ms from a task of its own: with a
hundred slow streams that was ten thousand timer wake-ups a second and an append per
event, most of the service's CPU beyond strands and gRPC. Here one writer per process
keeps the events runs hand it (as `Reply` objects: they become JSON-able records
only when written), and one flush every `FLUSH_S` appends each run's batch. A run's
beginning (so it can be resumed before its first event) and its end are written at
once. The answer itself never waits for the log; a log that fails is given up for
that run (the answer goes on, it just cannot be resumed). Since the store's writes
happen off the answer's path, the writer also says whose its unfinished runs are
(`owner`): a client may resume a run as soon as it has seen its id, before the store
has it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from agent_service.core.events import Reply
from agent_service.store import RunLog, StoreUnavailableError

# Events reach the log at most this long after they happened (the files store's readers poll as often).
FLUSH_S = 0.05


@dataclass(eq=False)
class RunRecord:
    """One run's state in the log: what is still to be written, and how far the log got."""

    run_id: str
    owner: str
    pending: list[Reply] = field(default_factory=list)
    started: bool = False  # the log knows the run (written)
    closing: bool = False  # the run ended: write its end after its last events
    failed: bool = False  # the store failed for this run: nothing more is written


class RunLogWriter:
    """Appends the events of every run of this process to the run log, batched (see the module docstring)."""

    def __init__(self, log: RunLog, ttl_s: float, retention_s: float, logger: FilteringBoundLogger) -> None:
        self._log = log
        self._ttl_s = ttl_s
        self._retention_s = retention_s
        self._logger = logger
        self._dirty: dict[str, RunRecord] = {}
        self._open: dict[str, str] = {}  # run id → owner, from `open` until the run's end is written
        self._timer: asyncio.Handle | None = None
        self._due = 0.0  # loop time of the next flush while `_timer` is set
        self._flushing: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """Nothing is waiting to be written and no write is under way (no task of its own is alive)."""
        return not self._dirty and self._flushing is None and self._timer is None

    def open(self, record: RunRecord) -> None:
        """A run is on: make it known to the log now (resumable before its first event)."""
        self._open[record.run_id] = record.owner
        self._mark(record, 0.0)

    def owner(self, run_id: str) -> str | None:
        """The owner of a run of this process whose end the store does not have yet (None otherwise)."""
        return self._open.get(run_id)

    def add(self, record: RunRecord, reply: Reply) -> None:
        """One event of the run, written with the next batch."""
        if record.failed:
            return
        record.pending.append(reply)
        if record.run_id not in self._dirty:
            self._mark(record, FLUSH_S)

    def close(self, record: RunRecord) -> None:
        """The run ended: its last events and its end are written now."""
        if record.failed:
            return
        record.closing = True
        self._mark(record, 0.0)

    async def aclose(self, timeout_s: float) -> None:
        """Write whatever is still pending (bounded), e.g. at shutdown."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._dirty or self._flushing is not None:
                    if self._flushing is not None:
                        await asyncio.shield(self._flushing)
                    else:
                        self._flush_now()

    def _mark(self, record: RunRecord, delay_s: float) -> None:
        self._dirty[record.run_id] = record
        if self._flushing is not None:
            return  # the flush under way goes on with it
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s
        if self._timer is not None:
            if self._due <= due:
                return
            self._timer.cancel()
        self._due = due
        self._timer = loop.call_at(due, self._flush_now) if delay_s else loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._timer = None
        if self._flushing is None and self._dirty:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty:
                batch = list(self._dirty.values())
                self._dirty.clear()
                for record in batch:
                    await self._write(record)
        finally:
            self._flushing = None

    async def _write(self, record: RunRecord) -> None:
        log, run_id = self._log, record.run_id
        try:
            if not record.started:
                await log.start(run_id, record.owner, self._ttl_s)
                record.started = True
            batch, record.pending = record.pending, []
            records = [reply.to_record() for reply in batch]
            if record.closing:
                await log.end(run_id, record.owner, self._retention_s, records)
                self._open.pop(run_id, None)
            elif records:
                await log.append(run_id, records)
        except StoreUnavailableError as error:
            record.failed = True
            record.pending.clear()
            self._dirty.pop(run_id, None)
            self._open.pop(run_id, None)
            self._logger.warning("run.log_failed", run_id=run_id, error=error.message)
