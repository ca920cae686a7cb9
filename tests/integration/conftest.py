"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import redis_server


@pytest.fixture(params=["files", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """AGENT_SESSION_STORE for each backend (the files store uses the servers' shared AGENT_DATA_DIR)."""
    if request.param == "files":
        yield "files"
        return
    with redis_server(tmp_path / "redis") as server:
        yield server.url
