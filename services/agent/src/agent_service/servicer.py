"""`agent.AgentService`: short handlers that validate, admit and stream what the runner yields.

Status policy:
- the whole call: admission (RESOURCE_EXHAUSTED), invalid StreamChat input
  (INVALID_ARGUMENT), busy session (ABORTED), deadline (DEADLINE_EXCEEDED),
  provider failure (an Error event, then UNAVAILABLE or INTERNAL);
- one message of a BidirectionalChat that is invalid or hits a busy session gets an
  Error event with that status name and the stream goes on with the next message.
Unexpected exceptions are logged here and reach the client as a bare INTERNAL:
no traceback ever leaves the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import grpc
from structlog.typing import FilteringBoundLogger

from agent_service.admission import Admission, AdmissionRejectedError
from agent_service.calls import Call
from agent_service.events import AgentEvent, Finished
from agent_service.proto import agent_pb2, agent_pb2_grpc
from agent_service.responses import ResponseBuilder
from agent_service.runner import AgentRunner, RunError
from agent_service.sessions import Session, SessionBusyError, SessionRegistry
from agent_service.telemetry.metrics import REJECT_ADMISSION, REJECT_BUSY, REJECT_INVALID, Metrics
from agent_service.validation import (
    InvalidRequestError,
    RequestLimits,
    ValidRequest,
    header_session_id,
    validate_request,
)

# grpc.aio reports "no deadline" as a time remaining far in the future.
_NO_DEADLINE_S = 1e8


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]  # generated, untyped
    """Handlers of both RPCs; everything agent-related is delegated to the runner."""

    def __init__(
        self,
        runner: AgentRunner,
        registry: SessionRegistry,
        admission: Admission,
        limits: RequestLimits,
        max_stream_duration_s: float,
        deadline_margin_s: float,
        bidi_read_ahead: int,
        log: FilteringBoundLogger,
        metrics: Metrics | None = None,
        model: str = "",
    ) -> None:
        self._runner = runner
        self._registry = registry
        self._admission = admission
        self._limits = limits
        self._max_stream_duration_s = max_stream_duration_s
        self._deadline_margin_s = deadline_margin_s
        self._bidi_read_ahead = bidi_read_ahead
        self._log = log
        self._metrics = metrics
        self._model = model

    async def StreamChat(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """Answer one request as a stream of events."""
        async with self._call("StreamChat", context) as call:
            try:
                valid = validate_request(request, self._limits, header_session_id(context.invocation_metadata()))
            except InvalidRequestError as exc:
                call.rejected(REJECT_INVALID)
                await _fail(call, context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            call.bind_session(valid.session_id)
            target: Session | str = valid.session_id or self._registry.ephemeral()
            builder = ResponseBuilder()
            try:
                async for response in self._answer(call, context, builder, target, valid, turn=1):
                    yield response
            except SessionBusyError as exc:
                call.rejected(REJECT_BUSY)
                await _fail(call, context, grpc.StatusCode.ABORTED, str(exc))

    async def BidirectionalChat(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterable[agent_pb2.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """Answer each incoming request in arrival order; end after the last one once the client half-closes."""
        async with self._call("BidirectionalChat", context) as call:
            inbox: asyncio.Queue[agent_pb2.ChatRequest | None] = asyncio.Queue(maxsize=self._bidi_read_ahead)
            reader = asyncio.create_task(_read_requests(request_iterator, inbox))
            conversation = self._registry.ephemeral()  # the stream's own history when no session id is sent
            header_session = header_session_id(context.invocation_metadata())
            builder = ResponseBuilder()
            turn = 0
            try:
                while (request := await inbox.get()) is not None:
                    turn += 1
                    call.turn_started()
                    try:
                        valid = validate_request(request, self._limits, header_session)
                    except InvalidRequestError as exc:
                        call.rejected(REJECT_INVALID)
                        yield _sent(call, builder.error("INVALID_ARGUMENT", str(exc), turn=turn, session_id=""))
                        continue
                    call.bind_session(valid.session_id)
                    target = valid.session_id or conversation
                    try:
                        async for response in self._answer(call, context, builder, target, valid, turn=turn):
                            yield response
                    except SessionBusyError as exc:
                        call.rejected(REJECT_BUSY)
                        yield _sent(call, builder.error("ABORTED", str(exc), turn=turn, session_id=valid.session_id))
            finally:
                reader.cancel()

    async def _answer(
        self,
        call: Call,
        context: grpc.aio.ServicerContext,
        builder: ResponseBuilder,
        target: Session | str,
        request: ValidRequest,
        turn: int,
    ) -> AsyncIterator[agent_pb2.ChatResponse]:
        """Stream one answer; a failed run sends an Error event and ends the call with its status."""
        started = time.perf_counter()
        sent_before = builder.sent
        session_id = request.session_id
        try:
            async for event in self._runner.run(target, request.content, self._deadline(context)):
                if isinstance(event, Finished):
                    duration_ms = (time.perf_counter() - started) * 1000
                    response = builder.event(
                        event,
                        turn=turn,
                        session_id=session_id,
                        event_count=builder.sent - sent_before,
                        duration_ms=duration_ms,
                    )
                else:
                    response = builder.event(event, turn=turn, session_id=session_id)
                yield _sent(call, response, event)
        except RunError as exc:
            yield _sent(call, builder.error(exc.kind.value, exc.message, turn=turn, session_id=session_id))
            await _fail(call, context, grpc.StatusCode[exc.kind.value], exc.message)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """When the answer must end (loop time).

        The client's deadline less a small margin, so the service's own DEADLINE_EXCEEDED
        (an error event, then the status in the trailers) reaches the client before any
        proxy enforcing the same deadline resets the stream; without a client deadline,
        the server's maximum stream duration.
        """
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_S:
            remaining = self._max_stream_duration_s
        else:
            remaining = float(remaining) - self._deadline_margin_s
        return asyncio.get_running_loop().time() + max(0.0, float(remaining))

    @asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        """Admission, the call's log lines and final status, and the last line of defence for errors."""
        metrics = self._metrics.for_method(method) if self._metrics is not None else None
        call = Call(self._log, method, context.peer(), metrics, self._model)
        try:
            self._admission.enter()
        except AdmissionRejectedError as exc:
            call.rejected(REJECT_ADMISSION)
            await _fail(call, context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), finish=True)
        try:
            yield call
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.status = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            call.log.exception("call.failed")
            await _fail(call, context, grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self._admission.leave()
            call.finish()


def _sent(call: Call, response: agent_pb2.ChatResponse, event: AgentEvent | None = None) -> agent_pb2.ChatResponse:
    call.sent(event)
    return response


async def _fail(
    call: Call, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, finish: bool = False
) -> NoReturn:
    """End the call with `code`; the status is recorded for the call's last log line."""
    call.status = code
    if finish:
        call.finish()
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def _read_requests(
    requests: AsyncIterable[agent_pb2.ChatRequest], inbox: asyncio.Queue[agent_pb2.ChatRequest | None]
) -> None:
    """Read a bidi stream ahead of the answers (bounded by the inbox); None marks the half-close."""
    try:
        async for request in requests:
            await inbox.put(request)
    except Exception:  # noqa: BLE001 - the client went away; the call itself is being cancelled
        pass
    await inbox.put(None)
