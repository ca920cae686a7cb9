"""Shared fixtures (a running demo server per test, on an ephemeral loopback port) and the
tiers: every test is marked by where it lives, so `-m` selects a tier and nobody forgets a mark."""

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

TESTS = Path(__file__).resolve().parent
# tests/<directory>/... -> its tier marker (registered in .pytest.ini).
TIERS = {"unit": "unit", "integration": "integration", "system": "system", "config": "config", "bench": "bench"}
# A test using this fixture runs the real local model, which `make model` builds.
MODEL_FIXTURE = "llama_server"


def tier_markers(path: Path, fixturenames: list[str]) -> set[str]:
    """The markers a test at `path` (using `fixturenames`) gets from where it lives and what it needs."""
    parts = path.resolve().relative_to(TESTS).parts
    markers = {TIERS[parts[0]]} if len(parts) > 1 and parts[0] in TIERS else set()
    if path.name.startswith("test_bench"):
        markers.add("bench")
    if MODEL_FIXTURE in fixturenames:
        markers.add("slow")
    return markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(tier_markers(item.path, list(getattr(item, "fixturenames", ())))):
            item.add_marker(name)


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
