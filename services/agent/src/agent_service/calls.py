"""One RPC as seen from outside: status, timings, events, tokens; logged, counted and traced here.

The servicer reports what happens to a call to this object and nowhere else, so
log lines, metrics and span attributes about a stream come from one place
instead of being sprinkled across the handlers. Intervals use the monotonic
`perf_counter`; time to first chunk counts from the request's arrival. The
per-chunk path is a clock read, two increments and one histogram observation.
Prompts and answers are never logged.
"""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace
from structlog.typing import FilteringBoundLogger

from agent_service.events import AgentEvent, Finished, TextDelta, ToolCall, ToolOutcome
from agent_service.telemetry.metrics import MethodMetrics


class Call:
    """Observes one RPC from arrival to its final status."""

    def __init__(
        self,
        log: FilteringBoundLogger,
        method: str,
        peer: str,
        metrics: MethodMetrics | None = None,
        model: str = "",
    ) -> None:
        self.method = method
        self.status = grpc.StatusCode.OK
        self.session_id = ""
        self.events = 0
        self.text_chunks = 0
        self.input_tokens = 0
        self.output_tokens = 0
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

    def bind_session(self, session_id: str) -> None:
        """Tag the call's later log lines and its span with the session."""
        if session_id and session_id != self.session_id:
            self.session_id = session_id
            self._log = self._log.bind(session_id=session_id)
            self._span.set_attribute("gen_ai.conversation.id", session_id)

    def turn_started(self) -> None:
        """A request of the call starts being answered (the first one arrived with the call)."""
        if self._turn_has_event:
            self._turn_started = time.perf_counter()
        self._turn_has_event = False
        self._last_chunk = None

    def sent(self, event: AgentEvent | None = None) -> None:
        """A response left for the client; `event` is what it carried (None for an error event)."""
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
        elif isinstance(event, Finished):
            self._answer_finished(event)

    def rejected(self, reason: str) -> None:
        """The call (or one bidi message) was refused; `reason` is a bounded label value."""
        if self._metrics is not None:
            self._metrics.metrics.rejected.labels(self.method, reason).inc()

    def finish(self) -> None:
        """Record the end of the call: metrics, span attributes, the end-of-call log line."""
        duration = time.perf_counter() - self._started
        ttfc_ms = None if self._first_event_s is None else round(self._first_event_s * 1000, 3)
        metrics = self._metrics
        if metrics is not None:
            family = metrics.metrics
            metrics.in_flight.dec()
            family.streams_finished.labels(self.method, self.status.name).inc()
            family.duration.labels(self.method, self.status.name).observe(duration, self._exemplar)
            metrics.events.observe(self.events)
            metrics.text_chunks.observe(self.text_chunks)
        if self._span.is_recording():
            self._span.set_attributes(
                {
                    "rpc.grpc.status_code": self.status.value[0],
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
            status=self.status.name,
            duration_ms=round(duration * 1000, 3),
            ttfc_ms=ttfc_ms,
            events=self.events,
            chunks=self.text_chunks,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )

    def _answer_finished(self, event: Finished) -> None:
        self.input_tokens += event.usage.input_tokens
        self.output_tokens += event.usage.output_tokens
        if self._metrics is not None:
            family = self._metrics.metrics
            family.tokens.labels("input", family.model).inc(event.usage.input_tokens)
            family.tokens.labels("output", family.model).inc(event.usage.output_tokens)
