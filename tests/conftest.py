"""Shared fixtures: a running demo server per test, on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_service.logs import configure_logging
from tests.support.servers import Running, make_settings, running_server


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    configure_logging("info", "json")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_server(make_settings(tmp_path)) as running:
        yield running
