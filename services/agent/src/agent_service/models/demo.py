"""The `demo` model: a deterministic, offline stand-in for an LLM.

It is a real strands ``Model`` so the agent loop, tool execution, sessions and
spans run exactly as they do with a provider; only the text is canned. Tests,
benchmarks and demo traffic use it; it is a test double and nothing else.

Behaviour, decided from the conversation alone (no randomness):
- a user prompt that mentions the time calls ``get_time``, the weather calls
  ``weather``, an arithmetic expression calls ``calculator``;
- after a tool result it answers with that result;
- otherwise it acknowledges the prompt, optionally padded to a fixed length.
The reply streams word by word with a fixed delay per word; like a provider, it
stops at `max_tokens` words (one word counts as one token) with `max_tokens`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import Any, TypedDict, TypeVar, overload

from pydantic import BaseModel
from strands.models import Model
from strands.types.content import ContentBlock, Messages
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolSpec

from agent_service.pacing import TokenPacer

T = TypeVar("T", bound=BaseModel)

# An arithmetic expression: at least one binary operator between numbers.
_ARITHMETIC = re.compile(r"[-+(]*\d+(?:\.\d+)?(?:\s*(?:\*\*|[-+*/%^])\s*[-+(]*\d+(?:\.\d+)?\)*)+")
_TIME = re.compile(r"\b(time|clock|date)\b", re.IGNORECASE)
_WEATHER = re.compile(r"\b(weather|forecast|temperature|sunny|rain)\b", re.IGNORECASE)
_FILLER = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]


class DemoConfig(TypedDict, total=False):
    """Configuration of the demo model (strands models keep a dict config)."""

    model_id: str
    token_delay_ms: float
    reply_words: int
    max_tokens: int


class DemoModel(Model):
    """Streams canned, deterministic replies and calls tools on keywords."""

    def __init__(self, **config: Any) -> None:
        self.config: DemoConfig = {"model_id": "demo", "token_delay_ms": 20.0, "reply_words": 0, "max_tokens": 0}
        self.update_config(**config)

    def update_config(self, **model_config: Any) -> None:
        self.config.update(model_config)  # type: ignore[typeddict-item]

    def get_config(self) -> DemoConfig:
        return self.config

    async def structured_output(
        self, output_model: type[T], prompt: Messages, system_prompt: str | None = None, **kwargs: Any
    ) -> AsyncGenerator[dict[str, T | Any], None]:
        """The demo model has no structured output; say so instead of inventing data."""
        raise NotImplementedError("the demo model does not support structured output")
        yield {}  # pragma: no cover - makes this an async generator

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        """Yield Bedrock-style stream events for the next assistant message."""
        tools = {spec["name"] for spec in tool_specs or []}
        tool_call = _plan_tool_call(messages, tools)
        input_tokens = sum(len(_text_of(m["content"]).split()) for m in messages)
        yield {"messageStart": {"role": "assistant"}}
        if tool_call is not None:
            name, tool_input = tool_call
            tool_use_id = f"tooluse_demo_{len(messages)}"
            yield {"contentBlockStart": {"start": {"toolUse": {"name": name, "toolUseId": tool_use_id}}}}
            yield {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(tool_input)}}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "tool_use"}}
            output_tokens = 1
        else:
            words = _reply_words(messages, self.config.get("reply_words", 0))
            max_tokens = self.config.get("max_tokens", 0)
            truncated = 0 < max_tokens < len(words)
            if truncated:
                words = words[:max_tokens]
            pacer = TokenPacer(max(0.0, float(self.config.get("token_delay_ms", 0.0))) / 1000.0)
            yield {"contentBlockStart": {"start": {}}}
            for index, word in enumerate(words):
                await pacer.wait()
                text = word if index == len(words) - 1 else word + " "
                yield {"contentBlockDelta": {"delta": {"text": text}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "max_tokens" if truncated else "end_turn"}}
            output_tokens = len(words)
        yield {
            "metadata": {
                "usage": {
                    "inputTokens": input_tokens,
                    "outputTokens": output_tokens,
                    "totalTokens": input_tokens + output_tokens,
                },
                "metrics": {"latencyMs": 0},
            }
        }


def _text_of(content: list[ContentBlock]) -> str:
    return " ".join(block["text"] for block in content if "text" in block)


def _plan_tool_call(messages: Messages, tools: set[str]) -> tuple[str, dict[str, Any]] | None:
    """Choose a tool for a fresh user prompt, or None to answer in text."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "user" or any("toolResult" in b for b in last["content"]):
        return None
    prompt = _text_of(last["content"])
    if "get_time" in tools and _TIME.search(prompt):
        return "get_time", {}
    if "weather" in tools and _WEATHER.search(prompt):
        return "weather", {}
    match = _ARITHMETIC.search(prompt)
    if "calculator" in tools and match:
        return "calculator", {"expression": match.group(0).strip()}
    return None


def _reply_words(messages: Messages, reply_words: int) -> Sequence[str]:
    """The words of a text reply: a tool's result, or an acknowledgement."""
    last = messages[-1] if messages else None
    results = [b["toolResult"] for b in (last["content"] if last else []) if "toolResult" in b]
    if results:
        outputs = " ".join(_text_of(r["content"]) for r in results)  # type: ignore[arg-type]
        failed = any(r.get("status") == "error" for r in results)
        text = f"The tool failed: {outputs}" if failed else f"Here is what the tool returned: {outputs}"
    else:
        prompt = _text_of(last["content"]) if last else ""
        text = f"This is the demo model answering: {prompt}"
    words = text.split()
    return _Words(words, reply_words) if reply_words > 0 else _Words(words, len(words))


class _Words(Sequence[str]):
    """An answer's words: the text's, then filler up to `length`, without a list of them per answer.

    A 200-word list was 1.6 KB of every open stream's memory (tracemalloc, 50 slow streams).
    """

    __slots__ = ("_head", "_length")

    def __init__(self, head: list[str], length: int) -> None:
        self._head = head
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        head = self._head
        return head[index] if index < len(head) else _FILLER[(index - len(head)) % len(_FILLER)]
