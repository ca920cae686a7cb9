"""Model doubles for failure cases the demo model does not produce: a hung provider, a failing one.

They subclass the demo model, so everything else (tools, sessions, spans) runs for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Any

from strands.types.content import Messages
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolSpec

from agent_service.models.demo import DemoModel


class HangingModel(DemoModel):
    """Sends a few words, then never answers again (a provider that stopped responding).

    Only the first `hang_calls` calls hang; later calls answer normally.
    """

    def __init__(self, hang_calls: int = 1, **config: Any) -> None:
        super().__init__(**config)
        self.hang_calls = hang_calls
        self.calls = 0

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        self.calls += 1
        if self.calls > self.hang_calls:
            async for event in super().stream(messages, tool_specs, system_prompt, **kwargs):
                yield event
            return
        yield {"messageStart": {"role": "assistant"}}
        yield {"contentBlockStart": {"start": {}}}
        yield {"contentBlockDelta": {"delta": {"text": "thinking "}}}
        await asyncio.Event().wait()  # hangs until cancelled


class FailingModel(DemoModel):
    """Streams `words_before_failure` words, then raises `error` (a provider failing mid-stream)."""

    def __init__(self, error: BaseException, words_before_failure: int = 3, **config: Any) -> None:
        super().__init__(**config)
        self.error = error
        self.words_before_failure = words_before_failure

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        yield {"messageStart": {"role": "assistant"}}
        yield {"contentBlockStart": {"start": {}}}
        for index in range(self.words_before_failure):
            yield {"contentBlockDelta": {"delta": {"text": f"word{index} "}}}
        raise self.error


class BigChunkModel(DemoModel):
    """Streams `chunks` text deltas of `chunk_chars` characters each, all at once (a provider with a full buffer)."""

    def __init__(self, chunks: int, chunk_chars: int, **config: Any) -> None:
        super().__init__(**config)
        self.chunks = chunks
        self.chunk_chars = chunk_chars

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        yield {"messageStart": {"role": "assistant"}}
        yield {"contentBlockStart": {"start": {}}}
        for index in range(self.chunks):
            yield {"contentBlockDelta": {"delta": {"text": str(index % 10) * self.chunk_chars}}}
        yield {"contentBlockStop": {}}
        yield {"messageStop": {"stopReason": "end_turn"}}


class SilentThenSpeakingModel(DemoModel):
    """Says nothing for `silence_s` (a long tool call, a slow model), then answers like the demo model."""

    def __init__(self, silence_s: float, **config: Any) -> None:
        super().__init__(**config)
        self.silence_s = silence_s

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        await asyncio.sleep(self.silence_s)
        async for event in super().stream(messages, tool_specs, system_prompt, **kwargs):
            yield event


class GatedModel(DemoModel):
    """Answers like the demo model, but an answer to a prompt starting with `HOLD` stops after its first word
    until `gate` is set: a session kept busy exactly as long as a test needs, whatever the machine's load."""

    HOLD = "hold"

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.gate = asyncio.Event()

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterable[StreamEvent]:
        last = messages[-1] if messages else None
        held = last is not None and any(b.get("text", "").startswith(self.HOLD) for b in last["content"])
        async for event in super().stream(messages, tool_specs, system_prompt, **kwargs):
            yield event
            if held and "contentBlockDelta" in event:
                held = False
                await self.gate.wait()
