"""A tiny OTLP/gRPC receiver, so the telemetry-on measurement includes exporting the spans.

It accepts the collector's Export calls (traces, metrics, logs), counts requests, bytes and,
when `opentelemetry-proto` is importable, spans; it answers with an empty response (the
serialized form of an empty Export*ServiceResponse is zero bytes). Loopback only.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures
from typing import Any

import grpc

_SERVICES = {
    "traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}


def _count_spans(payload: bytes) -> int | None:
    try:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError:
        return None
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(payload)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class OtlpSink:
    """Start with `with OtlpSink() as sink:`; `sink.endpoint` is the OTLP endpoint to export to."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.spans = 0
        self.spans_counted = True
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        handlers = [
            grpc.method_handlers_generic_handler(
                service, {"Export": grpc.unary_unary_rpc_method_handler(self._handler(kind))}
            )
            for kind, service in _SERVICES.items()
        ]
        self._server.add_generic_rpc_handlers(handlers)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler(self, kind: str) -> Any:
        def export(payload: bytes, context: grpc.ServicerContext) -> bytes:
            spans = _count_spans(payload) if kind == "traces" else 0
            with self._lock:
                self.requests[kind] += 1
                self.bytes[kind] += len(payload)
                if spans is None:
                    self.spans_counted = False
                else:
                    self.spans += spans
            return b""

        return export

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "export_requests": dict(self.requests),
                "export_bytes": dict(self.bytes),
                "spans": self.spans if self.spans_counted else None,
            }

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.stop(0.5).wait()
