"""One agent run: deadline and cancellation wiring, failure classification, closing the turn.

The agent runs in a task of its own and hands events over a queue, so the caller
can leave at any moment (deadline, client cancel, drain) without a CancelledError
landing at an arbitrary point inside strands. When the caller leaves early the run
is cancelled the way strands expects (its ``cancel_signal``), given
``cancel_grace_s`` to stop cleanly, and then abandoned. Whatever way a run ends
(complete, cut, failed, abandoned) its turn is closed in the history: the user's
prompt stays, the partial answer the caller already received is kept and marked as
interrupted, and a pending tool call gets an error result, so the next request
always sends a well-formed, alternating history to the provider.

Nothing here knows about a transport: failures are `ChatError`s.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from strands import Agent
from strands.types.exceptions import MaxTokensReachedException, StorageError

from agent_service.core.errors import ChatError, ErrorKind, Fault
from agent_service.core.events import (
    AgentEvent,
    Finished,
    TextDelta,
    ToolCall,
    ToolNames,
    ToolOutcome,
    map_strands_event,
    usage_from_counts,
)
from agent_service.core.history import close_turn
from agent_service.core.journal import TurnJournal
from agent_service.core.sessions import Session, SessionRegistry
from agent_service.store import SessionKey

# Most text deltas, and characters, merged into one event: bounds a message (well under the gRPC
# message limit) when a slow client falls far behind.
MAX_COALESCED_DELTAS = 256
MAX_COALESCED_CHARS = 64 * 1024
# A provider that hands over buffered chunks never suspends; let other calls (and health
# checks) run at least this often.
YIELD_INTERVAL_S = 0.001


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the answer must end (event-loop time), and whose limit that is."""

    at: float
    fault: Fault = Fault.CLIENT  # SERVER: the server's own cap, not the client's deadline

    def exceeded(self) -> ChatError:
        return ChatError(
            ErrorKind.DEADLINE_EXCEEDED,
            "the answer did not complete within the deadline"
            if self.fault is Fault.CLIENT
            else "the answer did not complete within the server's maximum stream duration",
            self.fault,
        )


class _End:
    """Queue marker: the producer finished (normally or with an exception put before it)."""


class _Wake:
    """Queue marker: wakes a consumer waiting for the next event (the deadline passed)."""


_END = _End()
_WAKE = _Wake()


@dataclass
class _Run:
    """What the consumer side knows about one run."""

    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    expired: bool = False
    lease_lost: bool = False
    partial: list[str] = field(default_factory=list)  # text handed out since the last message boundary
    stop_reason: str = ""
    journal: TurnJournal | None = None

    def handed_out(self, event: AgentEvent) -> None:
        if type(event) is TextDelta:
            self.partial.append(event.text)
            if self.journal is not None:
                self.journal.progress(self.partial)
        elif isinstance(event, ToolCall | ToolOutcome):
            self.partial.clear()
        elif isinstance(event, Finished):
            self.stop_reason = event.stop_reason

    def expire(self) -> None:
        self.expired = True
        self.cancel.set()
        self.queue.put_nowait(_WAKE)

    def lose_lease(self) -> None:
        self.lease_lost = True
        self.cancel.set()
        self.queue.put_nowait(_WAKE)


class AgentRunner:
    """Runs a prompt on a session's agent and yields its events as they happen."""

    def __init__(self, registry: SessionRegistry, cancel_grace_s: float, coalesce_text: bool = True) -> None:
        self._registry = registry
        self._cancel_grace_s = cancel_grace_s
        self._coalesce_text = coalesce_text
        self._settling: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger("agent_service.runner")

    @property
    def settling(self) -> int:
        """Runs still being wound down or saved (their sessions are still busy)."""
        return len(self._settling)

    async def run(self, target: Session | SessionKey, prompt: str, deadline: Deadline) -> AsyncIterator[AgentEvent]:
        """Yield the events of one answer.

        Raises ChatError: ABORTED (before any event) when another caller holds the
        session; DEADLINE_EXCEEDED when the deadline passes, checked before every
        event, not queued behind them; UNAVAILABLE or INTERNAL when the provider (or
        the session store) fails.
        """
        session = await self._registry.acquire(target)
        agent = session.agent
        assert agent is not None
        assert session.retry is not None
        session.retry.start(deadline.at)
        loop = asyncio.get_running_loop()
        run = _Run()
        lease = session.lease
        if lease is not None:
            run.journal = TurnJournal(lease)
            lease.on_lost(run.lose_lease)
        finished: asyncio.Future[None] = loop.create_future()
        producer = loop.create_task(_produce(agent, prompt, run))
        timer = loop.call_at(deadline.at, run.expire)
        failure: ChatError | None = None
        held: Any = None  # an item taken while coalescing, handed out next
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await run.queue.get()
                if run.expired:
                    failure = deadline.exceeded()
                    raise failure
                if run.lease_lost:
                    failure = ChatError(ErrorKind.UNAVAILABLE, "the session's lease in the store was lost mid-answer")
                    raise failure
                if item is _END:
                    return
                if item is _WAKE:
                    continue
                if isinstance(item, Exception):
                    failure = classify_failure(item)
                    raise failure from item
                if self._coalesce_text and type(item) is TextDelta and not run.queue.empty():
                    item, held = _coalesce(item, run.queue)
                run.handed_out(item)
                if type(item) is Finished:
                    session.settling = finished  # complete for the client: a follow-up waits for the save
                yield item
        finally:
            timer.cancel()
            session.settling = finished
            settle = loop.create_task(self._settle(producer, session, run, _interruption(run, failure), finished))
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)

    async def aclose(self, timeout_s: float) -> None:
        """Wait (bounded) for runs still winding down, e.g. at shutdown."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    async def _settle(
        self, producer: asyncio.Task[None], session: Session, run: _Run, reason: str, finished: asyncio.Future[None]
    ) -> None:
        """Let the run stop (cancelled: within the grace, then abandoned), close its turn, save, release."""
        try:
            if not producer.done():
                run.cancel.set()
                await asyncio.wait({producer}, timeout=self._cancel_grace_s)
            if not producer.done():
                producer.cancel()
                with suppress(asyncio.CancelledError):
                    await asyncio.wait({producer}, timeout=self._cancel_grace_s)
            if run.journal is not None:
                await run.journal.stop()
            await self._close_turn(session, run, reason)
        except Exception as exc:  # noqa: BLE001 - the next holder of the session repairs what was not saved
            self._log.warning("turn.close_failed", session_id=session.session_id, error=_describe(exc))
        finally:
            try:
                await self._registry.release(session)
            except Exception as exc:  # noqa: BLE001 - a lease that cannot be released expires by itself
                self._log.warning("lease.release_failed", session_id=session.session_id, error=_describe(exc))
            if not finished.done():
                finished.set_result(None)

    async def _close_turn(self, session: Session, run: _Run, reason: str) -> None:
        """Close the turn in the history if it did not complete, save it, and clear the turn's journal."""
        agent = session.agent
        if agent is None:
            return
        cancelled = run.cancel.is_set() or run.stop_reason == "cancelled"
        changed = close_turn(agent.messages, "".join(run.partial), reason, cancelled)
        if changed and session.manager is not None and session.lease is not None:
            await session.manager.save_snapshot(agent, is_latest=True)
        if run.journal is not None:
            await run.journal.clear()


def _interruption(run: _Run, failure: ChatError | None) -> str:
    """Why a run that did not complete stopped, as the history's marker says it."""
    if run.expired:
        return "the answer ran out of time"
    if run.lease_lost:
        return "the session moved to another server"
    if failure is not None:
        return "the model provider failed"
    return "the request was cancelled"


async def _produce(agent: Agent, prompt: str, run: _Run) -> None:
    """Drive strands' stream and put agent events (then an exception, if any, and _END) on the queue."""
    loop = asyncio.get_running_loop()
    queue = run.queue
    tools = ToolNames()
    paused = loop.time()
    try:
        async for event in agent.stream_async(prompt, cancel_signal=run.cancel):
            for item in map_strands_event(event, tools):
                queue.put_nowait(item)
            now = loop.time()
            if now - paused >= YIELD_INTERVAL_S:
                await asyncio.sleep(0)
                paused = loop.time()
    except MaxTokensReachedException:
        # A truncated answer, not a failure: strands keeps the partial message in the history.
        usage = usage_from_counts(agent.event_loop_metrics.accumulated_usage)
        queue.put_nowait(Finished(stop_reason="max_tokens", usage=usage))
    except Exception as exc:  # noqa: BLE001 - handed to the caller, which classifies it
        queue.put_nowait(exc)
    queue.put_nowait(_END)


def _coalesce(first: TextDelta, queue: asyncio.Queue[Any]) -> tuple[TextDelta, Any]:
    """Merge the text deltas already waiting behind `first` into one; return it and the next non-text item.

    Nothing waits for more text: only what the model produced while the previous event
    was being sent goes out together. An idle stream keeps one event per delta; a
    stream whose client or network is slower than the model sends fewer, larger
    messages instead of falling behind (per-message cost dominates the CPU per token).
    """
    parts = [first.text]
    size = len(first.text)
    while not queue.empty() and len(parts) < MAX_COALESCED_DELTAS and size < MAX_COALESCED_CHARS:
        item = queue.get_nowait()
        if type(item) is not TextDelta or size + len(item.text) > MAX_COALESCED_CHARS:
            return TextDelta("".join(parts)), item
        parts.append(item.text)
        size += len(item.text)
    return TextDelta("".join(parts)), None


def classify_failure(exc: BaseException) -> ChatError:
    """Provider unreachable (or throttling) → UNAVAILABLE; anything else → INTERNAL."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    unavailable = _unavailable_types()
    for item in chain:
        if isinstance(item, ChatError):  # the session store failed (it already says how)
            return item
        if isinstance(item, StorageError):
            return ChatError(ErrorKind.UNAVAILABLE, f"the session store is unavailable: {_describe(item)}")
        if isinstance(item, unavailable):
            return ChatError(ErrorKind.UNAVAILABLE, f"model provider unavailable: {_describe(item)}")
    return ChatError(ErrorKind.INTERNAL, f"model provider failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@functools.cache
def _unavailable_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not reach the provider", from whichever SDKs are installed (looked up once)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    candidates = {
        "strands.types.exceptions": ["ModelThrottledException"],
        "httpx": ["TransportError"],
        "openai": ["APIConnectionError", "APITimeoutError", "RateLimitError"],
        "anthropic": ["APIConnectionError", "APITimeoutError", "RateLimitError"],
        "botocore.exceptions": [
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "NoCredentialsError",
        ],
    }
    for module_name, names in candidates.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(found)
