"""Tests are marked by where they live (tests/conftest.py), so `make test-fast` selects by tier."""

from __future__ import annotations

import pytest

from tests.conftest import TESTS, TIERS, tier_markers


@pytest.mark.parametrize(
    ("relative", "fixtures", "expected"),
    [
        ("unit/test_tools.py", [], {"unit"}),
        ("integration/test_streaming.py", ["served"], {"integration"}),
        ("integration/test_local_model.py", ["llama_server", "tmp_path"], {"integration", "slow"}),
        ("integration/test_bench_smoke.py", ["tmp_path"], {"integration", "bench"}),
        ("system/test_envoy_grpc.py", ["door"], {"system"}),
        ("config/test_compose.py", [], {"config"}),
        ("test_at_the_top.py", [], set()),
    ],
)
def test_the_tier_follows_the_directory_and_the_model_fixture(
    relative: str, fixtures: list[str], expected: set[str]
) -> None:
    assert tier_markers(TESTS / relative, fixtures) == expected


def test_every_collected_test_carries_the_marker_of_its_directory(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert items
    for item in items:
        directory = item.path.resolve().relative_to(TESTS).parts[0]
        marked = {marker.name for marker in item.iter_markers()} & set(TIERS.values())
        assert TIERS[directory] in marked, item.nodeid
