"""`POST /invocations`: one request answered by the chat core as Server-Sent Events.

Everything runs on the server's event loop, where the core lives: the body is read
(bounded), decoded, and the call's first reply awaited, so a refusal (bad input,
busy session, stream limit) is an HTTP status with a JSON body from the core's
error table, not a 200 stream carrying an error. The answer then streams in a task
of its own while this one waits for the client to go away: a client that
disconnects cancels its answer at once, even while the model has not said a word.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bedrock_agentcore.runtime.models import SESSION_HEADER
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from agent_service.agentcore import protocol
from agent_service.core import ChatCall, ChatCore, ChatError, ErrorKind, Fault, Reply

METHOD = "AgentCore/invocations"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class BodyTooLargeError(ChatError):
    """The request body is over the limit: RESOURCE_EXHAUSTED, the client's doing; HTTP's own 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorKind.RESOURCE_EXHAUSTED, f"the request body is larger than the limit of {limit} bytes", Fault.CLIENT
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (without reading on) once it is over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(limit)
    return bytes(body)


def error_response(error: ChatError, status_code: int | None = None) -> JSONResponse:
    """An error as JSON with the status of the core's error table (unless HTTP has a more precise one)."""
    return JSONResponse(
        {"error": error.message, "code": error.kind.value}, status_code=status_code or error.kind.wire.http_status
    )


class Invocations:
    """The `/invocations` endpoint over one chat core (an ASGI app)."""

    def __init__(self, core: ChatCore) -> None:
        self._core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        client = request.client
        peer = f"{client.host}:{client.port}" if client else ""
        call = self._core.call(METHOD, peer, authorization=request.headers.get("authorization"))
        answer = _Answer(call, request, self._core.settings.max_message_bytes, self._core.settings.max_json_depth)
        streaming = asyncio.get_running_loop().create_task(answer.respond(send))
        gone = asyncio.get_running_loop().create_task(_client_gone(receive, answer))
        try:
            done, _ = await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not streaming.done():
                streaming.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
        if streaming in done and not streaming.cancelled() and (error := streaming.exception()) is not None:
            raise error


async def _client_gone(receive: Receive, answer: _Answer) -> None:
    """Return when the client disconnects (once the body has been read, nothing else arrives)."""
    await answer.body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


class _Answer:
    """One invocation: decode, refuse or stream."""

    def __init__(self, call: ChatCall, request: Request, max_body: int, max_depth: int) -> None:
        self.call = call
        self.request = request
        self.max_body = max_body
        self.max_depth = max_depth
        self.body_read = asyncio.Event()

    async def respond(self, send: Send) -> None:
        replies: AsyncIterator[Reply] | None = None
        started = False
        try:
            async with self.call:
                try:
                    body = await read_body(self.request, self.max_body)
                finally:
                    self.body_read.set()
                chat_input, shape = self._decode(body)
                replies = self.call.answer(chat_input)
                first = await anext(replies)
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                await _send_event(send, first, shape)
                async for reply in replies:
                    await _send_event(send, reply, shape)
        except BodyTooLargeError as error:
            await _send_response(send, error_response(error, status_code=413))
            return
        except ChatError as error:
            if not started:
                await _send_response(send, error_response(error))
                return
        finally:
            if replies is not None:
                with contextlib.suppress(Exception):
                    await replies.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _decode(self, body: bytes) -> tuple[Any, protocol.StreamShape]:
        header_session = self.request.headers.get(SESSION_HEADER)
        try:
            return protocol.parse_invocation(protocol.parse_body(body, self.max_depth), header_session)
        except ChatError as error:
            return error, "text"


async def _send_event(send: Send, reply: Reply, shape: protocol.StreamShape) -> None:
    data = protocol.event_payload(reply, shape)
    if data is not None:
        await send({"type": "http.response.body", "body": protocol.sse(data), "more_body": True})


async def _send_response(send: Send, response: Response) -> None:
    async def nothing() -> dict[str, Any]:  # the body was read (or refused) already
        return {"type": "http.disconnect"}

    await response({"type": "http"}, nothing, send)
