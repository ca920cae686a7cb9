"""Runs: every answer runs in a task of its own, its events logged so it can outlive its connection.

A `Run` drives the runner, numbers its events, hands them to the call that asked
(`follow`) and appends them to the store's run log (in batches, off the answer's
path), so a client whose connection dropped gets the rest from any replica with
ResumeStream. When the client leaves, the run is cancelled (`on_disconnect=CANCEL`,
the default) or runs to its end (`CONTINUE`), keeping the stream slot of the call
that started it until then. A silent run gets a heartbeat every `AGENT_HEARTBEAT_S`.

Lifecycle (the README draws it):

    start ─▶ running ─┬─▶ done ──────────┐
                      ├─▶ failed ────────┤─▶ kept for AGENT_RUN_RETENTION_S ─▶ forgotten
                      └─▶ interrupted ───┘
    (the client may leave at any point: CANCEL → interrupted, CONTINUE → runs on)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from structlog.typing import FilteringBoundLogger

from agent_service.core.deadline import Deadline
from agent_service.core.errors import ChatError, ErrorKind
from agent_service.core.events import Done, Failure, Finished, Heartbeat, Reply, ReplyEvent
from agent_service.core.requests import ValidRequest
from agent_service.core.runner import AgentRunner
from agent_service.core.sessions import Session
from agent_service.settings import Settings
from agent_service.store import RunLog, RunNotFoundError, SessionKey, StoreUnavailableError

# The run log is written in batches at most this often (the answer itself never waits for it).
LOG_FLUSH_S = 0.01


def new_run_id() -> str:
    return uuid.uuid4().hex


class Run:
    """One answer, driven in its own task; `follow` yields its events to the call that started it."""

    def __init__(
        self,
        manager: RunManager,
        run_id: str,
        call_id: str,
        turn: int,
        session_id: str,
        owner: str,
        base_sequence: int,
    ) -> None:
        self.run_id = run_id
        self.owner = owner
        self.last_sequence = base_sequence
        self.finished = asyncio.Event()
        self.on_end: Callable[[], None] | None = None  # called once when the run ends (gives back its slot)
        self._manager = manager
        self._call_id = call_id
        self._turn = turn
        self._session_id = session_id
        self._feed: asyncio.Queue[Reply | ChatError | None] = asyncio.Queue()
        self._attached = True
        self._pending: list[dict[str, Any]] = []
        self._log_started = False
        self._log_failed = False
        self._flusher: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None

    async def follow(self) -> AsyncIterator[Reply]:
        """The run's events as they happen (heartbeats when silent); raises the run's ChatError after its Failure."""
        heartbeat_s = self._manager.heartbeat_s
        while True:
            if self._feed.empty():
                try:
                    async with asyncio.timeout(heartbeat_s):
                        item = await self._feed.get()
                except TimeoutError:
                    yield self._reply(Heartbeat(), self.last_sequence)
                    continue
            else:
                item = self._feed.get_nowait()
            if item is None:
                return
            if isinstance(item, ChatError):
                raise item
            yield item

    def detach(self) -> None:
        """The client left; the run goes on to its end (CONTINUE), its events only logged."""
        self._attached = False
        self._manager.log.info("run.detached", run_id=self.run_id, session_id=self._session_id)

    def cancel(self) -> None:
        """The client left (CANCEL): stop the answer (its partial text stays in the history)."""
        self._attached = False
        if self.task is not None:
            self.task.cancel()

    async def drive(
        self,
        runner: AgentRunner,
        target: Session | SessionKey,
        request: ValidRequest,
        deadline: Deadline,
        started: Callable[[], Awaitable[None]] | None,
    ) -> None:
        """Run the answer: number, log and hand out each event; end with Done, or Failure and the error."""
        clock = time.perf_counter()
        count = 0
        try:
            events = runner.run(target, request.content, deadline, request.if_busy, started)
            async for event in events:
                if isinstance(event, Finished):
                    duration_ms = round((time.perf_counter() - clock) * 1000, 3)
                    self._emit(Done(event.stop_reason, event.usage, count, duration_ms))
                else:
                    count += 1
                    self._emit(event)
        except ChatError as error:
            if not (error.kind is ErrorKind.ABORTED and count == 0 and not self._log_started):
                self._emit(Failure(error.kind.value, error.message))  # not for a refusal before anything ran
            self._put(error)
        finally:
            self._put(None)
            await self._close_log()
            self.finished.set()
            if self.on_end is not None:
                self.on_end()

    def open_log(self) -> None:
        """Start keeping the run's events in the store (the session is taken: the run is on)."""
        if self._manager.retention_s > 0 and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    def _emit(self, event: ReplyEvent) -> None:
        self.last_sequence += 1
        reply = self._reply(event, self.last_sequence)
        self._put(reply)
        if self._manager.retention_s > 0 and not self._log_failed:
            self._pending.append(reply.to_record())
            self.open_log()

    def _put(self, item: Reply | ChatError | None) -> None:
        if self._attached or item is None:
            self._feed.put_nowait(item)

    def _reply(self, event: ReplyEvent, sequence: int) -> Reply:
        return Reply(self._call_id, sequence, self._turn, self._session_id, event, self.run_id)

    async def _flush_forever(self) -> None:
        """Append pending events to the run log in batches; a log that fails is given up (the answer goes on)."""
        log = self._manager.runs
        try:
            await log.start(self.run_id, self.owner, self._manager.max_life_s)
            self._log_started = True
            while True:
                if self._pending:
                    batch, self._pending = self._pending, []
                    await log.append(self.run_id, batch)
                await asyncio.sleep(LOG_FLUSH_S)
        except StoreUnavailableError as error:
            self._log_failed = True
            self._pending.clear()
            self._manager.log.warning("run.log_failed", run_id=self.run_id, error=error.message)

    async def _close_log(self) -> None:
        if self._flusher is None:
            return
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        if self._log_failed:
            return
        with contextlib.suppress(StoreUnavailableError):
            if not self._log_started:
                await self._manager.runs.start(self.run_id, self.owner, self._manager.max_life_s)
            if self._pending:
                await self._manager.runs.append(self.run_id, self._pending)
                self._pending = []
            await self._manager.runs.end(self.run_id, self._manager.retention_s)


class RunManager:
    """Starts runs, keeps track of those still going, and replays them (ResumeStream)."""

    def __init__(self, runner: AgentRunner, runs: RunLog, settings: Settings, log: FilteringBoundLogger) -> None:
        self._runner = runner
        self.runs = runs
        self.log = log
        self.retention_s = settings.run_retention_s
        self.heartbeat_s = settings.heartbeat_s
        # A run lasts at most the server's cap (plus winding down); its log must outlive that.
        self.max_life_s = settings.max_stream_duration_s + 2 * settings.cancel_grace_s + settings.run_retention_s + 60
        self._live: set[Run] = set()

    def start(
        self,
        target: Session | SessionKey,
        request: ValidRequest,
        deadline: Deadline,
        *,
        call_id: str,
        turn: int,
        owner: str,
        base_sequence: int,
        started: Callable[[str], Awaitable[None]] | None = None,
    ) -> Run:
        """Start one answer in a task of its own."""
        run = Run(self, new_run_id(), call_id, turn, request.session_id, owner, base_sequence)

        async def run_started() -> None:
            run.open_log()  # resumable from now on, even before its first event
            if started is not None:
                await started(run.run_id)

        run.task = asyncio.get_running_loop().create_task(
            run.drive(self._runner, target, request, deadline, run_started)
        )
        self._live.add(run)
        run.task.add_done_callback(lambda _task: self._live.discard(run))
        return run

    async def replay(self, run_id: str, after: int, principal: str, until: float) -> AsyncIterator[Reply]:
        """A run's events after `after`: those kept, then the live ones until it ends (or `until`, loop time).

        Heartbeats fill silences. NOT_FOUND when the run is unknown, expired or not the caller's.
        A run that failed ends the replay with its error, after its Failure event, as it did live.
        """
        if self.retention_s <= 0 or await self.runs.owner(run_id) != principal:
            raise RunNotFoundError(run_id)
        loop = asyncio.get_running_loop()
        last = after
        quiet_since = loop.time()
        while True:
            wait_s = max(0.0, min(1.0, until - loop.time(), quiet_since + self.heartbeat_s - loop.time()))
            records, ended = await self.runs.read(run_id, last, wait_s)
            for record in records:
                reply = Reply.from_record(record)
                if reply.sequence <= last:
                    continue
                last = reply.sequence
                quiet_since = loop.time()
                yield reply
                if isinstance(reply.event, Failure):
                    raise ChatError(ErrorKind(reply.event.code), reply.event.message)
            if ended:
                return
            if loop.time() >= until:
                raise ChatError(ErrorKind.DEADLINE_EXCEEDED, "the run was still going when the deadline came")
            if loop.time() - quiet_since >= self.heartbeat_s:
                quiet_since = loop.time()
                yield Reply("", last, 0, "", Heartbeat(), run_id)

    async def aclose(self, timeout_s: float) -> None:
        """Let runs still going (clients gone, CONTINUE) finish within `timeout_s`, then cancel them."""
        if self._live:
            tasks = {run.task for run in self._live if run.task is not None}
            _, pending = await asyncio.wait(tasks, timeout=timeout_s) if tasks else (set(), set())
            for task in pending:
                task.cancel()
