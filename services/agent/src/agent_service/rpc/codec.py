"""Bytes on the gRPC wire ↔ the chat core's requests and replies.

Requests are decoded here rather than by grpc: a message grpc cannot decode
(invalid UTF-8 in a string, a corrupt or truncated message) would otherwise be
answered UNKNOWN with a traceback before any handler, log line or metric saw it,
and in a bidi stream it looked like a half-close that silently dropped every later
message.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from agent_service.core import ChatError, ChatInput, ErrorKind
from agent_service.core.events import Done, Failure, Reply, TextDelta, ToolCall, ToolOutcome
from agent_service.proto import agent_pb2

SESSION_METADATA_KEY = "session_id"
# gRPC metadata header carrying the session id; Envoy hashes on it to keep a session on one replica.
SESSION_HEADER = "x-session-id"


def decode_request(data: bytes, header_session_id: str) -> ChatInput | ChatError:
    """A ChatRequest's bytes as the core's input, or the INVALID_ARGUMENT error saying why not."""
    try:
        request = agent_pb2.ChatRequest.FromString(data)
    except DecodeError as exc:
        reason = str(exc).strip() or "malformed message"
        return ChatError(ErrorKind.INVALID_ARGUMENT, f"the request is not a valid agent.ChatRequest: {reason[:200]}")
    metadata = dict(request.metadata)
    return ChatInput(
        content=request.content,
        metadata=metadata,
        session_sources={
            "session_id": request.session_id,
            f"metadata[{SESSION_METADATA_KEY!r}]": metadata.get(SESSION_METADATA_KEY, ""),
            f"the {SESSION_HEADER} header": header_session_id,
        },
    )


def header_session_id(invocation_metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The `x-session-id` header of a call, or ""."""
    return header(invocation_metadata, SESSION_HEADER) or ""


def header(invocation_metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str | None:
    """One metadata value of a call (the first), or None."""
    for key, value in invocation_metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def encode(reply: Reply) -> bytes:
    """One reply as a serialized ChatResponse."""
    response = agent_pb2.ChatResponse(
        event_id=reply.event_id, sequence=reply.sequence, session_id=reply.session_id, turn=reply.turn
    )
    event = reply.event
    if type(event) is TextDelta:
        response.content.text = event.text
    elif isinstance(event, ToolCall):
        response.tool_use.tool_name = event.name
        response.tool_use.tool_id = event.tool_id
        response.tool_use.input = event.input_json
    elif isinstance(event, ToolOutcome):
        response.tool_result.tool_id = event.tool_id
        response.tool_result.tool_name = event.name
        response.tool_result.output = event.output
        response.tool_result.status = event.status
    elif isinstance(event, Done):
        done = response.done
        done.stop_reason = event.stop_reason
        done.usage.input_tokens = event.usage.input_tokens
        done.usage.output_tokens = event.usage.output_tokens
        done.usage.total_tokens = event.usage.total_tokens
        done.event_count = event.event_count
        done.duration_ms = event.duration_ms
    elif isinstance(event, Failure):
        response.error.code = event.code
        response.error.message = event.message
    return response.SerializeToString()
