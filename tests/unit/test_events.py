"""strands event dicts → agent events, for every shape the service relies on."""

from __future__ import annotations

import json
from types import SimpleNamespace

from agent_service.core.events import Finished, TextDelta, ToolCall, ToolNames, ToolOutcome, Usage, map_strands_event


def _map(event, tools=None):
    return list(map_strands_event(event, tools or ToolNames()))


def test_text_delta() -> None:
    assert _map({"data": "hel", "delta": {"text": "hel"}}) == [TextDelta("hel")]
    assert _map({"data": ""}) == []


def test_tool_call_then_result_carries_the_tool_name() -> None:
    tools = ToolNames()
    tool_use = {"toolUseId": "t1", "name": "calculator", "input": {"expression": "1+1"}}
    call = {"role": "assistant", "content": [{"toolUse": tool_use}]}
    assert _map({"message": call}, tools) == [ToolCall("t1", "calculator", json.dumps({"expression": "1+1"}))]
    tool_result = {"toolUseId": "t1", "status": "error", "content": [{"text": "bad"}, {"json": {"a": 1}}]}
    result = {"role": "user", "content": [{"toolResult": tool_result}]}
    assert _map({"message": result}, tools) == [ToolOutcome("t1", "calculator", 'bad\n{"a": 1}', "error")]


def test_text_only_messages_and_other_events_map_to_nothing() -> None:
    assert _map({"message": {"role": "assistant", "content": [{"text": "whole answer"}]}}) == []
    assert _map({"init_event_loop": True}) == []
    assert _map({"event": {"contentBlockDelta": {"delta": {"text": "x"}}}}) == []


def test_result_becomes_finished_with_usage() -> None:
    usage = {"inputTokens": 3, "outputTokens": 5, "totalTokens": 8}
    result = SimpleNamespace(stop_reason="end_turn", metrics=SimpleNamespace(accumulated_usage=usage))
    assert _map({"result": result}) == [Finished("end_turn", Usage(3, 5, 8))]
