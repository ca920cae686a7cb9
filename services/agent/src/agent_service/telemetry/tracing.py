"""OpenTelemetry tracing, configured by the standard `OTEL_*` environment variables.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and neither `OTEL_SDK_DISABLED=true` nor
`OTEL_TRACES_EXPORTER=none` says otherwise. Off, nothing is installed: no
provider, no exporter, no server interceptor, so it costs nothing. The SDK reads
the rest itself: service name and resource attributes, sampler, headers.

strands traces to the *global* tracer provider, so the provider is installed
globally (a provider handed to StrandsTelemetry alone produced no spans).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from agent_service import __version__

STRANDS_SEMCONV_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
REDACT_ALL_TOKEN = "gen_ai_unredacted_attributes="
UNTRACED_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
UNTRACED_PREFIXES = tuple(f"/{name}/" for name in UNTRACED_SERVICES)


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the global tracer provider exporting over OTLP/gRPC (or to `exporter`)."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    defaults = {SERVICE_VERSION: __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        defaults[SERVICE_NAME] = "agent-service"
    provider = TracerProvider(resource=Resource.create(defaults))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def record_content(enabled: bool) -> None:
    """Prompts and answers on spans: off unless asked for.

    strands records message content on its spans unless the
    `gen_ai_unredacted_attributes=` opt-in token lists what may be shown; an empty
    list redacts everything. strands reads it when its tracer is created, so this
    runs before any agent exists.
    """
    current = [t for t in os.environ.get(STRANDS_SEMCONV_ENV, "").split(",") if t.strip()]
    if enabled or any(t.strip().startswith(REDACT_ALL_TOKEN) for t in current):
        return
    os.environ[STRANDS_SEMCONV_ENV] = ",".join([*current, REDACT_ALL_TOKEN])


def server_interceptor() -> grpc.aio.ServerInterceptor:
    """One server span per agent RPC (health checks and reflection are not traced)."""
    return aio_server_interceptor(filter_=traced_method)  # type: ignore[no-untyped-call]


def traced_method(details: grpc.HandlerCallDetails) -> bool:
    """Whether a call gets a span: one prefix test (the instrumentation's composed filters took tens of µs a call)."""
    return not details.method.startswith(UNTRACED_PREFIXES)
