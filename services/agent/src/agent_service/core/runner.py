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

from strands import Agent
from strands.types.content import ContentBlock, Message
from strands.types.exceptions import MaxTokensReachedException

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
from agent_service.core.sessions import Session, SessionRegistry

ABANDONED_TOOL_TEXT = "tool abandoned: the answer was interrupted"
# Most text deltas, and characters, merged into one event: bounds a message (well under the gRPC
# message limit) when a slow client falls far behind.
MAX_COALESCED_DELTAS = 256
MAX_COALESCED_CHARS = 64 * 1024
# A provider that hands over buffered chunks never suspends; let other calls (and health
# checks) run at least this often.
YIELD_INTERVAL_S = 0.001


def interrupted_text(partial: str, reason: str) -> str:
    """The assistant text stored for an answer that did not complete: what was sent, then a marker."""
    marker = f"[interrupted: {reason}]"
    return f"{partial.rstrip()}\n\n{marker}" if partial.strip() else marker


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
    partial: list[str] = field(default_factory=list)  # text handed out since the last message boundary
    stop_reason: str = ""

    def handed_out(self, event: AgentEvent) -> None:
        if type(event) is TextDelta:
            self.partial.append(event.text)
        elif isinstance(event, ToolCall | ToolOutcome):
            self.partial.clear()
        elif isinstance(event, Finished):
            self.stop_reason = event.stop_reason

    def expire(self) -> None:
        self.expired = True
        self.cancel.set()
        self.queue.put_nowait(_WAKE)


class AgentRunner:
    """Runs a prompt on a session's agent and yields its events as they happen."""

    def __init__(self, registry: SessionRegistry, cancel_grace_s: float, coalesce_text: bool = True) -> None:
        self._registry = registry
        self._cancel_grace_s = cancel_grace_s
        self._coalesce_text = coalesce_text
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def settling(self) -> int:
        """Cancelled runs still being wound down (their sessions are still busy)."""
        return len(self._settling)

    async def run(self, target: Session | str, prompt: str, deadline: Deadline) -> AsyncIterator[AgentEvent]:
        """Yield the events of one answer.

        Raises ChatError: ABORTED (before any event) when another caller holds the
        session; DEADLINE_EXCEEDED when the deadline passes, checked before every
        event, not queued behind them; UNAVAILABLE or INTERNAL when the provider fails.
        """
        session = await self._registry.acquire(target)
        agent = session.agent
        assert agent is not None
        assert session.retry is not None
        session.retry.start(deadline.at)
        loop = asyncio.get_running_loop()
        run = _Run()
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
                yield item
        finally:
            timer.cancel()
            reason = _interruption(run, failure)
            if producer.done():
                self._finish(session, run, reason)
            else:
                run.cancel.set()
                settle = loop.create_task(self._settle(producer, session, run, reason))
                session.settling = settle
                self._settling.add(settle)
                settle.add_done_callback(self._settling.discard)

    async def aclose(self, timeout_s: float) -> None:
        """Wait (bounded) for cancelled runs to wind down, e.g. at shutdown."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    def _finish(self, session: Session, run: _Run, reason: str) -> None:
        """The producer is done: close the turn if it did not complete, release the session."""
        try:
            if session.agent is not None:
                _close_turn_now(session, run, reason)
        finally:
            self._registry.release(session)

    async def _settle(self, producer: asyncio.Task[None], session: Session, run: _Run, reason: str) -> None:
        """Give a cancelled run time to stop cleanly; abandon it after the grace period; close its turn."""
        try:
            await asyncio.wait({producer}, timeout=self._cancel_grace_s)
            if not producer.done():
                producer.cancel()
                with suppress(asyncio.CancelledError):
                    await asyncio.wait({producer}, timeout=self._cancel_grace_s)
            if session.agent is not None:
                _close_turn_now(session, run, reason)
        finally:
            session.settling = None
            self._registry.release(session)


def _interruption(run: _Run, failure: ChatError | None) -> str:
    """Why a run that did not complete stopped, as the history's marker says it."""
    if run.expired:
        return "the answer ran out of time"
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


def closing_messages(messages: list[Message], partial: str, reason: str, cancelled: bool) -> tuple[list[Message], bool]:
    """What closes an incomplete turn: (messages to append, whether to rewrite the last one).

    Pure, so every shape of an interrupted history is unit-tested:
    - the last message is strands' own cancellation text ("Cancelled by user", which
      drops what was streamed): rewrite it to the partial answer plus the marker;
    - an assistant tool call without results: error results, then the marker;
    - the user's prompt or tool results with no answer: the partial answer plus the marker;
    - a complete assistant answer: nothing.
    """
    if not messages:
        return [], False
    last = messages[-1]
    text = interrupted_text(partial, reason)
    if last["role"] == "assistant":
        pending = [block["toolUse"] for block in last["content"] if "toolUse" in block]
        if pending:
            results: list[ContentBlock] = [
                {
                    "toolResult": {
                        "toolUseId": tool_use["toolUseId"],
                        "status": "error",
                        "content": [{"text": ABANDONED_TOOL_TEXT}],
                    }
                }
                for tool_use in pending
            ]
            return [{"role": "user", "content": results}, {"role": "assistant", "content": [{"text": text}]}], False
        if cancelled:
            return [{"role": "assistant", "content": [{"text": text}]}], True
        return [], False
    return [{"role": "assistant", "content": [{"text": text}]}], False


def _close_turn_now(session: Session, run: _Run, reason: str) -> None:
    """Apply `closing_messages` to the agent's history and its persisted copy (a no-op after a complete answer)."""
    agent = session.agent
    assert agent is not None
    cancelled = run.cancel.is_set() or run.stop_reason == "cancelled"
    strands_cancel = cancelled and bool(agent.messages) and _is_strands_cancel_text(agent.messages[-1])
    messages, rewrite_last = closing_messages(agent.messages, "".join(run.partial), reason, strands_cancel)
    if rewrite_last:
        agent.messages[-1]["content"] = messages[0]["content"]
        if session.manager is not None:
            session.manager.redact_latest_message(agent.messages[-1], agent)
        return
    for message in messages:
        agent.messages.append(message)
        if session.manager is not None:
            session.manager.append_message(message, agent)


def _is_strands_cancel_text(message: Message) -> bool:
    """strands ends a stream cancelled mid-answer with an assistant message of its own fixed text."""
    content = message["content"]
    return message["role"] == "assistant" and len(content) == 1 and content[0].get("text") == "Cancelled by user"


def classify_failure(exc: BaseException) -> ChatError:
    """Provider unreachable (or throttling) → UNAVAILABLE; anything else → INTERNAL."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    unavailable = _unavailable_types()
    for item in chain:
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
