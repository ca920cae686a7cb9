"""The chat core: every rule of answering, shared by every door.

A door (the gRPC servicer, the AgentCore HTTP app) decodes what arrived into a
`ChatInput`, opens a `ChatCall` and encodes the `Reply`s it yields; that is all it
does. The call validates, admits, leases the session, runs the agent under the
effective deadline, numbers and accounts every event, and tells the observer how
the call ended. The order is the same on every door: authenticate → validate → admit → lease → run
(the caller is known before anything about its request is looked at, as at the edge).
Failures are `ChatError`s, turned into statuses by the adapters with the one table
in `errors.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType

import structlog
from strands.models import Model
from structlog.typing import FilteringBoundLogger

from agent_service.core.admission import Admission
from agent_service.core.errors import ChatError, ErrorKind, Fault
from agent_service.core.events import Done, Failure, Finished, Reply, ReplyEvent
from agent_service.core.identity import Authenticator, anonymous
from agent_service.core.observer import CallObserver
from agent_service.core.requests import ChatInput, RequestLimits, ValidRequest, validate
from agent_service.core.runner import AgentRunner, Deadline
from agent_service.core.sessions import AgentFactory, Session, SessionRegistry
from agent_service.core.store_monitor import StoreMonitor
from agent_service.models import build_model
from agent_service.settings import Settings
from agent_service.store import SessionKey, open_store
from agent_service.telemetry.metrics import (
    REJECT_ADMISSION,
    REJECT_BUSY,
    REJECT_CALLER_LIMIT,
    REJECT_DRAINING,
    REJECT_INVALID,
    REJECT_UNAUTHENTICATED,
    Metrics,
)


class ChatCore:
    """Sessions, runner, admission and telemetry of one process, with the calls' lifecycle rules."""

    def __init__(
        self,
        settings: Settings,
        model: Model | None = None,
        metrics: Metrics | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.settings = settings
        self.log: FilteringBoundLogger = log or structlog.get_logger("agent_service")
        self.metrics = metrics
        self.limits = RequestLimits.from_settings(settings)
        self.model_name = settings.resolved_model_id()
        self.store = open_store(settings)
        self.registry = SessionRegistry(AgentFactory(settings, model or build_model(settings)), self.store, settings)
        self.runner = AgentRunner(self.registry, settings.cancel_grace_s, settings.coalesce_text)
        self.admission = Admission(settings.max_concurrent_streams, settings.max_streams_per_principal)
        self.identity = Authenticator(settings, self.log)
        self.draining = asyncio.Event()
        self.store_monitor = StoreMonitor(self.store, self.log)
        self._evictor: asyncio.Task[None] | None = None
        if metrics is not None:
            metrics.sessions_active.set_function(lambda: len(self.registry))
            metrics.streams_limit.set(settings.max_concurrent_streams)

    async def start(self) -> None:
        """Load the identity provider's keys; start background work (idle-session eviction, the store's health)."""
        await self.identity.start()
        interval = max(1.0, min(60.0, self.settings.session_idle_s / 4))
        self._evictor = asyncio.get_running_loop().create_task(self.registry.evict_idle_forever(interval))
        self.store_monitor.start()

    @property
    def serving(self) -> bool:
        """Ready for calls: not draining, and the session store answers (read from any thread)."""
        return not self.admission.draining and self.store_monitor.healthy

    def call(
        self, method: str, peer: str, client_timeout_s: float | None = None, authorization: str | None = None
    ) -> ChatCall:
        """Open a call: `client_timeout_s` is the time the client gave it (None: no deadline), `authorization`
        the value of its authorization header (a bearer token)."""
        return ChatCall(self, method, peer, client_timeout_s, authorization)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new calls (UNAVAILABLE), end idle bidi streams, let answers in flight finish (bounded).

        True when every call ended within the grace.
        """
        self.begin_drain()
        return await self.admission.wait_idle(timeout_s=grace_s)

    def begin_drain(self) -> None:
        """From now on new calls get UNAVAILABLE and idle bidi streams end."""
        self.admission.draining = True
        self.draining.set()

    async def aclose(self) -> None:
        """Wind down cancelled runs (bounded), stop background work, close the store."""
        await self.runner.aclose(self.settings.cancel_grace_s * 2 + 1)
        await self.identity.aclose()
        for task in (self._evictor, self.store_monitor.task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.store.aclose()


class ChatCall:
    """One call through one door: its deadline, its admission slot, its events' numbering and its outcome.

    Use as an async context manager around the door's whole exchange; leaving it
    records the outcome: a ChatError's kind, CANCELLED (or DEADLINE_EXCEEDED once the
    deadline has passed) when the door's task is cancelled or its stream closed, OK
    otherwise. Any other exception is logged and becomes ChatError(INTERNAL).
    """

    def __init__(
        self, core: ChatCore, method: str, peer: str, client_timeout_s: float | None, authorization: str | None
    ) -> None:
        self._core = core
        metrics = core.metrics.for_method(method) if core.metrics is not None else None
        self.observer = CallObserver(core.log, method, peer, metrics, core.model_name)
        self.deadline, self.hard_deadline = _deadlines(core.settings, client_timeout_s)
        self._admitted = False
        self._peer = peer
        self._authorization = authorization
        self.caller = anonymous(peer)
        self._call_id = uuid.uuid4().hex[:16]
        self._sequence = 0

    async def __aenter__(self) -> ChatCall:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if isinstance(error, ChatError):
            self.finish(error.kind, error.fault)
            return
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            if asyncio.get_running_loop().time() >= self.deadline.at:
                self.finish(ErrorKind.DEADLINE_EXCEEDED, self.deadline.fault)
            elif self._core.draining.is_set():
                self.finish(ErrorKind.UNAVAILABLE)  # cut by the shutdown after the drain's grace
            else:
                self.finish(ErrorKind.CANCELLED)
            return
        if isinstance(error, Exception):
            self.observer.log.error("call.failed", exc_info=error)
            self.finish(ErrorKind.INTERNAL)
            raise ChatError(ErrorKind.INTERNAL, "internal error") from None
        self.finish(None)

    def finish(self, outcome: ErrorKind | None, fault: Fault | None = None) -> None:
        """Record how the call ended (once) and give back its slot."""
        if self.observer.finished:
            return
        if self._admitted:
            self._admitted = False
            self._core.admission.leave(self.caller.limit_key)
        self.observer.finish(outcome, fault)

    def expired(self) -> ChatError:
        """The error for a call whose deadline passed while the door could not deliver an event."""
        return self.deadline.exceeded()

    async def answer(self, request: ChatInput | ChatError) -> AsyncIterator[Reply]:
        """Answer one request (StreamChat, /invocations): validate, admit, then the answer's events.

        `request` is a ChatError when the door could not even decode what arrived.
        """
        self.observer.turn_started()
        self._identify()
        valid = self._validate(request)
        self._admit()
        target = (
            SessionKey(self.caller.principal, valid.session_id) if valid.session_id else self._core.registry.ephemeral()
        )
        async for reply in self._turn(valid, target, turn=1):
            yield reply

    async def converse(self, requests: AsyncIterable[ChatInput | ChatError]) -> AsyncIterator[Reply]:
        """Answer a stream of requests in arrival order (BidirectionalChat, /ws).

        A request that is invalid (or could not even be decoded: the door passes its
        ChatError) or finds its session busy gets a Failure event and the stream goes
        on; a failed answer ends the call. The stream ends when the client half-closes,
        when no request arrives for `AGENT_BIDI_IDLE_S`, or at once when the server
        drains and no answer is in progress.
        """
        self._identify()
        self._admit()
        settings = self._core.settings
        conversation = self._core.registry.ephemeral()  # the stream's own history when no session id is sent
        inbox: asyncio.Queue[ChatInput | ChatError | None] = asyncio.Queue(maxsize=settings.bidi_read_ahead)
        reader = asyncio.get_running_loop().create_task(_read_requests(requests, inbox))
        turn = 0
        try:
            while (request := await self._next_request(inbox)) is not None:
                turn += 1
                self.observer.turn_started()
                session_id = ""
                try:
                    valid = self._validate(request)
                    session_id = valid.session_id
                    target = SessionKey(self.caller.principal, session_id) if session_id else conversation
                    async for reply in self._turn(valid, target, turn):
                        yield reply
                except ChatError as error:
                    if error.kind not in (ErrorKind.INVALID_ARGUMENT, ErrorKind.ABORTED):
                        raise
                    yield self._reply(turn, session_id, Failure(error.kind.value, error.message))
        finally:
            reader.cancel()

    async def _next_request(self, inbox: asyncio.Queue[ChatInput | ChatError | None]) -> ChatInput | ChatError | None:
        """The next request, None at half-close; ChatError when idle too long, past the deadline or draining."""
        if not inbox.empty():
            return inbox.get_nowait()
        loop = asyncio.get_running_loop()
        idle_s = self._core.settings.bidi_idle_s
        wait_until = min(loop.time() + idle_s, self.deadline.at)
        getter = loop.create_task(inbox.get())
        drained = loop.create_task(self._core.draining.wait())
        try:
            done, _ = await asyncio.wait({getter, drained}, timeout=max(0.0, wait_until - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            drained.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if drained in done:
            raise ChatError(ErrorKind.UNAVAILABLE, "the server is shutting down; reconnect to continue")
        if loop.time() >= self.deadline.at:
            raise self.deadline.exceeded()
        raise ChatError(
            ErrorKind.DEADLINE_EXCEEDED,
            f"no request arrived for {idle_s:g} s; the idle stream was closed (AGENT_BIDI_IDLE_S)",
            Fault.CLIENT,
        )

    def _identify(self) -> None:
        try:
            self.caller = self._core.identity.identify(self._authorization, self._peer)
        except ChatError as error:
            self.observer.rejected(
                REJECT_UNAUTHENTICATED if error.kind is ErrorKind.UNAUTHENTICATED else REJECT_DRAINING
            )
            raise
        self.observer.bind_principal(self.caller.principal)

    def _validate(self, request: ChatInput | ChatError) -> ValidRequest:
        try:
            if isinstance(request, ChatError):
                raise request
            valid = validate(request, self._core.limits)
        except ChatError:
            self.observer.rejected(REJECT_INVALID)
            raise
        self.observer.bind_session(valid.session_id)
        return valid

    def _admit(self) -> None:
        try:
            self._core.admission.enter(self.caller.limit_key)
        except ChatError as error:
            if error.kind is ErrorKind.UNAVAILABLE:
                reason = REJECT_DRAINING
            else:
                reason = REJECT_CALLER_LIMIT if error.fault is Fault.CLIENT else REJECT_ADMISSION
            self.observer.rejected(reason)
            raise
        self._admitted = True

    async def _turn(self, valid: ValidRequest, target: Session | SessionKey, turn: int) -> AsyncIterator[Reply]:
        """One answer: its events numbered and accounted, `Done` last; a failed answer ends with `Failure`."""
        started = time.perf_counter()
        session_id = valid.session_id
        count = 0
        try:
            async for event in self._core.runner.run(target, valid.content, self.deadline):
                if isinstance(event, Finished):
                    duration_ms = round((time.perf_counter() - started) * 1000, 3)
                    yield self._reply(turn, session_id, Done(event.stop_reason, event.usage, count, duration_ms))
                else:
                    count += 1
                    yield self._reply(turn, session_id, event)
        except ChatError as error:
            if error.kind is ErrorKind.ABORTED and count == 0:
                self.observer.rejected(REJECT_BUSY)
                raise  # the session is busy: refused before anything ran
            yield self._reply(turn, session_id, Failure(error.kind.value, error.message))
            raise

    def _reply(self, turn: int, session_id: str, event: ReplyEvent) -> Reply:
        self._sequence += 1
        self.observer.sent(event)
        return Reply(self._call_id, self._sequence, turn, session_id, event)


def _deadlines(settings: Settings, client_timeout_s: float | None) -> tuple[Deadline, float]:
    """The call's effective deadline and the hard limit by which its door must have ended it.

    The effective deadline is the earlier of the client's (less a margin, so the
    service's DEADLINE_EXCEEDED, an error event then the status, reaches the client
    before a proxy enforcing the same deadline resets the stream) and the server's
    cap, `AGENT_MAX_STREAM_DURATION_S`, which a client cannot lift. The hard limit,
    half a margin later, is for a door whose write is blocked by a client that stopped
    reading: it then ends the call without waiting for the event to go out.
    """
    now = asyncio.get_running_loop().time()
    margin_s = settings.deadline_margin_ms / 1000
    cap = Deadline(now + settings.max_stream_duration_s, Fault.SERVER)
    deadline = cap
    if client_timeout_s is not None:
        client = Deadline(now + max(0.0, client_timeout_s - margin_s), Fault.CLIENT)
        deadline = client if client.at <= cap.at else cap
    return deadline, deadline.at + margin_s / 2


async def _read_requests(
    requests: AsyncIterable[ChatInput | ChatError], inbox: asyncio.Queue[ChatInput | ChatError | None]
) -> None:
    """Read a bidi stream ahead of the answers (bounded by the inbox); None marks the half-close."""
    try:
        async for request in requests:
            await inbox.put(request)
    except Exception:  # noqa: BLE001 - the client went away; the call itself is being cancelled
        pass
    await inbox.put(None)
