"""The pace of a streamed answer: token n is due at start + n × delay.

Its own module, free of strands, so the benchmark's raw baseline paces its words exactly as the demo
model does without importing strands (seconds of start-up for every baseline process).
"""

from __future__ import annotations

import asyncio


class TokenPacer:
    """Releases tokens on a fixed schedule: token n is due at start + n × delay.

    Sleeping `delay` per token would add every wake-up's overshoot to the stream (about
    10% at 20 ms on a busy loop); a schedule keeps the rate of a model generating at a
    steady speed, and a consumer that fell behind gets the tokens already due at once.
    """

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._next: float | None = None

    async def wait(self, tokens: int = 1) -> None:
        if not self._delay_s:
            return
        now = asyncio.get_running_loop().time()
        self._next = (now if self._next is None else self._next) + self._delay_s * tokens
        if self._next > now:
            await asyncio.sleep(self._next - now)
