"""One agent run: deadline and cancellation wiring, failure classification, closing the turn.

The agent runs in a task of its own and hands events over a mailbox, so the caller
can leave at any moment (deadline, client cancel, drain) without a CancelledError
landing at an arbitrary point inside strands. When the caller leaves early the run
is cancelled the way strands expects (`Agent.cancel` while the invocation runs: a
``cancel_signal`` would cost a task per run polling it every 50 ms), given
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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from strands import Agent
from strands.types.exceptions import MaxTokensReachedException, StorageError

from agent_service.core.deadline import Deadline
from agent_service.core.errors import ChatError, ErrorKind
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
from agent_service.core.requests import BusyPolicy
from agent_service.core.sessions import Session, SessionRegistry
from agent_service.store import SessionKey

INTERRUPTED_REASON = "interrupted by a newer message"
INTERRUPTED = ChatError(
    ErrorKind.ABORTED, "the answer was interrupted by a newer message on this session (if_busy=INTERRUPT)"
)
LEASE_LOST = ChatError(ErrorKind.UNAVAILABLE, "the session's lease in the store was lost mid-answer")
# Most text deltas, and characters, merged into one event: bounds a message (well under the gRPC
# message limit) when a slow client falls far behind.
MAX_COALESCED_DELTAS = 256
MAX_COALESCED_CHARS = 64 * 1024
# A provider that hands over buffered chunks never suspends; let other calls (and health
# checks) run at least this often.
YIELD_INTERVAL_S = 0.001


class _End:
    """Mailbox marker: the producer finished (normally or with an exception put before it)."""


_END = _End()


class _Mailbox:
    """The producer's items waiting for the consumer: a deque and at most one waiter.

    Cheaper per event than an `asyncio.Queue`, and waiting never takes an item, so a
    consumer whose wait is cancelled (a heartbeat's timeout, a client that left) loses
    nothing and the answer can go on being read by someone else.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        self.poke()

    def poke(self) -> None:
        """Wake the consumer without an item (the deadline passed, the run was halted, a heartbeat is due)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get(self) -> Any:
        return self._items.popleft()

    async def wait(self) -> None:
        """Until an item is waiting or someone pokes."""
        if self._items:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


@dataclass
class _Run:
    """What the consumer side knows about one run."""

    mailbox: _Mailbox = field(default_factory=_Mailbox)
    cancelled: bool = False  # asked to stop from outside (deadline, halt, the caller left)
    agent: Agent | None = None  # set while strands runs the invocation: `Agent.cancel` reaches it
    expired: bool = False
    halted: tuple[ChatError, str] | None = None  # stopped from outside: the error, and the history's reason
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

    def stop_agent(self) -> None:
        """Cancel the invocation: at once if it is running, else as it starts (see `_produce`)."""
        self.cancelled = True
        if self.agent is not None:
            self.agent.cancel()

    def expire(self) -> None:
        self.expired = True
        self.stop_agent()
        self.mailbox.poke()

    def halt(self, error: ChatError, reason: str) -> None:
        """Stop the run from outside (interrupted by a newer request, lease lost): it ends with `error`."""
        if self.halted is None:
            self.halted = (error, reason)
            self.stop_agent()
            self.mailbox.poke()


class Answer:
    """One answer in progress, read by whoever holds it: `begin`, then `take` until `ANSWERED`, then `end`.

    The caller reads it without a task of its own in between (one event-loop hop per
    event fewer than a generator driven by another task). Waiting (`wait`) never
    touches the answer, so it can be cancelled and the answer handed to another reader.
    The agent itself runs in the producer task, out of reach of the caller's cancellation.
    """

    def __init__(
        self,
        runner: AgentRunner,
        target: Session | SessionKey,
        prompt: str,
        deadline: Deadline,
        busy: BusyPolicy,
        started: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._runner = runner
        self._target = target
        self._prompt = prompt
        self._deadline = deadline
        self._busy = busy
        self._started = started
        self._run = _Run()
        self._session: Session | None = None
        self._producer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finished: asyncio.Future[None] | None = None
        self._failure: ChatError | None = None
        self._held: Any = None  # an item taken while coalescing, handed out next
        self._ended = False

    async def begin(self) -> None:
        """Take the session (see `AgentRunner.run` for the errors), await `started`, start the agent."""
        registry = self._runner._registry
        session = await registry.acquire(self._target, self._busy, self._deadline)
        if self._started is not None:
            try:
                await self._started()
            except BaseException:
                await registry.release(session)
                raise
        agent = session.agent
        assert agent is not None
        assert session.retry is not None
        session.retry.start(self._deadline.at)
        loop = asyncio.get_running_loop()
        run = self._run
        session.halt = lambda: run.halt(INTERRUPTED, INTERRUPTED_REASON)
        lease = session.lease
        if lease is not None:
            run.journal = TurnJournal(lease)
            lease.on_lost(lambda: run.halt(LEASE_LOST, "the session moved to another server"))
            lease.on_interrupt(lambda: run.halt(INTERRUPTED, INTERRUPTED_REASON))
        self._session = session
        self._finished = loop.create_future()
        self._producer = loop.create_task(_produce(agent, self._prompt, run))
        self._timer = loop.call_at(self._deadline.at, run.expire)

    def take(self) -> AgentEvent | _Answered | None:
        """The next event, `ANSWERED` at the end, or None when nothing is ready yet (then `wait`).

        Raises ChatError when the deadline passed or the run was halted (checked before
        every event, not queued behind them) or the agent failed.
        """
        run = self._run
        mailbox = run.mailbox
        while True:
            if run.expired:
                self._failure = self._deadline.exceeded()
                raise self._failure
            if run.halted is not None:
                self._failure = run.halted[0]
                raise self._failure
            if self._held is not None:
                item, self._held = self._held, None
            elif mailbox.empty():
                return None
            else:
                item = mailbox.get()
            if item is _END:
                return ANSWERED
            if isinstance(item, Exception):
                self._failure = classify_failure(item)
                raise self._failure from item
            if self._runner._coalesce_text and type(item) is TextDelta and not mailbox.empty():
                item, self._held = _coalesce(item, mailbox)
            run.handed_out(item)
            if type(item) is Finished:
                assert self._session is not None
                self._session.settling = self._finished  # complete for the client: a follow-up waits for the save
            return item  # type: ignore[no-any-return]

    async def wait(self) -> None:
        """Until `take` may have something (an event, the end, a failure) or `poke` was called."""
        await self._run.mailbox.wait()

    def poke(self) -> None:
        """Wake a reader waiting in `wait` (e.g. for a heartbeat)."""
        self._run.mailbox.poke()

    def end(self) -> None:
        """The reader is done (finished, failed, or gone): stop the agent if needed, close the turn, release.

        Idempotent; the winding down runs in a task of its own (`AgentRunner.settling`).
        """
        if self._ended or self._session is None:
            self._ended = True
            return
        self._ended = True
        assert self._timer is not None
        assert self._producer is not None
        assert self._finished is not None
        self._timer.cancel()
        session, run = self._session, self._run
        session.halt = None
        session.settling = self._finished
        self._runner._settle_later(self._producer, session, run, _interruption(run, self._failure), self._finished)


class _Answered:
    """`Answer.take`'s marker for the end of the answer."""


ANSWERED = _Answered()


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

    def answer(
        self,
        target: Session | SessionKey,
        prompt: str,
        deadline: Deadline,
        busy: BusyPolicy = BusyPolicy.REJECT,
        started: Callable[[], Awaitable[None]] | None = None,
    ) -> Answer:
        """One answer to read step by step (see `Answer`); `run` reads one as a generator."""
        return Answer(self, target, prompt, deadline, busy, started)

    async def run(
        self,
        target: Session | SessionKey,
        prompt: str,
        deadline: Deadline,
        busy: BusyPolicy = BusyPolicy.REJECT,
        started: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Yield the events of one answer.

        Raises ChatError: ABORTED (before any event) when another caller holds the
        session and `busy` is REJECT (ENQUEUE waits in line, INTERRUPT stops the other
        turn first), or later when a newer request interrupts this one; DEADLINE_EXCEEDED
        when the deadline passes, checked before every event, not queued behind them;
        UNAVAILABLE or INTERNAL when the provider (or the session store) fails.
        `started` is awaited once the session is taken, before the agent runs.
        """
        answer = self.answer(target, prompt, deadline, busy, started)
        await answer.begin()
        try:
            while True:
                event = answer.take()
                if event is None:
                    await answer.wait()
                elif event is ANSWERED:
                    return
                else:
                    yield event  # type: ignore[misc]
        finally:
            answer.end()

    async def aclose(self, timeout_s: float) -> None:
        """Wait (bounded) for runs still winding down, e.g. at shutdown."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    def _settle_later(
        self, producer: asyncio.Task[None], session: Session, run: _Run, reason: str, finished: asyncio.Future[None]
    ) -> None:
        settle = asyncio.get_running_loop().create_task(self._settle(producer, session, run, reason, finished))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)

    async def _settle(
        self, producer: asyncio.Task[None], session: Session, run: _Run, reason: str, finished: asyncio.Future[None]
    ) -> None:
        """Let the run stop (cancelled: within the grace, then abandoned), close its turn, save, release."""
        try:
            if not producer.done():
                run.stop_agent()
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
        cancelled = run.cancelled or run.stop_reason == "cancelled"
        changed = close_turn(agent.messages, "".join(run.partial), reason, cancelled)
        if changed and session.manager is not None and session.lease is not None:
            await session.manager.save_snapshot(agent, is_latest=True)
        if run.journal is not None:
            await run.journal.clear()


def _interruption(run: _Run, failure: ChatError | None) -> str:
    """Why a run that did not complete stopped, as the history's marker says it."""
    if run.expired:
        return "the answer ran out of time"
    if run.halted is not None:
        return run.halted[1]
    if failure is not None:
        return "the model provider failed"
    return "the request was cancelled"


async def _produce(agent: Agent, prompt: str, run: _Run) -> None:
    """Drive strands' stream and put agent events (then an exception, if any, and _END) in the mailbox."""
    loop = asyncio.get_running_loop()
    mailbox = run.mailbox
    tools = ToolNames()
    paused = loop.time()
    # strands clears its cancel signal as the invocation ends, with no await in between:
    # `run.agent` is set exactly while a cancel reaches this invocation and no later one.
    run.agent = agent
    if run.cancelled:
        agent.cancel()  # stopped before it started: strands applies it at its first checkpoint
    try:
        async for event in agent.stream_async(prompt):
            for item in map_strands_event(event, tools):
                mailbox.put(item)
            now = loop.time()
            if now - paused >= YIELD_INTERVAL_S:
                await asyncio.sleep(0)
                paused = loop.time()
    except MaxTokensReachedException:
        # A truncated answer, not a failure: strands keeps the partial message in the history.
        usage = usage_from_counts(agent.event_loop_metrics.accumulated_usage)
        mailbox.put(Finished(stop_reason="max_tokens", usage=usage))
    except Exception as exc:  # noqa: BLE001 - handed to the caller, which classifies it
        mailbox.put(exc)
    finally:
        run.agent = None  # no await since strands' end: no cancel reaches a later invocation
    mailbox.put(_END)


def _coalesce(first: TextDelta, mailbox: _Mailbox) -> tuple[TextDelta, Any]:
    """Merge the text deltas already waiting behind `first` into one; return it and the next non-text item.

    Nothing waits for more text: only what the model produced while the previous event
    was being sent goes out together. An idle stream keeps one event per delta; a
    stream whose client or network is slower than the model sends fewer, larger
    messages instead of falling behind (per-message cost dominates the CPU per token).
    """
    parts = [first.text]
    size = len(first.text)
    while not mailbox.empty() and len(parts) < MAX_COALESCED_DELTAS and size < MAX_COALESCED_CHARS:
        item = mailbox.get()
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
