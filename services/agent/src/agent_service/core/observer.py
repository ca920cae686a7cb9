"""One call as seen from outside: outcome, timings, events, tokens; logged, counted and traced here.

The chat core reports what happens to a call to this object and nowhere else, so
log lines, metrics and span attributes come from one place on every door. Intervals
use the monotonic `perf_counter`. Time to first chunk counts from the moment a
request is taken up (for a bidi stream: each message, not the stream's opening, so
a client's think time is not the server's latency). The per-chunk path is a clock
read, two increments and one histogram observation. Prompts and answers are never
logged.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from structlog.typing import FilteringBoundLogger

from agent_service.core.errors import ErrorKind, Fault
from agent_service.core.events import Done, ReplyEvent, TextDelta, ToolCall, ToolOutcome
from agent_service.telemetry.metrics import MethodMetrics


class CallObserver:
    """Observes one call (a gRPC stream, an HTTP request) from arrival to its outcome."""

    def __init__(
        self,
        log: FilteringBoundLogger,
        method: str,
        peer: str,
        metrics: MethodMetrics | None = None,
        model: str = "",
    ) -> None:
        self.method = method
        self.outcome: ErrorKind | None = None  # None: OK
        self.fault = Fault.NONE
        self.session_id = ""
        self.events = 0
        self.text_chunks = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.finished = False
        self._metrics = metrics
        self._started = self._turn_started = time.perf_counter()
        self._first_event_s: float | None = None
        self._turn_has_event = False
        self._last_chunk: float | None = None
        self._tools_started: dict[str, float] = {}
        self._span = trace.get_current_span()
        if self._span.is_recording():
            self._span.set_attributes({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": model})
        span_context = self._span.get_span_context()
        self._exemplar = (
            {"trace_id": format(span_context.trace_id, "032x")}
            if span_context.is_valid and span_context.trace_flags.sampled
            else None
        )
        self._log = log.bind(method=method)
        self._log.info("call.start", peer=peer)
        if metrics is not None:
            metrics.in_flight.inc()
            metrics.metrics.streams_started.labels(method).inc()

    @property
    def log(self) -> FilteringBoundLogger:
        return self._log

    @property
    def status(self) -> str:
        """The outcome's wire code ("OK" when none)."""
        return "OK" if self.outcome is None else self.outcome.value

    def bind_session(self, session_id: str) -> None:
        """Tag the call's later log lines and its span with the session."""
        if session_id and session_id != self.session_id:
            self.session_id = session_id
            self._log = self._log.bind(session_id=session_id)
            self._span.set_attribute("gen_ai.conversation.id", session_id)

    def bind_principal(self, principal: str) -> None:
        """Tag the call's later log lines and its span with the caller (never its token)."""
        self._log = self._log.bind(principal=principal)
        self._span.set_attribute("enduser.id", principal)

    def turn_started(self) -> None:
        """A request of the call is taken up: its time to first chunk counts from now."""
        self._turn_started = time.perf_counter()
        self._turn_has_event = False
        self._last_chunk = None

    def sent(self, event: ReplyEvent) -> None:
        """An event is on its way to the client."""
        now = time.perf_counter()
        self.events += 1
        metrics = self._metrics
        if not self._turn_has_event:
            self._turn_has_event = True
            ttfc = now - self._turn_started
            if self._first_event_s is None:
                self._first_event_s = ttfc
            if metrics is not None:
                metrics.ttfc.observe(ttfc, self._exemplar)
        if type(event) is TextDelta:
            self.text_chunks += 1
            if self._last_chunk is not None and metrics is not None:
                metrics.inter_chunk.observe(now - self._last_chunk)
            self._last_chunk = now
        elif isinstance(event, ToolCall):
            self._tools_started[event.tool_id] = now
        elif isinstance(event, ToolOutcome):
            started = self._tools_started.pop(event.tool_id, now)
            if metrics is not None:
                family = metrics.metrics
                family.tool_calls.labels(event.name, event.status).inc()
                family.tool_duration.labels(event.name).observe(now - started)
        elif isinstance(event, Done):
            self._answer_finished(event)

    def rejected(self, reason: str) -> None:
        """The call (or one bidi message) was refused; `reason` is a bounded label value."""
        if self._metrics is not None:
            self._metrics.metrics.rejected.labels(self.method, reason).inc()

    def finish(self, outcome: ErrorKind | None, fault: Fault | None = None) -> None:
        """Record the end of the call once: metrics, span attributes, the end-of-call log line."""
        if self.finished:
            return
        self.finished = True
        self.outcome = outcome
        self.fault = Fault.NONE if outcome is None else (fault or outcome.wire.fault)
        duration = time.perf_counter() - self._started
        ttfc_ms = None if self._first_event_s is None else round(self._first_event_s * 1000, 3)
        status = self.status
        metrics = self._metrics
        if metrics is not None:
            family = metrics.metrics
            metrics.in_flight.dec()
            family.streams_finished.labels(self.method, status, self.fault.value).inc()
            family.duration.labels(self.method, status, self.fault.value).observe(duration, self._exemplar)
            metrics.events.observe(self.events)
            metrics.text_chunks.observe(self.text_chunks)
        if self._span.is_recording():
            self._span.set_attributes(
                {
                    "rpc.grpc.status_code": 0 if outcome is None else outcome.wire.grpc_number,
                    "agent.status": status,
                    "agent.fault": self.fault.value,
                    "agent.events": self.events,
                    "agent.text_chunks": self.text_chunks,
                    "gen_ai.usage.input_tokens": self.input_tokens,
                    "gen_ai.usage.output_tokens": self.output_tokens,
                }
            )
            if ttfc_ms is not None:
                self._span.set_attribute("agent.time_to_first_chunk_ms", ttfc_ms)
        self._log.info(
            "call.end",
            status=status,
            fault=self.fault.value,
            duration_ms=round(duration * 1000, 3),
            ttfc_ms=ttfc_ms,
            events=self.events,
            chunks=self.text_chunks,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )

    def _answer_finished(self, event: Done) -> None:
        self.input_tokens += event.usage.input_tokens
        self.output_tokens += event.usage.output_tokens
        if self._metrics is not None:
            family = self._metrics.metrics
            family.tokens.labels("input", family.model).inc(event.usage.input_tokens)
            family.tokens.labels("output", family.model).inc(event.usage.output_tokens)
