"""Sessions: one strands Agent per conversation, one turn at a time across every process that shares the store.

The seed shared a single Agent across every caller, so callers saw each other's
history and concurrent calls crashed with ConcurrencyException. Here each
conversation (principal, session id) has its own Agent, and a turn first takes the
session's lease in the store (`agent_service.store`): a second caller, in this
process or any other replica, is refused at once with ABORTED. With the lease held,
the history is loaded from the store (another replica may have answered the last
turn), repaired if an earlier turn was cut by a crash, and saved by strands' snapshot
session manager as messages are added, through the lease (a write without it fails).

Agents are a cache: an idle one leaves memory (LRU, idle timeout) and nothing is lost.
A run whose caller left may still be winding down; that is not another caller, so the
next caller in this process waits for it (bounded by the runner's grace) instead of
being refused.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from strands import Agent
from strands.models import Model
from strands.session import SnapshotSessionManager
from strands.types.content import Message

from agent_service.core.deadline import Deadline
from agent_service.core.errors import ChatError, ErrorKind
from agent_service.core.history import close_turn, repair
from agent_service.core.provider_retry import DeadlineAwareRetry
from agent_service.core.requests import BusyPolicy
from agent_service.settings import Settings
from agent_service.store import (
    Lease,
    QueueFullError,
    SessionBusyError,
    SessionKey,
    SessionStore,
    StoreUnavailableError,
    Waiting,
)
from agent_service.tools import default_tools

CRASH_REASON = "the server stopped before the answer was complete"


class LeasedStorage:
    """strands' `Storage` protocol over whichever lease the session holds right now.

    The session manager lives as long as the cached Agent; leases come and go with
    turns. Outside a turn there is no lease, so nothing can be written.
    """

    def __init__(self, key: SessionKey) -> None:
        self.key = key
        self.lease: Lease | None = None

    def _current(self) -> Lease:
        if self.lease is None:
            raise StoreUnavailableError(f"session {self.key.session_id!r} is not leased by this process")
        return self.lease

    async def write(self, key: str, data: bytes) -> None:
        await self._current().write(key, data)

    async def read(self, key: str) -> bytes | None:
        return await self._current().read(key)

    async def delete(self, key: str) -> None:
        await self._current().delete(key)

    async def list(self, query: str = "") -> builtins.list[str]:
        return await self._current().list(query)

    async def search(self, query: str) -> builtins.list[Any]:
        return []


class StoreSessionManager(SnapshotSessionManager):
    """strands' snapshot session manager, saving after every message; the history is loaded explicitly.

    strands would restore at Agent construction through a sync bridge on a loop of its
    own; the registry restores instead, on the server's loop, once it holds the lease.
    """

    def initialize(self, agent: Any, **kwargs: Any) -> None:
        return None


class AgentFactory:
    """Builds the Agent of a session around the shared model."""

    def __init__(self, settings: Settings, model: Model) -> None:
        self._settings = settings
        self._model = model

    def create(self, storage: LeasedStorage | None) -> tuple[Agent, DeadlineAwareRetry, StoreSessionManager | None]:
        """A new agent, its retry policy and (for a stored conversation) its session manager."""
        manager = None
        session_id = ""
        if storage is not None:
            session_id = storage.key.session_id
            manager = StoreSessionManager(session_id=session_id, storage=storage, save_latest_on="message")
        retry = DeadlineAwareRetry(
            max_attempts=self._settings.provider_max_attempts,
            initial_delay=self._settings.provider_retry_delay_s,
        )
        agent = Agent(
            model=self._model,
            tools=default_tools(),
            system_prompt=self._settings.system_prompt,
            callback_handler=None,
            session_manager=manager,
            retry_strategy=retry,
            trace_attributes={"gen_ai.conversation.id": session_id} if session_id else None,
        )
        return agent, retry, manager


@dataclass(eq=False)
class Session:
    """A conversation and the agent that holds it; `busy` while a caller (or a winding-down run) uses it."""

    key: SessionKey | None  # None: an ephemeral conversation, kept only in memory
    agent: Agent | None = None
    retry: DeadlineAwareRetry | None = None
    manager: StoreSessionManager | None = None
    storage: LeasedStorage | None = None
    busy: bool = False
    settling: asyncio.Future[None] | None = None  # set from the end of an answer until the session is released
    halt: Callable[[], None] | None = None  # interrupts the turn in progress (set by the runner)
    # Requests in line, first first (a list: most sessions never have one, and an empty deque is 600 bytes).
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def session_id(self) -> str:
        return self.key.session_id if self.key is not None else ""

    @property
    def lease(self) -> Lease | None:
        return self.storage.lease if self.storage is not None else None


class SessionRegistry:
    """Finds or creates session agents, leases their turns in the store, bounds how many stay in memory."""

    def __init__(
        self,
        factory: AgentFactory,
        store: SessionStore,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._store = store
        self._max_sessions = settings.max_sessions
        self._max_queued = settings.max_queued_per_session
        self._idle_s = settings.session_idle_s
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self._log = structlog.get_logger("agent_service.sessions")

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def store(self) -> SessionStore:
        return self._store

    def cached(self, key: SessionKey) -> Session | None:
        """The session's in-memory state, if any (tests and diagnostics)."""
        return self._sessions.get(key)

    async def acquire(
        self, target: Session | SessionKey, busy: BusyPolicy = BusyPolicy.REJECT, deadline: Deadline | None = None
    ) -> Session:
        """Take the session for one turn, with its history loaded and repaired; pair with `release`.

        When another caller (here or on another replica) holds it: REJECT raises
        ChatError(ABORTED) at once; ENQUEUE waits in line (RESOURCE_EXHAUSTED when
        `AGENT_MAX_QUEUED_PER_SESSION` wait already) until `deadline`; INTERRUPT stops
        that turn, then waits for it to wind down. UNAVAILABLE when the store cannot be used.
        """
        session = self._lookup(target) if isinstance(target, SessionKey) else target
        if session.busy and session.settling is not None:
            await asyncio.shield(session.settling)  # the last answer is complete; its run is winding down
        if session.busy:
            if busy is BusyPolicy.REJECT:
                raise ChatError(
                    ErrorKind.ABORTED,
                    f"session {session.session_id!r} is busy answering another request; retry when it completes",
                )
            if busy is BusyPolicy.INTERRUPT and session.halt is not None:
                session.halt()
            await self._wait_in_line(session, deadline)  # handed the session (still busy) by `release`
        else:
            session.busy = True
        try:
            if session.key is None:
                if session.agent is None:
                    session.agent, session.retry, session.manager = self._factory.create(None)
                return session
            if session.storage is None:
                session.storage = LeasedStorage(session.key)
            session.storage.lease = await self._lease(session.key, busy, deadline)
            try:
                if session.agent is None:
                    session.agent, session.retry, session.manager = self._factory.create(session.storage)
                await self._load(session)
            except BaseException:
                await self._drop_lease(session)
                raise
        except BaseException:
            session.busy = False
            raise
        return session

    async def release(self, session: Session) -> None:
        """The turn is over: give back the lease; the next request in line (or any caller) gets the session."""
        try:
            await self._drop_lease(session)
        finally:
            session.settling = None
            session.last_used = self._clock()
            while session.waiters:
                waiter = session.waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)  # handed over: the session stays busy for it
                    break
            else:
                session.busy = False

    async def _wait_in_line(self, session: Session, deadline: Deadline | None) -> None:
        if len(session.waiters) >= self._max_queued:
            assert session.key is not None
            raise QueueFullError(session.key, self._max_queued)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.waiters.append(waiter)
        try:
            timeout = None if deadline is None else max(0.0, deadline.at - asyncio.get_running_loop().time())
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise deadline.exceeded() if deadline is not None else ChatError(ErrorKind.ABORTED, "gave up") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                await self.release(session)  # handed over as we left: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                session.waiters.remove(waiter)

    async def _lease(self, key: SessionKey, busy: BusyPolicy, deadline: Deadline | None) -> Lease:
        """The store's lease, following the busy policy when another process holds the session."""
        if busy is BusyPolicy.REJECT or deadline is None:
            return await self._store.lease(key)
        waiting = Waiting(deadline.at, self._max_queued)
        try:
            return await self._store.lease(key)
        except SessionBusyError:
            if busy is BusyPolicy.INTERRUPT:
                await self._store.interrupt(key)
        try:
            return await self._store.lease(key, waiting)
        except SessionBusyError:
            raise deadline.exceeded() from None

    async def _load(self, session: Session) -> None:
        """The stored history into the agent: another replica may have answered since; close a crashed turn."""
        agent, manager, lease = session.agent, session.manager, session.lease
        assert agent is not None
        assert manager is not None
        assert lease is not None
        restored = await manager.restore_snapshot(agent)
        changed = False
        if not restored:
            legacy = await _legacy_messages(lease)
            agent.messages = legacy or []
            changed = bool(legacy)
        journal = await lease.read_journal()
        if journal is not None:
            changed |= close_turn(agent.messages, journal, CRASH_REASON)
        messages: list[Message]
        messages, repaired = repair(agent.messages)
        if repaired or changed:
            agent.messages = messages
            await manager.save_snapshot(agent, is_latest=True)
            self._log.info("session.repaired", session_id=session.session_id, messages=len(messages))
        if journal is not None:
            await lease.clear_journal()

    async def _drop_lease(self, session: Session) -> None:
        storage = session.storage
        if storage is None or storage.lease is None:
            return
        lease, storage.lease = storage.lease, None
        await lease.release()

    def evict_idle(self) -> int:
        """Drop agents idle longer than the idle timeout; their history stays in the store."""
        deadline = self._clock() - self._idle_s
        stale = [key for key, s in self._sessions.items() if not s.busy and s.last_used < deadline]
        for key in stale:
            del self._sessions[key]
        return len(stale)

    async def evict_idle_forever(self, interval_s: float) -> None:
        """Background task: evict idle sessions every `interval_s` seconds."""
        while True:
            await asyncio.sleep(interval_s)
            self.evict_idle()

    def _lookup(self, key: SessionKey) -> Session:
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = Session(key=key)
            self._evict_over_capacity(keep=key)
        else:
            self._sessions.move_to_end(key)
        return session

    def _evict_over_capacity(self, keep: SessionKey) -> None:
        """Least recently used idle agents go first; busy ones (and `keep`) are never dropped."""
        excess = len(self._sessions) - self._max_sessions
        if excess <= 0:
            return
        for key in [key for key, s in self._sessions.items() if not s.busy and key != keep][:excess]:
            del self._sessions[key]


async def _legacy_messages(lease: Lease) -> builtins.list[Message] | None:
    """A history the store kept in an earlier layout (the files store's FileSessionManager directories)."""
    reader = getattr(lease, "legacy_messages", None)
    return None if reader is None else await reader()
