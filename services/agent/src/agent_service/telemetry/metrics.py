"""Prometheus metrics of the agent service, in a registry of their own (one per server).

Names follow Prometheus conventions (base units, `_seconds`, `_total` added by the
client library) and the names the field uses for model timings (time to first
chunk, inter-chunk gap, tokens by type). Labels are bounded: method, status code,
model, tool, reason, never a session id. Per-method children are bound once, so
the per-chunk cost is one histogram observation.

With `AGENT_WORKERS` > 1 the workers write their values to prometheus_client's
multiprocess files and the supervisor serves them summed (`group_registry`): the
names and labels are the same, but there are no exemplars and no `Info` or
callback gauges in that mode, so `agent_build_info` is a gauge set to 1 and
`agent_sessions_active` is set by `Metrics.refresh`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import Histogram as HistogramType
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

TTFC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

SHUTDOWN_POLL_S = 0.02
REJECT_ADMISSION = "admission"
REJECT_INVALID = "invalid_argument"
REJECT_BUSY = "session_busy"
REJECT_DRAINING = "draining"
REJECT_UNAUTHENTICATED = "unauthenticated"
REJECT_CALLER_LIMIT = "caller_limit"


class Metrics:
    """Every metric the service exports.

    `multiprocess`: this process is one of a group of workers whose values the
    supervisor aggregates (prometheus_client's multiprocess mode must already be on,
    see `agent_service.workers`); gauges then say how the workers' values combine.
    """

    def __init__(self, model: str, version: str, provider: str, multiprocess: bool = False) -> None:
        self.model = model
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_in_flight = Gauge(
            "agent_streams_in_flight", "Streams being served.", ["method"], registry=r, multiprocess_mode="livesum"
        )
        self.streams_started = Counter(
            "agent_streams_started", "Streams received (admitted or not).", ["method"], registry=r
        )
        self.streams_finished = Counter(
            "agent_streams_finished",
            "Streams ended, by status code and whose doing the outcome is (fault: none, client, server).",
            ["method", "code", "fault"],
            registry=r,
        )
        self.ttfc = Histogram(
            "agent_stream_time_to_first_chunk_seconds",
            "Time from a request being taken up to the first event of its answer.",
            ["method", "model"],
            buckets=TTFC_BUCKETS,
            registry=r,
        )
        self.inter_chunk = Histogram(
            "agent_stream_inter_chunk_seconds",
            "Time between consecutive text chunks of an answer.",
            ["method", "model"],
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "agent_stream_duration_seconds",
            "Stream duration, by final status code and fault.",
            ["method", "code", "fault"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.events = Histogram(
            "agent_stream_events", "Events sent per stream.", ["method"], buckets=COUNT_BUCKETS, registry=r
        )
        self.text_chunks = Histogram(
            "agent_stream_text_chunks", "Text chunks sent per stream.", ["method"], buckets=COUNT_BUCKETS, registry=r
        )
        self.tokens = Counter(
            "agent_model_tokens", "Tokens as the model reports them, by type.", ["type", "model"], registry=r
        )
        self.tool_calls = Counter("agent_tool_calls", "Tool calls by outcome.", ["tool", "outcome"], registry=r)
        self.tool_duration = Histogram(
            "agent_tool_duration_seconds",
            "Time from a tool call to its result.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "agent_rejected_calls", "Calls or messages refused, by reason.", ["method", "reason"], registry=r
        )
        gauge = _SampledGauge if multiprocess else Gauge
        self.sessions_active: Gauge = gauge(
            "agent_sessions_active", "Session agents held in memory.", registry=r, multiprocess_mode="livesum"
        )
        # Per process in a group: the group's limit is each worker's, summed.
        self.streams_limit = Gauge(
            "agent_streams_limit",
            "Admission limit: streams served at once before RESOURCE_EXHAUSTED.",
            registry=r,
            multiprocess_mode="livesum",
        )
        build = {"version": version, "provider": provider, "model": model}
        if multiprocess:
            # What the Info below exports in text format, as a gauge the workers' files can carry.
            Gauge(
                "agent_build_info",
                "Build and model of this service.",
                list(build),
                registry=r,
                multiprocess_mode="max",
            ).labels(**build).set(1)
        else:
            Info("agent_build", "Build and model of this service.", registry=r).info(build)
            ProcessCollector(registry=r)
        self._per_method: dict[str, MethodMetrics] = {}

    def refresh(self) -> None:
        """Write the values only a callback knows (sessions held) where a supervisor reads them (multiprocess)."""
        if isinstance(self.sessions_active, _SampledGauge):
            self.sessions_active.sample()

    def for_method(self, method: str) -> MethodMetrics:
        """The children of one RPC method, bound once (labels cost microseconds; binding is free after)."""
        bound = self._per_method.get(method)
        if bound is None:
            bound = self._per_method[method] = MethodMetrics(
                metrics=self,
                method=method,
                in_flight=self.streams_in_flight.labels(method),
                ttfc=self.ttfc.labels(method, self.model),
                inter_chunk=self.inter_chunk.labels(method, self.model),
                events=self.events.labels(method),
                text_chunks=self.text_chunks.labels(method),
            )
            self.streams_started.labels(method)  # exported at 0 before the first call
        return bound

    def serve(self, host: str, port: int, serving: Callable[[], bool] | None = None) -> MetricsEndpoint:
        """Serve /metrics (text or OpenMetrics with exemplars, as negotiated) and /healthz: see `serve_http`."""
        return serve_http(self.registry, host, port, serving)


class _SampledGauge(Gauge):
    """A gauge whose `set_function` is sampled by `sample()` (multiprocess mode has no callback gauges)."""

    _function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        self._function = f

    def sample(self) -> None:
        if self._function is not None:
            self.set(self._function())


def serve_http(
    registry: CollectorRegistry, host: str, port: int, serving: Callable[[], bool] | None = None
) -> MetricsEndpoint:
    """Serve /metrics of `registry` and /healthz on a thread of its own.

    `/healthz` answers 200 `SERVING` while `serving()` is true, else 503 `NOT_SERVING`:
    a container health check that costs a socket, not a gRPC client's start-up.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = serving is None or serving()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    address = host.strip("[]") or "0.0.0.0"

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = make_server(address, port, app, Server, handler_class=_QuietHandler)
    # A short poll: closing the endpoint (a drain's last step) waits for the loop to notice, 0.5 s by default.
    thread = threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL_S,), name="metrics-http", daemon=True)
    thread.start()
    return MetricsEndpoint(server, thread)


def group_registry(multiproc_dir: str, pids: Callable[[], list[int]]) -> CollectorRegistry:
    """The registry a supervisor serves: every worker's metrics (files in `multiproc_dir`) and the group's process.

    Counters and histograms are summed over every worker that ever ran in this group
    (a restarted worker's counts are kept); gauges over the live ones.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    registry.register(GroupProcessCollector(pids))
    return registry


class GroupProcessCollector:
    """`process_*` of a group of processes as one: CPU, memory and open files summed, the first one's start time.

    The sum covers the processes alive at the scrape (`pids()`, the supervisor first),
    so CPU time resets when a worker is replaced, as a restarted process's would.
    """

    _SUMMED = frozenset(
        {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"}
    )

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Metric]:
        pids = self._pids()
        totals: dict[str, float] = {}
        first: dict[str, Metric] = {}
        for pid in pids:
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                first.setdefault(family.name, family)
                value = family.samples[0].value
                totals[family.name] = totals.get(family.name, 0.0) + value
        families: list[Metric] = []
        for name, family in first.items():
            value = totals[name] if name in self._SUMMED else family.samples[0].value
            if family.type == "counter":
                families.append(CounterMetricFamily(name, family.documentation, value=value))
            else:
                families.append(GaugeMetricFamily(name, family.documentation, value=value))
        return families


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or health check."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class MethodMetrics:
    metrics: Metrics
    method: str
    in_flight: Gauge
    ttfc: HistogramType
    inter_chunk: HistogramType
    events: HistogramType
    text_chunks: HistogramType


@dataclass(frozen=True)
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
