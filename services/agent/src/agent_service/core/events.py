"""What an answer is made of, independent of any transport, and how strands events map to it.

The runner yields agent events (text, tool call, tool outcome, finished); the chat
core numbers them into `Reply`s, closing each answer with `Done` or `Failure`; the
adapters only encode replies. Mapping functions are pure, so each strands event
shape is unit-tested without running an agent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asked for a tool; `input_json` is the tool input as JSON."""

    tool_id: str
    name: str
    input_json: str


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """A tool finished; `status` is "success" or "error"."""

    tool_id: str
    name: str
    output: str
    status: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the model provider reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer is complete."""

    stop_reason: str
    usage: Usage = field(default_factory=Usage)


AgentEvent = TextDelta | ToolCall | ToolOutcome | Finished


class ToolNames:
    """Remembers tool names by id, so results (which carry only the id) can name their tool."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def remember(self, tool_id: str, name: str) -> None:
        self._names[tool_id] = name

    def name_of(self, tool_id: str) -> str:
        return self._names.get(tool_id, "")


def map_strands_event(event: Mapping[str, Any], tools: ToolNames) -> Iterator[AgentEvent]:
    """Map one event of ``Agent.stream_async`` to zero or more agent events.

    Text arrives as ``data`` deltas. Tool calls are announced from the assistant
    message once its input is complete; tool results come from the following user
    message's ``toolResult`` blocks (strands streams no separate result event).
    """
    data = event.get("data")
    if isinstance(data, str):
        if data:
            yield TextDelta(data)
        return
    message = event.get("message")
    if isinstance(message, Mapping):
        yield from _map_message(message, tools)
        return
    result = event.get("result")
    if result is not None and "stop_reason" in dir(result):
        yield Finished(stop_reason=str(result.stop_reason), usage=_usage_of(result))


def _map_message(message: Mapping[str, Any], tools: ToolNames) -> Iterator[AgentEvent]:
    for block in message.get("content", []):
        tool_use = block.get("toolUse")
        if tool_use is not None and message.get("role") == "assistant":
            tools.remember(tool_use["toolUseId"], tool_use["name"])
            yield ToolCall(
                tool_id=tool_use["toolUseId"],
                name=tool_use["name"],
                input_json=json.dumps(tool_use.get("input", {}), ensure_ascii=False, default=str),
            )
        tool_result = block.get("toolResult")
        if tool_result is not None:
            tool_id = tool_result["toolUseId"]
            yield ToolOutcome(
                tool_id=tool_id,
                name=tools.name_of(tool_id),
                output=tool_result_text(tool_result.get("content", [])),
                status=str(tool_result.get("status", "success")),
            )


def tool_result_text(content: list[Mapping[str, Any]]) -> str:
    """Flatten a tool result's content blocks to text (JSON blocks as JSON)."""
    parts = []
    for block in content:
        if "text" in block:
            parts.append(str(block["text"]))
        elif "json" in block:
            parts.append(json.dumps(block["json"], ensure_ascii=False, default=str))
    return "\n".join(parts)


def _usage_of(result: Any) -> Usage:
    return usage_from_counts(getattr(getattr(result, "metrics", None), "accumulated_usage", None) or {})


def usage_from_counts(usage: Mapping[str, Any]) -> Usage:
    """Usage from strands' Bedrock-style counts (`inputTokens`, `outputTokens`, `totalTokens`)."""
    return Usage(
        input_tokens=int(usage.get("inputTokens", 0)),
        output_tokens=int(usage.get("outputTokens", 0)),
        total_tokens=int(usage.get("totalTokens", 0)),
    )


@dataclass(frozen=True, slots=True)
class Done:
    """The last event of a complete answer, with the answer's own accounting."""

    stop_reason: str
    usage: Usage
    event_count: int  # events of this answer sent before this one
    duration_ms: float


@dataclass(frozen=True, slots=True)
class Failure:
    """The last event of a failed answer (or of one refused message of a bidi stream)."""

    code: str  # the wire code: a gRPC status name
    message: str


ReplyEvent = TextDelta | ToolCall | ToolOutcome | Done | Failure


@dataclass(frozen=True, slots=True)
class Reply:
    """One event as the caller receives it: numbered in the call, tagged with its turn and session."""

    call_id: str
    sequence: int
    turn: int
    session_id: str
    event: ReplyEvent

    @property
    def event_id(self) -> str:
        return f"{self.call_id}-{self.sequence}"
