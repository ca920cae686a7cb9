"""Agent events → `ChatResponse` messages, numbered in call order.

Every event of a call gets the next sequence number (1, 2, …, across all turns
of a bidi stream) and an event id unique to the call.
"""

from __future__ import annotations

import uuid

from agent_service.events import AgentEvent, Finished, TextDelta, ToolCall, ToolOutcome
from agent_service.proto import agent_pb2


class ResponseBuilder:
    """Builds the responses of one call."""

    def __init__(self) -> None:
        self._call_id = uuid.uuid4().hex[:16]
        self._sequence = 0

    @property
    def sent(self) -> int:
        """Responses built so far in this call."""
        return self._sequence

    def event(
        self, event: AgentEvent, *, turn: int, session_id: str, event_count: int = 0, duration_ms: float = 0.0
    ) -> agent_pb2.ChatResponse:
        """The response for one agent event (`event_count`/`duration_ms` are for `Finished`)."""
        response = self._next(turn, session_id)
        if isinstance(event, TextDelta):
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
        elif isinstance(event, Finished):
            done = response.done
            done.stop_reason = event.stop_reason
            done.usage.input_tokens = event.usage.input_tokens
            done.usage.output_tokens = event.usage.output_tokens
            done.usage.total_tokens = event.usage.total_tokens
            done.event_count = event_count
            done.duration_ms = duration_ms
        return response

    def error(self, code: str, message: str, *, turn: int, session_id: str) -> agent_pb2.ChatResponse:
        """An Error event: `code` is a gRPC status name."""
        response = self._next(turn, session_id)
        response.error.code = code
        response.error.message = message
        return response

    def _next(self, turn: int, session_id: str) -> agent_pb2.ChatResponse:
        self._sequence += 1
        return agent_pb2.ChatResponse(
            event_id=f"{self._call_id}-{self._sequence}",
            sequence=self._sequence,
            session_id=session_id,
            turn=turn,
        )
