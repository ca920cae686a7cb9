"""The AgentCore door's wire format: request bodies in, SSE and WebSocket payloads out.

`POST /invocations` takes a JSON object: `prompt` (required), `session_id`
(optional; the Runtime's session header may carry it instead, and both must agree)
and `stream`: `"text"` (default) or `"events"`.

- `"text"`: each `data:` line is one piece of the answer as a JSON string, so the
  seed notebook's loop (strip `data: `, strip quotes, print) prints the answer and
  nothing else. A failure ends the stream with one JSON object, as the seed's own
  agent does: `{"type": "error", "code", "error"}`.
- `"events"`: every event as a JSON object with a `type`: `text`, `tool_use`,
  `tool_result`, `done` (last of a complete answer) or `error` (last of a failed
  one), each with the call's `sequence`.

Limits apply before parsing: a body over the gRPC message limit is refused with 413
without reading further, and JSON nested deeper than `AGENT_MAX_JSON_DEPTH` with 400
(100,000-deep JSON used to exhaust the parser's recursion and answer 500).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Any, Literal

from agent_service.core import ChatError, ChatInput, ErrorKind, Reply
from agent_service.core.events import Done, Failure, TextDelta, ToolCall, ToolOutcome

StreamShape = Literal["text", "events"]
STREAM_SHAPES: tuple[StreamShape, ...] = ("text", "events")

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def invalid(message: str) -> ChatError:
    return ChatError(ErrorKind.INVALID_ARGUMENT, message)


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text, without parsing it (strings skipped)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, *accumulate(1 if byte in b"[{" else -1 for byte in brackets))


def parse_body(body: bytes, max_depth: int) -> Any:
    """The JSON value of a request body, or ChatError(INVALID_ARGUMENT) saying what is wrong."""
    if json_depth(body) > max_depth:
        raise invalid(f"the JSON body is nested deeper than {max_depth} levels")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the body is not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None


def parse_invocation(payload: Any, header_session_id: str | None) -> tuple[ChatInput, StreamShape]:
    """An /invocations payload as the core's input and the stream shape it asks for."""
    if not isinstance(payload, Mapping):
        raise invalid('the body must be a JSON object such as {"prompt": "hello"}')
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise invalid('"prompt" must be a non-empty string')
    body_session = payload.get("session_id", "")
    if not isinstance(body_session, str):
        raise invalid('"session_id" must be a string')
    shape = payload.get("stream", "text")
    if shape not in STREAM_SHAPES:
        raise invalid(f'"stream" must be one of {", ".join(STREAM_SHAPES)}')
    sources = {'"session_id"': body_session, "the session header": header_session_id or ""}
    return ChatInput(content=prompt, session_sources=sources), shape


def event_payload(reply: Reply, shape: StreamShape) -> str | dict[str, Any] | None:
    """One reply as the JSON value of its SSE `data:` line (None: not sent in this shape)."""
    event = reply.event
    if shape == "text":
        if type(event) is TextDelta:
            return event.text
        if isinstance(event, Failure):
            return error_object(event.code, event.message)
        return None
    return typed_event(reply)


def typed_event(reply: Reply) -> dict[str, Any]:
    """One reply as a typed JSON object (the `events` shape and the WebSocket door)."""
    event = reply.event
    body: dict[str, Any]
    if type(event) is TextDelta:
        body = {"type": "text", "text": event.text}
    elif isinstance(event, ToolCall):
        body = {"type": "tool_use", "tool_use_id": event.tool_id, "name": event.name, "input": _json(event.input_json)}
    elif isinstance(event, ToolOutcome):
        body = {
            "type": "tool_result",
            "tool_use_id": event.tool_id,
            "name": event.name,
            "status": event.status,
            "output": event.output,
        }
    elif isinstance(event, Done):
        usage = event.usage
        body = {
            "type": "done",
            "stop_reason": event.stop_reason,
            "usage": {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
            },
            "event_count": event.event_count,
            "duration_ms": event.duration_ms,
            "session_id": reply.session_id,
        }
    else:
        assert isinstance(event, Failure)
        body = error_object(event.code, event.message)
    body["sequence"] = reply.sequence
    if reply.turn > 1:
        body["turn"] = reply.turn
    return body


def error_object(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "error": message}


def sse(data: str | Mapping[str, Any]) -> bytes:
    """One Server-Sent Event carrying `data` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
