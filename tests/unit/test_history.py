"""Closing interrupted turns and repairing loaded histories: every shape ends alternating, nothing dropped."""

from __future__ import annotations

import itertools

import pytest

from agent_service.core.history import (
    ABANDONED_TOOL_TEXT,
    MISSING_ANSWER_TEXT,
    close_turn,
    interrupted_text,
    repair,
)


def user(text: str) -> dict:
    return {"role": "user", "content": [{"text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"text": text}]}


def tool_call(*tool_ids: str) -> dict:
    uses = [{"toolUse": {"toolUseId": tool_id, "name": "calculator", "input": {}}} for tool_id in tool_ids]
    return {"role": "assistant", "content": uses}


def tool_result(tool_id: str) -> dict:
    return {"role": "user", "content": [{"toolResult": {"toolUseId": tool_id, "status": "success", "content": []}}]}


def alternates(messages: list[dict]) -> bool:
    return all(a["role"] != b["role"] for a, b in itertools.pairwise(messages))


def answers_every_tool(messages: list[dict]) -> bool:
    for current, following in itertools.pairwise(messages):
        calls = {b["toolUse"]["toolUseId"] for b in current["content"] if "toolUse" in b}
        results = {b["toolResult"]["toolUseId"] for b in following["content"] if "toolResult" in b}
        if calls and calls != results:
            return False
    return not any("toolUse" in b for b in messages[-1]["content"]) if messages else True


def test_a_partial_answer_is_kept_with_a_marker() -> None:
    assert interrupted_text("Paris is the capital ", "the request was cancelled") == (
        "Paris is the capital\n\n[interrupted: the request was cancelled]"
    )
    assert interrupted_text("  ", "x") == "[interrupted: x]"


def test_an_unanswered_prompt_gets_the_partial_answer() -> None:
    history = [user("hi"), assistant("hello"), user("tell me more")]
    assert close_turn(history, "Well, ", "the model provider failed")
    assert history[-1] == assistant("Well,\n\n[interrupted: the model provider failed]")
    assert alternates(history)


def test_strands_cancellation_text_is_replaced_by_what_was_streamed() -> None:
    history = [user("story"), assistant("Cancelled by user")]
    assert close_turn(history, "Once upon a time ", "the answer ran out of time", cancelled=True)
    assert history == [user("story"), assistant("Once upon a time\n\n[interrupted: the answer ran out of time]")]


def test_a_real_answer_that_happens_to_say_cancelled_is_left_alone() -> None:
    history = [user("say it"), assistant("Cancelled by user")]
    assert not close_turn(history, "", "x", cancelled=False)
    assert history == [user("say it"), assistant("Cancelled by user")]


def test_a_pending_tool_call_gets_an_error_result_then_the_marker() -> None:
    history = [user("6*7?"), tool_call("t1")]
    assert close_turn(history, "", "the request was cancelled")
    assert history[2]["content"][0]["toolResult"]["status"] == "error"
    assert history[2]["content"][0]["toolResult"]["content"] == [{"text": ABANDONED_TOOL_TEXT}]
    assert history[3] == assistant("[interrupted: the request was cancelled]")
    assert alternates(history) and answers_every_tool(history)


def test_a_complete_answer_needs_nothing() -> None:
    history = [user("hi"), assistant("hello")]
    assert not close_turn(history, "hello", "x", cancelled=True)
    assert history == [user("hi"), assistant("hello")]


@pytest.mark.parametrize(
    "history",
    [
        [user("a"), user("b"), assistant("B")],  # a failed call before turns were closed
        [user("a"), assistant("A"), user("b")],  # a crash mid-answer
        [user("a"), tool_call("t1"), user("b"), assistant("B")],  # an abandoned tool call
        [user("a"), assistant("A"), assistant("A2")],
        [user("a"), tool_call("t1")],
        [user("a"), tool_call("t1", "t2"), tool_result("t1"), tool_result("t2")],
        [],
    ],
    ids=[
        "two-prompts",
        "trailing-prompt",
        "orphan-tool-call",
        "two-answers",
        "trailing-tool-call",
        "split-results",
        "empty",
    ],
)
def test_repair_makes_any_history_well_formed_and_keeps_every_message(history: list[dict]) -> None:
    repaired, changed = repair([dict(m) for m in history])
    assert alternates(repaired) and answers_every_tool(repaired)
    assert not repaired or repaired[-1]["role"] == "assistant"
    texts = [b.get("text") for m in repaired for b in m["content"]]
    assert all(b.get("text") in texts for m in history for b in m["content"] if "text" in b)
    assert changed == (repaired != history)


def test_repair_marks_the_missing_answer() -> None:
    repaired, _ = repair([user("a"), user("b"), assistant("B")])
    assert repaired == [user("a"), assistant(MISSING_ANSWER_TEXT), user("b"), assistant("B")]
