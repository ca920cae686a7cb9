"""One agent run: deadline and cancellation wiring, error mapping, agent events out.

The agent runs in a task of its own and hands events over a queue. The caller
(an RPC handler) can therefore leave at any moment — deadline, client cancel,
shutdown — without a CancelledError landing at an arbitrary point inside
strands. When the caller leaves early the run is cancelled the way strands
expects (its ``cancel_signal``), given ``cancel_grace_s`` to stop cleanly, and
only then abandoned; an abandoned run leaves its turn closed in the history so
the session stays usable. The session is released only once its agent stopped.

Nothing here knows about gRPC: failures are `RunError`s with a status name.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from strands import Agent
from strands.types.content import Message
from strands.types.exceptions import MaxTokensReachedException

from agent_service.events import AgentEvent, Finished, TextDelta, ToolNames, map_strands_event, usage_from_counts
from agent_service.sessions import Session, SessionRegistry

INTERRUPTED_TEXT = "[interrupted: the request was cancelled before the answer was complete]"
ABANDONED_TOOL_TEXT = "tool abandoned: the request was cancelled"
# Most text deltas merged into one event; bounds a message when a slow client falls far behind.
MAX_COALESCED_DELTAS = 256


class ErrorKind(enum.Enum):
    """Why a run failed, named after the gRPC status it becomes."""

    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class RunError(Exception):
    """A run failed; `message` is safe to show to the caller (no traceback, no internals)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _End:
    """Queue marker: the producer finished (normally or with an exception put before it)."""


class _Expired:
    """Queue marker: the deadline passed."""


_END = _End()
_EXPIRED = _Expired()


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

    async def run(self, target: Session | str, prompt: str, deadline: float) -> AsyncIterator[AgentEvent]:
        """Yield the events of one answer; `deadline` is in event-loop time.

        Raises SessionBusyError (before any event) when the session is in use, and
        RunError when the deadline passes or the model provider fails.
        """
        session = await self._registry.acquire(target)
        assert session.agent is not None
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        producer = loop.create_task(_produce(session.agent, prompt, cancel, queue))
        timer = loop.call_at(deadline, _expire, queue, cancel)
        held: Any = None  # an item taken while coalescing, handed out next
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await queue.get()
                if item is _END:
                    return
                if item is _EXPIRED:
                    raise RunError(ErrorKind.DEADLINE_EXCEEDED, "the answer did not complete within the deadline")
                if isinstance(item, Exception):
                    raise classify_failure(item) from item
                if self._coalesce_text and type(item) is TextDelta and not queue.empty():
                    item, held = _coalesce(item, queue)
                yield item
        finally:
            timer.cancel()
            if producer.done():
                self._registry.release(session)
            else:
                cancel.set()
                settle = loop.create_task(self._settle(producer, session))
                self._settling.add(settle)
                settle.add_done_callback(self._settling.discard)

    async def aclose(self, timeout_s: float) -> None:
        """Wait (bounded) for cancelled runs to wind down, e.g. at shutdown."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    async def _settle(self, producer: asyncio.Task[None], session: Session) -> None:
        """Give a cancelled run time to stop cleanly; abandon it after the grace period."""
        try:
            await asyncio.wait({producer}, timeout=self._cancel_grace_s)
            if not producer.done():
                producer.cancel()
                with suppress(asyncio.CancelledError):
                    await asyncio.wait({producer}, timeout=self._cancel_grace_s)
                if session.agent is not None:
                    await close_interrupted_turn(session.agent)
        finally:
            self._registry.release(session)


async def _produce(agent: Agent, prompt: str, cancel: threading.Event, queue: asyncio.Queue[Any]) -> None:
    """Drive strands' stream and put agent events (then an exception, if any, and _END) on the queue."""
    tools = ToolNames()
    try:
        async for event in agent.stream_async(prompt, cancel_signal=cancel):
            for item in map_strands_event(event, tools):
                queue.put_nowait(item)
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
    while not queue.empty() and len(parts) < MAX_COALESCED_DELTAS:
        item = queue.get_nowait()
        if type(item) is not TextDelta:
            return TextDelta("".join(parts)), item
        parts.append(item.text)
    return TextDelta("".join(parts)), None


def _expire(queue: asyncio.Queue[Any], cancel: threading.Event) -> None:
    cancel.set()
    queue.put_nowait(_EXPIRED)


async def close_interrupted_turn(agent: Agent) -> None:
    """Close a turn that was abandoned mid-way, so the next call sees a well-formed history.

    A run cancelled from outside can leave the user's prompt, or a tool call, with
    no answer; most providers reject such a history (two user turns in a row, a
    toolUse without toolResult). The prompt is kept, no conversation data is lost:
    abandoned tools get an error result and the turn a short assistant note.
    strands' public API has no way to append persisted messages, so this uses
    ``Agent._append_messages`` (which fires the hooks the session manager saves on).
    """
    if not agent.messages:
        return
    last = agent.messages[-1]
    closing: list[Message] = []
    if last["role"] == "assistant":
        pending = [block["toolUse"] for block in last["content"] if "toolUse" in block]
        if not pending:
            return
        closing.append(
            {
                "role": "user",
                "content": [
                    {
                        "toolResult": {
                            "toolUseId": tool_use["toolUseId"],
                            "status": "error",
                            "content": [{"text": ABANDONED_TOOL_TEXT}],
                        }
                    }
                    for tool_use in pending
                ],
            }
        )
    closing.append({"role": "assistant", "content": [{"text": INTERRUPTED_TEXT}]})
    await agent._append_messages(*closing)


def classify_failure(exc: BaseException) -> RunError:
    """Provider unreachable (or throttling) → UNAVAILABLE; anything else → INTERNAL."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    unavailable = _unavailable_types()
    for item in chain:
        if isinstance(item, unavailable):
            return RunError(ErrorKind.UNAVAILABLE, f"model provider unavailable: {_describe(item)}")
    return RunError(ErrorKind.INTERNAL, f"model provider failed: {_describe(exc)}")


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
        "openai": ["APIConnectionError", "APITimeoutError"],
        "anthropic": ["APIConnectionError", "APITimeoutError"],
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
