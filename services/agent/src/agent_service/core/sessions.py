"""Sessions: one strands Agent per conversation, used by one caller at a time.

The seed shared a single Agent across every caller, so callers saw each other's
history and concurrent calls crashed with ConcurrencyException. Here each session
id owns its Agent; a second caller on a busy session is refused at once (ABORTED);
history is persisted by strands' FileSessionManager, so agents can leave memory
(LRU, idle timeout) and come back from disk with nothing lost.

A run whose caller left (deadline, cancel, drain) may still be winding down; that
is not another caller, so the next caller waits for it (bounded by the runner's
grace) instead of being refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from strands import Agent
from strands.models import Model
from strands.session import FileSessionManager, SessionManager

from agent_service.core.errors import ChatError, ErrorKind
from agent_service.core.provider_retry import DeadlineAwareRetry
from agent_service.settings import Settings
from agent_service.tools import default_tools


class AgentFactory:
    """Builds the Agent of a session around the shared model."""

    def __init__(self, settings: Settings, model: Model) -> None:
        self._settings = settings
        self._model = model

    def create(self, session_id: str) -> tuple[Agent, DeadlineAwareRetry, SessionManager | None]:
        """A new agent, its retry policy and its history's manager (with a session id: loaded from disk, blocking)."""
        session_manager = None
        if session_id:
            session_manager = FileSessionManager(session_id=session_id, storage_dir=str(self._settings.data_dir))
        retry = DeadlineAwareRetry(
            max_attempts=self._settings.provider_max_attempts,
            initial_delay=self._settings.provider_retry_delay_s,
        )
        agent = Agent(
            model=self._model,
            tools=default_tools(),
            system_prompt=self._settings.system_prompt,
            callback_handler=None,
            session_manager=session_manager,
            retry_strategy=retry,
            trace_attributes={"gen_ai.conversation.id": session_id} if session_id else None,
        )
        return agent, retry, session_manager


@dataclass(eq=False)
class Session:
    """A conversation and the agent that holds it; `busy` while a caller (or a winding-down run) uses it."""

    session_id: str
    agent: Agent | None = None
    retry: DeadlineAwareRetry | None = None
    manager: SessionManager | None = None  # persists the history; None for an ephemeral session
    busy: bool = False
    settling: asyncio.Future[None] | None = None  # set while an abandoned run winds down
    last_used: float = field(default_factory=time.monotonic)

    @property
    def persisted(self) -> bool:
        return bool(self.session_id)


class SessionRegistry:
    """Finds or creates session agents; bounds how many stay in memory."""

    def __init__(self, factory: AgentFactory, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        self._max_sessions = settings.max_sessions
        self._idle_s = settings.session_idle_s
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def ephemeral(self) -> Session:
        """A fresh, unpersisted conversation that no other call can find."""
        return Session(session_id="")

    async def acquire(self, session: Session | str) -> Session:
        """Mark the session busy and make sure it has an agent; pair with `release`.

        Raises ChatError(ABORTED) when another caller holds it. Strings are session
        ids (already validated); a Session object is an ephemeral one held by its caller.
        """
        if isinstance(session, str):
            session = self._lookup(session)
        if session.busy and session.settling is not None:
            await asyncio.shield(session.settling)  # bounded by the runner's grace
        if session.busy:
            raise ChatError(
                ErrorKind.ABORTED,
                f"session {session.session_id!r} is busy answering another request; retry when it completes",
            )
        session.busy = True
        try:
            if session.agent is None:
                if session.persisted:
                    session.agent, session.retry, session.manager = await asyncio.to_thread(
                        self._factory.create, session.session_id
                    )
                else:
                    session.agent, session.retry, session.manager = self._factory.create("")
        except BaseException:
            session.busy = False
            raise
        return session

    def release(self, session: Session) -> None:
        """The call is over: the session may serve the next one."""
        session.busy = False
        session.last_used = self._clock()

    def evict_idle(self) -> int:
        """Drop agents idle longer than the idle timeout; their history stays on disk."""
        deadline = self._clock() - self._idle_s
        stale = [sid for sid, s in self._sessions.items() if not s.busy and s.last_used < deadline]
        for sid in stale:
            del self._sessions[sid]
        return len(stale)

    async def evict_idle_forever(self, interval_s: float) -> None:
        """Background task: evict idle sessions every `interval_s` seconds."""
        while True:
            await asyncio.sleep(interval_s)
            self.evict_idle()

    def _lookup(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id=session_id)
            self._evict_over_capacity(keep=session_id)
        else:
            self._sessions.move_to_end(session_id)
        return session

    def _evict_over_capacity(self, keep: str) -> None:
        """Least recently used idle agents go first; busy ones (and `keep`) are never dropped."""
        excess = len(self._sessions) - self._max_sessions
        if excess <= 0:
            return
        for sid in [sid for sid, s in self._sessions.items() if not s.busy and sid != keep][:excess]:
            del self._sessions[sid]
