"""Keeping a conversation well-formed: closing interrupted turns, repairing histories as they are loaded.

Providers with strict role alternation reject a history with two user messages in
a row or a tool call without its result. A turn can stop anywhere (a crash, a
provider failure, a deadline, a cancel, a drain), so whoever next holds the session
closes it: the user's prompt stays, the partial answer the client already received
is kept and marked as interrupted, and pending tool calls get an error result.
Everything here is pure, so each shape of a broken history is unit-tested.
"""

from __future__ import annotations

from strands.types.content import ContentBlock, Message

ABANDONED_TOOL_TEXT = "tool abandoned: the answer was interrupted"
MISSING_ANSWER_TEXT = "[interrupted: no answer was recorded]"
MISSING_PROMPT_TEXT = "[no message was recorded]"
# strands ends a stream cancelled mid-answer with an assistant message of this fixed text,
# dropping what was streamed; the runner puts the streamed part back.
STRANDS_CANCEL_TEXT = "Cancelled by user"


def interrupted_text(partial: str, reason: str) -> str:
    """The assistant text stored for an answer that did not complete: what was sent, then a marker."""
    marker = f"[interrupted: {reason}]"
    return f"{partial.rstrip()}\n\n{marker}" if partial.strip() else marker


def is_strands_cancel_text(message: Message) -> bool:
    content = message["content"]
    return message["role"] == "assistant" and len(content) == 1 and content[0].get("text") == STRANDS_CANCEL_TEXT


def closing_messages(messages: list[Message], partial: str, reason: str, cancelled: bool) -> tuple[list[Message], bool]:
    """What closes an incomplete turn: (messages to append, whether they replace the last one).

    - the last message is strands' own cancellation text (`cancelled`): replace it with the
      partial answer plus the marker;
    - an assistant tool call without results: error results, then the marker;
    - the user's prompt or tool results with no answer: the partial answer plus the marker;
    - a complete assistant answer: nothing.
    """
    if not messages:
        return [], False
    last = messages[-1]
    text = interrupted_text(partial, reason)
    if last["role"] == "assistant":
        pending = [block["toolUse"] for block in last["content"] if "toolUse" in block]
        if pending:
            return [_tool_errors([tool_use["toolUseId"] for tool_use in pending]), _assistant(text)], False
        if cancelled and is_strands_cancel_text(last):
            return [_assistant(text)], True
        return [], False
    return [_assistant(text)], False


def close_turn(messages: list[Message], partial: str, reason: str, cancelled: bool = False) -> bool:
    """Close an incomplete turn in place; True when the history changed."""
    closing, replace_last = closing_messages(messages, partial, reason, cancelled)
    if replace_last:
        messages[-1] = closing[0]
        return True
    messages.extend(closing)
    return bool(closing)


def repair(messages: list[Message]) -> tuple[list[Message], bool]:
    """A history that alternates roles and answers every tool call: (messages, whether anything changed).

    For histories written before turns were closed (two user messages in a row after a
    failed call, a crash mid-answer): nothing is dropped; the gaps get markers.
    """
    repaired: list[Message] = []
    changed = False
    for message in messages:
        if repaired and repaired[-1]["role"] == message["role"]:
            previous = repaired[-1]
            if previous["role"] == "assistant":
                pending = [block["toolUse"]["toolUseId"] for block in previous["content"] if "toolUse" in block]
                repaired.append(_tool_errors(pending) if pending else _user(MISSING_PROMPT_TEXT))
            elif not _answers_tools(message):
                repaired.append(_assistant(MISSING_ANSWER_TEXT))
            else:  # results of tools called before: keep them with their call by merging into one message
                repaired[-1] = {"role": "user", "content": [*previous["content"], *message["content"]]}
                changed = True
                continue
            changed = True
        elif repaired and message["role"] == "user" and _pending_tools(repaired[-1]) and not _answers_tools(message):
            repaired.append(_tool_errors(_pending_tools(repaired[-1])))
            repaired.append(_assistant(MISSING_ANSWER_TEXT))
            changed = True
        repaired.append(message)
    if close_turn(repaired, "", "the server stopped before the answer was complete"):
        changed = True
    return repaired, changed


def _pending_tools(message: Message) -> list[str]:
    if message["role"] != "assistant":
        return []
    return [block["toolUse"]["toolUseId"] for block in message["content"] if "toolUse" in block]


def _answers_tools(message: Message) -> bool:
    return any("toolResult" in block for block in message["content"])


def _tool_errors(tool_use_ids: list[str]) -> Message:
    results: list[ContentBlock] = [
        {"toolResult": {"toolUseId": tool_id, "status": "error", "content": [{"text": ABANDONED_TOOL_TEXT}]}}
        for tool_id in tool_use_ids
    ]
    return {"role": "user", "content": results}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": [{"text": text}]}


def _user(text: str) -> Message:
    return {"role": "user", "content": [{"text": text}]}
