"""Following one answer (a run) to its end, across dropped connections, showing each event once.

Every answer is a run on the server: it has an id (the ``x-run-id`` header before
the first event, and ``run_id`` on every event) and numbered events (``sequence``).
Asked with ``on_disconnect=CONTINUE``, a run goes on when its connection drops, so
when a call fails the way a broken connection makes it fail (UNAVAILABLE, or INTERNAL
from an HTTP/2 RST_STREAM, which is what a client sees through Envoy when a connection
behind it resets), `RunFollower` asks ``ResumeStream(run_id, last sequence received)``
for the rest: with back-off, for at most `RESUME_BUDGET_S` per outage (and within the
call's deadline), saying so once on stderr. An event at or below the last sequence
received is never shown again, so a replay cannot duplicate text; heartbeats only
say that the run is alive and are not shown.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from agent_service.cli.connect import CallOptions
from agent_service.cli.render import Renderer
from agent_service.proto import agent_pb2

# Response metadata of StreamChat that names the run before its first event.
RUN_HEADER = "x-run-id"
# How long one outage may last before agentctl gives up resuming (the run itself goes on).
RESUME_BUDGET_S = 30.0
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 3.0


def is_transport_failure(err: Any) -> bool:
    """Whether a failed call says "the connection broke" rather than "the server answered this status".

    UNAVAILABLE is what grpc reports for a connection that closed or could not be made;
    INTERNAL mentioning RST_STREAM is what a client gets when a proxy resets the stream
    because its own upstream connection failed.
    """
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return bool(code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (err.details() or ""))


@dataclass
class RunProgress:
    """What this client knows of a run: its id, whether the server named it, the last event shown, and how
    it ended (if it did)."""

    run_id: str = ""
    last_sequence: int = 0
    outcome: str = ""  # "done" or "error" once the run's last event was shown
    confirmed: bool = False  # the server sent the run's id or one of its events: it exists

    @property
    def ended(self) -> bool:
        return bool(self.outcome)

    def resume_command(self) -> str:
        return f"agentctl chat --resume {self.run_id}:{self.last_sequence}"


class RunFollower:
    """Shows one run's events through a `Renderer`, reconnecting with ResumeStream when the connection drops.

    `progress` stays readable after a failure or a Ctrl-C, for the caller's notes.
    ``resumable`` is False for a run asked with ``on_disconnect=CANCEL``: the drop
    cancelled it, so there is nothing to come back to.
    """

    def __init__(
        self,
        stub: Any,
        options: CallOptions,
        out: Renderer,
        *,
        resumable: bool = True,
        budget_s: float = RESUME_BUDGET_S,
    ) -> None:
        self._stub = stub
        self._options = options
        self._out = out
        self._resumable = resumable
        self._budget_s = budget_s
        self._deadline: float | None = None
        self.progress = RunProgress()

    @property
    def detached(self) -> bool:
        """The run is (as far as this client knows) still going at the server without anyone following it."""
        return self._resumable and self.progress.confirmed and not self.progress.ended

    async def chat(self, request: Any) -> None:
        """StreamChat ``request`` and follow its run to its end; a failed call raises its AioRpcError."""
        self._start_clock()
        call = self._stub.StreamChat(request, timeout=self._timeout(), metadata=self._options.metadata)
        await self._follow(call)

    async def resume(self, run_id: str, after_sequence: int = 0) -> None:
        """Show a run's events after ``after_sequence``, then its live ones until it ends."""
        self._start_clock()
        self.progress = RunProgress(run_id, after_sequence)
        await self._follow(self._resume_call())

    def _start_clock(self) -> None:
        timeout = self._options.timeout
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout

    def _timeout(self) -> float | None:
        """What is left of the answer's deadline, for the next call (None: no deadline)."""
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - asyncio.get_running_loop().time())

    def _resume_call(self) -> Any:
        request = agent_pb2.ResumeRequest(run_id=self.progress.run_id, after_sequence=self.progress.last_sequence)
        return self._stub.ResumeStream(request, timeout=self._timeout(), metadata=self._options.metadata)

    async def _follow(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        backoff: Backoff | None = None
        while True:
            received = _Counter()
            try:
                await self._show(call, received)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as err:
                if self.progress.outcome == "done" and is_transport_failure(err):
                    break  # the answer is complete; only the end of the call was lost
                if not self._may_resume(err):
                    raise
                if backoff is None or received.count:  # a new outage (the last call got through)
                    backoff = Backoff(loop.time(), self._budget_s, self._deadline)
                    self._out.aside(f"[connection lost ({err.code().name}); resuming run {self.progress.run_id}]")
                delay = backoff.next_delay(loop.time())
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                call = self._resume_call()
                continue
            break
        self._out.end_line()
        if not self.progress.ended:
            self._out.fail(f"[run {self.progress.run_id or '?'} ended before its answer was complete]")

    def _may_resume(self, err: Any) -> bool:
        progress = self.progress
        return self._resumable and bool(progress.run_id) and not progress.ended and is_transport_failure(err)

    async def _show(self, call: Any, received: _Counter) -> None:
        """Show the call's new events; learn the run id from the header when the call has one."""
        progress = self.progress
        if not progress.run_id:
            progress.run_id = _run_header(await call.initial_metadata())
            progress.confirmed = bool(progress.run_id)
        async for resp in call:
            received.count += 1
            progress.confirmed = True
            if resp.run_id and not progress.run_id:
                progress.run_id = resp.run_id
            kind = resp.WhichOneof("response")
            if kind == "heartbeat" or resp.sequence <= progress.last_sequence:
                continue  # alive, or already shown before the connection dropped
            progress.last_sequence = resp.sequence
            if kind in ("done", "error"):
                progress.outcome = kind
            self._out.show(resp)


@dataclass
class _Counter:
    count: int = 0


class Backoff:
    """Delays between attempts to resume, growing to `MAX_BACKOFF_S`, within one outage's budget and the deadline."""

    def __init__(
        self, started: float, budget_s: float, deadline: float | None, jitter: Callable[[], float] = random.random
    ) -> None:
        self._until = started + budget_s if deadline is None else min(started + budget_s, deadline)
        self._next = FIRST_BACKOFF_S
        self._jitter = jitter

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt; None when the budget is spent."""
        left = self._until - now
        if left <= 0:
            return None
        delay = min(self._next * (0.8 + 0.4 * self._jitter()), left)
        self._next = min(self._next * 2, MAX_BACKOFF_S)
        return delay


def _run_header(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == RUN_HEADER:
            return str(value)
    return ""
