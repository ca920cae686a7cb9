"""What the chat core needs from a session store, whichever backend keeps the conversations.

A conversation is stored under its `SessionKey` (principal, session id). While a
turn runs, its process holds the session's `Lease`: the only way to write the
session's data, so two processes (or replicas) never interleave turns of one
conversation. Besides strands' snapshot of the history (written through the lease's
blob operations), a lease keeps the turn's journal: the partial answer the client has
received so far, so a turn cut by a crash can be closed with it by whoever takes the
session next.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent_service.core.errors import ChatError, ErrorKind, Fault

ANONYMOUS = "anonymous"
# A turn that just ended releases its lease a moment after its last event: a follow-up that
# arrives from another process right then waits up to this long before being told the session is busy.
BUSY_WAIT_S = 0.2
BUSY_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A conversation: whose it is and its id (already validated: [A-Za-z0-9._-], 1-128 characters)."""

    principal: str
    session_id: str

    @property
    def owner(self) -> str:
        """The principal as a storage-safe name: `anonymous`, or a digest of the caller's subject."""
        if self.principal == ANONYMOUS:
            return ANONYMOUS
        return "p-" + hashlib.sha256(self.principal.encode()).hexdigest()[:32]


class StoreUnavailableError(ChatError):
    """The session store cannot be reached or used right now: UNAVAILABLE, the server's doing."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorKind.UNAVAILABLE, f"the session store is unavailable: {detail}")


class SessionBusyError(ChatError):
    """Another process or replica holds the session's lease: ABORTED, at once."""

    def __init__(self, key: SessionKey) -> None:
        super().__init__(
            ErrorKind.ABORTED,
            f"session {key.session_id!r} is busy answering another request; retry when it completes",
        )


class Lease(Protocol):
    """The right to run one turn of one session, and the session's data while it is held.

    Blob operations follow strands' `Storage` protocol (bytes under keys), so strands'
    snapshot session manager persists the history through them; a write made without
    the lease, or after it was lost, fails instead of overwriting someone else's turn.
    """

    key: SessionKey

    async def write(self, key: str, data: bytes) -> None: ...

    async def read(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def list(self, query: str) -> builtins.list[str]: ...

    async def read_journal(self) -> str | None:
        """The partial answer recorded for a turn in progress, or None when no turn is open."""
        ...

    async def write_journal(self, partial: str) -> None: ...

    async def clear_journal(self) -> None: ...

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) if the lease cannot be kept while it is held."""
        ...

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) if another request asks the holder to stop its turn (`interrupt`)."""
        ...

    async def release(self) -> None: ...


class QueueFullError(ChatError):
    """Too many requests already wait for this session: RESOURCE_EXHAUSTED, the client's doing."""

    def __init__(self, key: SessionKey, limit: int) -> None:
        super().__init__(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"{limit} requests already wait for session {key.session_id!r}; retry later",
            Fault.CLIENT,
        )


@dataclass(frozen=True, slots=True)
class Waiting:
    """How a request that finds its session busy waits (`if_busy=ENQUEUE`): in line, until `until`."""

    until: float  # event-loop time
    queue_limit: int


class RunNotFoundError(ChatError):
    """No such run for this caller (unknown, expired, or someone else's: the same answer for all three)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(ErrorKind.NOT_FOUND, f"run {run_id!r} was not found (unknown, expired or not yours)")


class RunLog(Protocol):
    """The events of recent runs, kept for resuming; records are JSON-able dicts with a `seq`."""

    async def start(self, run_id: str, owner: str, ttl_s: float) -> None:
        """A run begins: it is kept at least `ttl_s` (its longest possible life plus the retention)."""
        ...

    async def append(self, run_id: str, records: list[dict[str, Any]]) -> None: ...

    async def end(
        self, run_id: str, owner: str, retention_s: float, records: list[dict[str, Any]] | None = None
    ) -> None:
        """The run is over: its last `records` are appended, readers see its end, and it is forgotten
        `retention_s` later (one write where the store allows: most runs end before their first batch).
        `owner` is the one `start` was given (a store that rewrites the run's record needs it)."""
        ...

    async def owner(self, run_id: str) -> str | None:
        """Whose run it is; None when unknown or expired."""
        ...

    async def read(self, run_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """Records with `seq` > `after` (waiting up to `wait_s` for the first), and whether the run has ended.

        Raises ChatError(OUT_OF_RANGE) when records after `after` were already trimmed.
        """
        ...


class SessionStore(Protocol):
    """Where conversations live: local files (one machine) or Redis (any replica).

    It also keeps each run's events for a while after the run ends (`AGENT_RUN_RETENTION_S`),
    so a caller whose connection dropped resumes from any replica (`RunLog`).
    """

    name: str

    @property
    def runs(self) -> RunLog: ...

    async def lease(self, key: SessionKey, waiting: Waiting | None = None) -> Lease:
        """Take the session's lease; busy: raise SessionBusyError at once, or wait in line (`waiting`).

        Raises QueueFullError when the line is full, StoreUnavailableError when the store fails.
        """
        ...

    async def interrupt(self, key: SessionKey) -> None:
        """Ask whoever holds the session (in any process) to stop its turn now."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailableError when the store cannot serve (readiness)."""
        ...

    async def aclose(self) -> None: ...
