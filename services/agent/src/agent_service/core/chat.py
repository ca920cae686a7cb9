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
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from types import TracebackType

import structlog
from strands.models import Model
from structlog.typing import FilteringBoundLogger

from agent_service.core.admission import Admission
from agent_service.core.deadline import Deadline
from agent_service.core.errors import ChatError, ErrorKind, Fault
from agent_service.core.events import Failure, Reply, ReplyEvent
from agent_service.core.identity import Authenticator, anonymous
from agent_service.core.observer import CallObserver
from agent_service.core.requests import ChatInput, DisconnectPolicy, RequestLimits, ValidRequest, validate
from agent_service.core.runner import AgentRunner
from agent_service.core.runs import Run, RunManager
from agent_service.core.sessions import AgentFactory, Session, SessionRegistry
from agent_service.core.spare_agents import SpareAgents
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
        factory = AgentFactory(settings, model or build_model(settings))
        self.registry = SessionRegistry(factory, self.store, settings)
        self.spares = SpareAgents(factory)
        self.runner = AgentRunner(self.registry, settings.cancel_grace_s, settings.coalesce_text)
        self.runs = RunManager(self.runner, self.store.runs, settings, self.log)
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

    def cap(self) -> Deadline:
        """The server's own limit on a run, from now (AGENT_MAX_STREAM_DURATION_S)."""
        return Deadline(asyncio.get_running_loop().time() + self.settings.max_stream_duration_s, Fault.SERVER)

    def begin_drain(self) -> None:
        """From now on new calls get UNAVAILABLE and idle bidi streams end."""
        self.admission.draining = True
        self.draining.set()
        self.spares.stopped = True

    async def aclose(self) -> None:
        """Wind down runs (bounded), stop background work, close the store."""
        await self.runs.aclose(timeout_s=1.0)
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
        self._slot_kept_by_run = False
        self._peer = peer
        self._authorization = authorization
        self.caller = anonymous(peer)
        # Awaited with the run id once a run is accepted, before its first event (the gRPC door sends it
        # as `x-run-id` initial metadata).
        self.run_started: Callable[[str], Awaitable[None]] | None = None
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
        if self._admitted and not self._slot_kept_by_run:
            self._admitted = False
            self._core.admission.leave(self.caller.limit_key)
        self.observer.finish(outcome, fault)
        self._core.spares.refill_soon()

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
        principal = self.caller.principal
        target = SessionKey(principal, valid.session_id) if valid.session_id else self._core.spares.session()
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
        conversation = self._core.spares.session()  # the stream's own history when no session id is sent
        inbox: asyncio.Queue[ChatInput | ChatError | None] = asyncio.Queue(maxsize=settings.bidi_read_ahead)
        reader = asyncio.get_running_loop().create_task(_read_requests(requests, inbox))
        turn = 0
        try:
            while (request := await self._next_request(inbox)) is not None:
                turn += 1
                self.observer.turn_started()
                session_id = ""
                answering = False
                try:
                    valid = self._validate(request)
                    session_id = valid.session_id
                    target = SessionKey(self.caller.principal, session_id) if session_id else conversation
                    async for reply in self._turn(valid, target, turn):
                        answering = True
                        yield reply
                except ChatError as error:
                    # Refused before answering (invalid, busy): say so and go on. Anything that stopped an
                    # answer under way (its Failure event is out already; an interruption too) ends the call.
                    if answering or error.kind not in (ErrorKind.INVALID_ARGUMENT, ErrorKind.ABORTED):
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
        """One answer, run by the core's run manager; this call follows it while it is connected.

        With `on_disconnect=CONTINUE` the run's own limit is the server's cap, not the
        client's deadline, and a client that leaves lets it finish (it keeps this call's
        stream slot until then); otherwise leaving cancels it.
        """
        keep_going = valid.on_disconnect is DisconnectPolicy.CONTINUE
        run = self._core.runs.start(
            target,
            valid,
            self._core.cap() if keep_going else self.deadline,
            call_id=self._call_id,
            turn=turn,
            owner=self.caller.principal,
            base_sequence=self._sequence,
            started=self.run_started,
        )
        base = self._sequence
        try:
            async for reply in run.follow():
                self._sequence = max(self._sequence, reply.sequence)
                self.observer.sent(reply.event)
                yield reply
        except ChatError as error:
            if error.kind is ErrorKind.ABORTED and run.last_sequence == base:
                self.observer.rejected(REJECT_BUSY)  # refused before anything ran: the session is busy
            raise
        finally:
            if not run.finished:
                if keep_going:
                    self._hand_slot_to(run)
                    run.detach()
                else:
                    run.cancel()

    async def resume(self, run_id: str, after_sequence: int) -> AsyncIterator[Reply]:
        """ResumeStream: a run's events after `after_sequence`, then its live ones (the caller must own it)."""
        self.observer.turn_started()
        self._identify()
        self._admit()
        async for reply in self._core.runs.replay(run_id, after_sequence, self.caller.principal, self.deadline.at):
            self.observer.sent(reply.event)
            yield reply

    def _hand_slot_to(self, run: Run) -> None:
        """A run that goes on after its client left keeps the call's stream slot until it ends."""
        if not self._admitted or self._slot_kept_by_run:
            return
        self._slot_kept_by_run = True
        admission, limit_key = self._core.admission, self.caller.limit_key
        run.on_end = lambda: admission.leave(limit_key)

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
