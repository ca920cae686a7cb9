"""`/ws`: the Runtime's bidirectional WebSocket door, a conversation over the chat core.

Each text frame from the client is one request, the same JSON object as an
`/invocations` body (`prompt`, optional `session_id`); each event of each answer
goes back as one text frame, a typed JSON object (`protocol.typed_event`). As on
gRPC's BidirectionalChat, requests are answered in arrival order; an invalid frame
or a busy session gets an `error` event and the conversation goes on; a failed
answer ends it. The server closes the socket with 1000 after a normal end, or with
a code saying whose fault the end was (reason: the wire code). A client that
closes or drops the socket cancels the answer in progress.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from bedrock_agentcore.runtime.models import SESSION_HEADER
from starlette.websockets import WebSocket, WebSocketState

from agent_service.agentcore import protocol
from agent_service.core import ChatCall, ChatCore, ChatError, ChatInput, ErrorKind, Fault

METHOD = "AgentCore/ws"
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # the client's doing
CLOSE_TRY_AGAIN = 1013  # the server is full or draining
CLOSE_ERROR = 1011


async def serve_websocket(core: ChatCore, websocket: WebSocket) -> None:
    """Accept the socket and converse until either side ends it."""
    await websocket.accept()
    client = websocket.client
    peer = f"{client.host}:{client.port}" if client else ""
    call = core.call(METHOD, peer, authorization=websocket.headers.get("authorization"))
    header_session = websocket.headers.get(SESSION_HEADER)
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    talking = loop.create_task(_converse(call, websocket, _requests(websocket, header_session, core, gone)))
    left = loop.create_task(gone.wait())
    try:
        await asyncio.wait({talking, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not talking.done():
            talking.cancel()
        await asyncio.gather(talking, left, return_exceptions=True)


async def _converse(call: ChatCall, websocket: WebSocket, requests: AsyncIterator[ChatInput | ChatError]) -> None:
    code, reason = CLOSE_NORMAL, "OK"
    try:
        async with call:
            async for reply in call.converse(requests):
                await websocket.send_text(json.dumps(protocol.typed_event(reply), ensure_ascii=False))
    except ChatError as error:
        code, reason = _close_code(error), error.kind.value
    if websocket.client_state is WebSocketState.CONNECTED:
        await websocket.close(code=code, reason=reason)


async def _requests(
    websocket: WebSocket, header_session: str | None, core: ChatCore, gone: asyncio.Event
) -> AsyncIterator[ChatInput | ChatError]:
    """Decode each text frame; a client that closes the socket is gone (its answer is cancelled)."""
    settings = core.settings
    while True:
        try:
            message = await websocket.receive()
        except RuntimeError:  # the socket is already closed
            message = {"type": "websocket.disconnect"}
        if message["type"] == "websocket.disconnect":
            gone.set()
            return
        text, data = message.get("text"), message.get("bytes")
        frame = text.encode() if text is not None else (data or b"")
        if len(frame) > settings.max_message_bytes:
            yield protocol.invalid(f"the message is larger than the limit of {settings.max_message_bytes} bytes")
            continue
        try:
            payload = protocol.parse_body(frame, settings.max_json_depth)
            chat_input, _shape = protocol.parse_invocation(payload, header_session)
        except ChatError as error:
            yield error
            continue
        yield chat_input


def _close_code(error: ChatError) -> int:
    if error.kind in (ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED):
        return CLOSE_TRY_AGAIN
    return CLOSE_POLICY if error.fault is Fault.CLIENT else CLOSE_ERROR
