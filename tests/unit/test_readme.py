"""The README documents every setting and starts with the two commands."""

from __future__ import annotations

from pathlib import Path

from agent_service.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [f"AGENT_{name.upper()}" for name in Settings.model_fields if f"| `AGENT_{name.upper()}` |" not in README]
    assert missing == []


def test_readme_starts_with_the_two_commands() -> None:
    head = README[:800]
    assert "make run" in head and "make test" in head
