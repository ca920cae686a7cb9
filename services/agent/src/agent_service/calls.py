"""One RPC as seen from outside: its status, timings and event count, logged at start and end.

The servicer reports what happens to a call here and nowhere else, so the
signals about a stream (log lines now, metrics and spans later) come from one
object instead of being sprinkled across the handlers. Prompts and answers are
never logged.
"""

from __future__ import annotations

import time

import grpc
from structlog.typing import FilteringBoundLogger


class Call:
    """Observes one RPC from arrival to its final status."""

    def __init__(self, log: FilteringBoundLogger, method: str, peer: str) -> None:
        self.method = method
        self.status = grpc.StatusCode.OK
        self.session_id = ""
        self.events = 0
        self._started = time.perf_counter()
        self._first_event_s: float | None = None
        self._log = log.bind(method=method)
        self._log.info("call.start", peer=peer)

    def bind_session(self, session_id: str) -> None:
        """Tag later log lines of the call with its session."""
        if session_id and session_id != self.session_id:
            self.session_id = session_id
            self._log = self._log.bind(session_id=session_id)

    def sent(self) -> None:
        """A response left for the client (cheap: called per chunk)."""
        self.events += 1
        if self._first_event_s is None:
            self._first_event_s = time.perf_counter() - self._started

    def finish(self) -> None:
        """Log the end-of-call line with status, duration and time to first event."""
        duration_ms = (time.perf_counter() - self._started) * 1000
        ttfc_ms = None if self._first_event_s is None else round(self._first_event_s * 1000, 3)
        self._log.info(
            "call.end",
            status=self.status.name,
            duration_ms=round(duration_ms, 3),
            ttfc_ms=ttfc_ms,
            events=self.events,
        )

    @property
    def log(self) -> FilteringBoundLogger:
        return self._log
