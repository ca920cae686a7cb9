"""Runs: every answer runs in a task of its own, its events logged so it can outlive its connection.

A `Run` reads the runner's answer, numbers its events, hands them to the call that
asked (`follow`) and gives them to the run log writer (`run_log`: batched, off the
answer's path), so a client whose connection dropped gets the rest from any replica
with ResumeStream. When the client leaves, the run is cancelled (`on_disconnect=CANCEL`,
the default) or runs to its end (`CONTINUE`), keeping the stream slot of the call
that started it until then. A silent run gets a heartbeat every `AGENT_HEARTBEAT_S`.

A run that ends with its caller (CANCEL, and REJECT when busy: nothing to wait for
before answering) is read by the caller's own task, one event-loop hop per event
fewer; a run that may outlive its caller (CONTINUE) or wait in line first (ENQUEUE,
INTERRUPT, with heartbeats meanwhile) runs in a task of its own and hands its events
to the caller over a feed.

Lifecycle (the README draws it):

    start ─▶ running ─┬─▶ done ──────────┐
                      ├─▶ failed ────────┤─▶ kept for AGENT_RUN_RETENTION_S ─▶ forgotten
                      └─▶ interrupted ───┘
    (the client may leave at any point: CANCEL → interrupted, CONTINUE → runs on)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from agent_service.core.deadline import Deadline
from agent_service.core.errors import ChatError, ErrorKind
from agent_service.core.events import AgentEvent, Done, Failure, Finished, Heartbeat, Reply, ReplyEvent
from agent_service.core.requests import BusyPolicy, DisconnectPolicy, ValidRequest
from agent_service.core.run_log import RunLogWriter, RunRecord
from agent_service.core.runner import ANSWERED, AgentRunner, Answer
from agent_service.core.sessions import Session
from agent_service.settings import Settings
from agent_service.store import RunLog, RunNotFoundError, SessionKey


def new_run_id() -> str:
    return uuid.uuid4().hex


class Run:
    """One answer; `follow` yields its events to the call that started it (see the module docstring)."""

    def __init__(
        self,
        manager: RunManager,
        run_id: str,
        call_id: str,
        turn: int,
        session_id: str,
        owner: str,
        base_sequence: int,
        answer: Callable[[Callable[[], Awaitable[None]]], Answer],
        started: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`answer` makes the runner's answer given the callback to await once the session is taken."""
        self.run_id = run_id
        self.owner = owner
        self.last_sequence = base_sequence
        self.finished = False  # the run is over (its end is on its way to the log)
        self.on_end: Callable[[], None] | None = None  # called once when the run ends (gives back its slot)
        self.task: asyncio.Task[None] | None = None  # the run's own task (a run that may outlive its caller)
        self._manager = manager
        self._call_id = call_id
        self._turn = turn
        self._session_id = session_id
        self._started = started
        self._answer = answer(self._on_started)
        self._record = RunRecord(run_id, owner) if manager.retention_s > 0 else None
        self._opened = False
        self._count = 0
        self._clock = time.perf_counter()
        self._closed = False
        # A run in a task of its own hands its events to the caller over this feed while it is attached
        # (made by `start_task` for those runs only: a queue is 3 KB, most runs are read by their caller).
        self._feed: asyncio.Queue[Reply | ChatError | None] | None = None
        self._attached = True
        # Heartbeats of a run read by its caller: one timer per heartbeat interval, not one per event.
        self._beat: asyncio.TimerHandle | None = None
        self._beat_due = False
        self._last_out = 0.0

    async def follow(self) -> AsyncIterator[Reply]:
        """The run's events as they happen (heartbeats when silent); raises the run's ChatError after its Failure."""
        if self.task is None:
            async for reply in self._read(heartbeats=True):
                yield reply
            return
        async for reply in self._follow_feed():
            yield reply

    def detach(self) -> None:
        """The client left; the run goes on to its end (CONTINUE), its events only logged."""
        self._attached = False
        self._manager.log.info("run.detached", run_id=self.run_id, session_id=self._session_id)

    def cancel(self) -> None:
        """The client left (CANCEL): stop the answer (its partial text stays in the history)."""
        self._attached = False
        if self.task is not None:
            self.task.cancel()
        else:
            self._close()

    def start_task(self) -> asyncio.Task[None]:
        """Read the answer in a task of its own (a run that may outlive its caller, or waits in line first)."""
        self._feed = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.drive())
        return self.task

    async def drive(self) -> None:
        """Read the answer in the run's own task, handing its events to the caller while it is attached."""
        try:
            async for reply in self._read(heartbeats=False):
                self._put(reply)
        except ChatError as error:
            self._put(error)
        finally:
            self._put(None)

    async def _on_started(self) -> None:
        self.open_log()  # resumable from now on, even before its first event
        if self._started is not None:
            await self._started(self.run_id)

    def open_log(self) -> None:
        """Start keeping the run's events in the store (the session is taken: the run is on)."""
        self._opened = True
        if self._record is not None:
            self._manager.writer.open(self._record)

    async def _read(self, heartbeats: bool) -> AsyncIterator[Reply]:
        """Begin the answer, then number, log and yield each event; end with Done, or Failure and the error."""
        answer = self._answer
        try:
            try:
                await answer.begin()
                if heartbeats:
                    self._arm_heartbeat()
                while True:
                    event = answer.take()
                    if event is None:
                        if self._beat_due:
                            self._beat_due = False
                            yield self._reply(Heartbeat(), self.last_sequence)
                        else:
                            await answer.wait()
                    elif event is ANSWERED:
                        return
                    else:
                        yield self._number(event)  # type: ignore[arg-type]
            except ChatError as error:
                if not (error.kind is ErrorKind.ABORTED and self._count == 0 and not self._opened):
                    yield self._emit(Failure(error.kind.value, error.message))  # not for a refusal before anything ran
                raise
        finally:
            self._close()

    def _number(self, event: AgentEvent) -> Reply:
        if type(event) is Finished:
            duration_ms = round((time.perf_counter() - self._clock) * 1000, 3)
            return self._emit(Done(event.stop_reason, event.usage, self._count, duration_ms))
        self._count += 1
        return self._emit(event)  # type: ignore[arg-type]

    def _emit(self, event: ReplyEvent) -> Reply:
        self.last_sequence += 1
        reply = Reply(self._call_id, self.last_sequence, self._turn, self._session_id, event, self.run_id)
        if self._record is not None:
            self._manager.writer.add(self._record, reply)
        if self._beat is not None:
            self._last_out = self._beat_loop_time()
        return reply

    def _close(self) -> None:
        """The run is over (once): stop the answer if it is not, end its log, tell who waits."""
        if self._closed:
            return
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()
        self._answer.end()
        if self._record is not None and (self._opened or self._record.pending):
            self._manager.writer.close(self._record)
        self.finished = True
        if self.on_end is not None:
            self.on_end()

    def _beat_loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _arm_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_out = loop.time()
        self._beat = loop.call_later(self._manager.heartbeat_s, self._heartbeat)

    def _heartbeat(self) -> None:
        """A heartbeat is due when nothing went out for an interval; wake the reader to send it."""
        loop = asyncio.get_running_loop()
        interval = self._manager.heartbeat_s
        quiet = loop.time() - self._last_out
        if quiet >= interval:
            self._beat_due = True
            self._last_out = loop.time()
            self._answer.poke()
            quiet = 0.0
        self._beat = loop.call_later(interval - quiet, self._heartbeat)

    async def _follow_feed(self) -> AsyncIterator[Reply]:
        heartbeat_s = self._manager.heartbeat_s
        feed = self._feed
        assert feed is not None
        while True:
            if feed.empty():
                try:
                    async with asyncio.timeout(heartbeat_s):
                        item = await feed.get()
                except TimeoutError:
                    yield self._reply(Heartbeat(), self.last_sequence)
                    continue
            else:
                item = feed.get_nowait()
            if item is None:
                return
            if isinstance(item, ChatError):
                raise item
            yield item

    def _put(self, item: Reply | ChatError | None) -> None:
        if self._feed is not None and (self._attached or item is None):
            self._feed.put_nowait(item)

    def _reply(self, event: ReplyEvent, sequence: int) -> Reply:
        return Reply(self._call_id, sequence, self._turn, self._session_id, event, self.run_id)


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
        self.writer = RunLogWriter(runs, self.max_life_s, self.retention_s, log)
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
        """Start one answer: read by its caller, or in a task of its own when it may outlive or wait for it."""
        runner = self._runner

        def answer(on_started: Callable[[], Awaitable[None]]) -> Answer:
            return runner.answer(target, request.content, deadline, request.if_busy, on_started)

        run = Run(self, new_run_id(), call_id, turn, request.session_id, owner, base_sequence, answer, started)
        if request.on_disconnect is DisconnectPolicy.CANCEL and request.if_busy is BusyPolicy.REJECT:
            return run
        self._live.add(run)
        run.start_task().add_done_callback(lambda _task: self._live.discard(run))
        return run

    async def replay(self, run_id: str, after: int, principal: str, until: float) -> AsyncIterator[Reply]:
        """A run's events after `after`: those kept, then the live ones until it ends (or `until`, loop time).

        Heartbeats fill silences. NOT_FOUND when the run is unknown, expired or not the caller's.
        A run that failed ends the replay with its error, after its Failure event, as it did live.
        """
        if self.retention_s <= 0:
            raise RunNotFoundError(run_id)
        owner = self.writer.owner(run_id)
        if owner is None:
            owner = await self.runs.owner(run_id)
        if owner != principal:
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
        await self.writer.aclose(timeout_s)
