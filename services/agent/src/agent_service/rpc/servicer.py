"""`agent.AgentService` over grpc.aio: decode, call the chat core, encode; nothing else.

Handlers take the request's raw bytes (see `codec`) and write each reply with
`context.write` inside the call's hard deadline, so a client that stops reading
cannot hold a stream past its deadline: the call then ends DEADLINE_EXCEEDED
(queued behind what the client has not read) and frees its slot. They are async
generators that never yield, because the OpenTelemetry server interceptor iterates
streaming handlers; `context.write` keeps the writes inside this code, where
cancellation and deadlines can reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from agent_service.core import ChatCall, ChatCore, ChatError, ChatInput, Reply
from agent_service.proto import agent_pb2
from agent_service.rpc import codec

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
# Response metadata of StreamChat: the run id, sent before the first event (for ResumeStream).
RUN_HEADER = "x-run-id"
# grpc.aio reports "no deadline" as a time remaining far in the future.
_NO_DEADLINE_S = 1e8
# How long ending a call may wait for its status to be queued: it waits behind a write the
# client is not reading, and the status still goes out once the client reads that far.
_ABORT_WAIT_S = 0.25


class AgentServicer:
    """Both RPCs of agent.AgentService over one chat core."""

    def __init__(self, core: ChatCore) -> None:
        self._core = core

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers, taking raw request bytes and writing serialized replies."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "StreamChat": grpc.unary_stream_rpc_method_handler(self.stream_chat),
                "BidirectionalChat": grpc.stream_stream_rpc_method_handler(self.bidirectional_chat),
                "ResumeStream": grpc.unary_stream_rpc_method_handler(self.resume_stream),
            },
        )

    async def stream_chat(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One request, one streamed answer."""
        metadata = context.invocation_metadata()
        call = self._core.call("StreamChat", context.peer(), _client_timeout(context), _authorization(metadata))
        header_session = codec.header_session_id(metadata)
        headers = _Headers(context)
        call.run_started = headers.announce
        await _serve(call, context, call.answer(codec.decode_request(request, header_session)), headers)
        return
        yield b""  # pragma: no cover - makes this an async generator (see the module docstring)

    async def resume_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A run's events after a sequence, then its live ones."""
        metadata = context.invocation_metadata()
        call = self._core.call("ResumeStream", context.peer(), _client_timeout(context), _authorization(metadata))
        await _serve(call, context, _resumed(call, codec.decode_resume(request)))
        return
        yield b""  # pragma: no cover - makes this an async generator (see the module docstring)

    async def bidirectional_chat(
        self, requests: AsyncIterable[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Many requests on one stream, answered in arrival order."""
        metadata = context.invocation_metadata()
        call = self._core.call("BidirectionalChat", context.peer(), _client_timeout(context), _authorization(metadata))
        header_session = codec.header_session_id(metadata)
        await _serve(call, context, call.converse(_decoded(requests, header_session)))
        return
        yield b""  # pragma: no cover - makes this an async generator (see the module docstring)


class _Headers:
    """The run id as initial metadata (`x-run-id`), sent while the agent starts rather than before it.

    Sending headers is a round trip through gRPC's completion queue; awaited before the
    run started, it added that much to every time to first chunk. The send is started
    when the run is accepted and awaited before the first write (or the status), which
    it must precede.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._sending: asyncio.Task[None] | None = None

    async def announce(self, run_id: str) -> None:
        send = self._context.send_initial_metadata(((RUN_HEADER, run_id),))
        self._sending = asyncio.get_running_loop().create_task(send)

    @property
    def pending(self) -> bool:
        return self._sending is not None

    async def sent(self) -> None:
        """Until the headers are out (at once when there are none to send)."""
        if self._sending is not None:
            sending, self._sending = self._sending, None
            await sending

    async def drop(self) -> None:
        """The call is ending: the headers no longer matter, but their send must not be left behind."""
        if self._sending is None:
            return
        sending, self._sending = self._sending, None
        if not sending.done():
            sending.cancel()
        with contextlib.suppress(BaseException):  # ending anyway: their failure (or cancellation) says nothing new
            await sending


async def _serve(
    call: ChatCall, context: grpc.aio.ServicerContext, replies: AsyncIterator[Reply], headers: _Headers | None = None
) -> None:
    """Write the replies within the call's hard deadline; end the call with its status."""
    try:
        async with call:
            try:
                async with asyncio.timeout_at(call.hard_deadline):
                    async for reply in replies:
                        if headers is not None and headers.pending:
                            await headers.sent()
                        await context.write(codec.encode(reply))
            except TimeoutError:
                raise call.expired() from None
            finally:
                await _close(replies)
                if headers is not None:
                    await headers.drop()
    except ChatError as error:
        await _abort(context, error)


async def _close(replies: AsyncIterator[Reply]) -> None:
    aclose = getattr(replies, "aclose", None)
    if aclose is not None:
        await aclose()


async def _abort(context: grpc.aio.ServicerContext, error: ChatError) -> None:
    """End the call with the error's status; bounded, in case a write ahead of it is stuck."""
    code = grpc.StatusCode[error.kind.wire.grpc_name]
    with contextlib.suppress(TimeoutError):  # the status is queued behind data the client has not read
        await asyncio.wait_for(context.abort(code, error.message), _ABORT_WAIT_S)


async def _resumed(call: ChatCall, decoded: tuple[str, int] | ChatError) -> AsyncIterator[Reply]:
    if isinstance(decoded, ChatError):
        raise decoded
    async for reply in call.resume(*decoded):
        yield reply


async def _decoded(requests: AsyncIterable[bytes], header_session: str) -> AsyncIterator[ChatInput | ChatError]:
    async for data in requests:
        yield codec.decode_request(data, header_session)


def _authorization(metadata: object) -> str | None:
    return codec.header(metadata, "authorization")  # type: ignore[arg-type]


def _client_timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The time the client's deadline leaves (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return max(0.0, float(remaining))
