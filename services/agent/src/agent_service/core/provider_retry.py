"""Provider retries that respect the answer's deadline.

strands retries a throttled model call with exponential back-off (4 s, 8 s, 16 s,
... by default) and provider SDKs retry again underneath: a provider answering 429
was retried until the client's deadline and ended DEADLINE_EXCEEDED, holding the
session and a stream slot meanwhile. Here there is one retry layer (the SDKs' own
retries are off, see `models/factory.py`), it is short, and it gives up at once when
the back-off would not end before the deadline, so throttling becomes UNAVAILABLE
promptly and the client can decide what to do.
"""

from __future__ import annotations

import asyncio

from strands import ModelRetryStrategy
from strands.types.exceptions import ModelThrottledException


class DeadlineAwareRetry(ModelRetryStrategy):
    """strands' retry strategy, bounded by the answer in progress's deadline (event-loop time)."""

    def __init__(self, *, max_attempts: int, initial_delay: int) -> None:
        super().__init__(max_attempts=max_attempts, initial_delay=initial_delay, max_delay=max(1, initial_delay) * 8)
        self.deadline: float | None = None
        self._initial = initial_delay
        self._failures = 0

    def start(self, deadline: float) -> None:
        """A new answer begins: bound its retries by `deadline`."""
        self.deadline = deadline
        self._failures = 0

    def is_retryable(self, exception: Exception) -> bool:
        if not isinstance(exception, ModelThrottledException):
            return False
        # strands sleeps initial_delay * 2**n before retry n+1 (n counts since its last success; counting
        # since the answer began can only overestimate, i.e. give up sooner); give up if it outlasts the answer.
        next_delay = self._initial << self._failures
        self._failures += 1
        if self.deadline is None:
            return True
        return asyncio.get_running_loop().time() + next_delay < self.deadline
