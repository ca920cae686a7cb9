"""Shared fixtures: a running demo server per test, on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_service.logs import configure_logging
from agent_service.telemetry import tracing
from tests.support.servers import Running, make_settings, running_server


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    configure_logging("info", "json")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_server(make_settings(tmp_path)) as running:
        yield running


@pytest.fixture(autouse=True, scope="session")
def _redact_span_content() -> None:
    """As `agent-service` does at start-up, before strands creates its tracer."""
    tracing.record_content(False)


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """A global tracer provider exporting to memory (installable once per process, as strands needs)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter
