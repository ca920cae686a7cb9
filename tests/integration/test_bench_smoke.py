"""`make bench` runs: the harness with --quick as a process, its outputs parse and every scenario answers.

No timing is asserted: the machine running the tests is shared and its numbers mean nothing here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {
    "system",
    "streams",
    "words_per_s",
    "messages_per_s",
    "words_per_message",
    "ttfc_ms",
    "duration_ms",
    "errors",
    "server",
}


def _measured(rows: list[dict]) -> list[dict]:
    for row in rows:
        assert "system" in row
        if "not_measured" in row:
            assert row["not_measured"].startswith(("not measured", "skipped")), row
    return [row for row in rows if "not_measured" not in row]


@pytest.mark.timeout(300)
def test_quick_run_writes_results_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "tests.bench", "--quick", "--workers", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=270)
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["quick"] is True
    scenarios = results["scenarios"]
    assert set(scenarios) == {"1", "2", "3", "4", "5", "6"}
    for number, scenario in scenarios.items():
        assert "title" in scenario
        assert "reason" not in scenario or not scenario["reason"].startswith("failed"), (number, scenario["reason"])
        if number == "6":
            assert set(scenario) >= {"strands", "coalescing", "uvloop", "prometheus"}
            assert scenario["strands"]["agent_tokens_per_s"] > 0
            for lever in ("coalescing", "uvloop"):
                assert _measured(scenario[lever]["rows"])
            continue
        measured = _measured(scenario["rows"])
        assert measured, number
        for row in measured:
            assert set(row) >= ROW_KEYS, (number, row)
            if number in ("1", "2", "4"):  # no limit of the stack may refuse the load it measures
                assert row["errors"] == {}, (number, row["system"], row["errors"])
        systems = {row["system"] for row in measured}
        assert any(system.startswith("baseline") for system in systems) or number == "4"
        assert "direct" in systems or number == "4"
    throughput = {row["system"]: row for row in _measured(scenarios["1"]["rows"])}
    assert set(throughput) >= {
        "baseline, 1 word/message",
        "baseline, direct's words/message",
        "direct",
        "direct, coalescing off",
    }
    # Each service row is compared with the baseline at its own words per message.
    direct = throughput["direct"]
    assert direct["vs_baseline"]["baseline"] == "baseline, direct's words/message"
    matched = throughput["baseline, direct's words/message"]["words_per_message"]
    assert abs(matched - direct["words_per_message"]) <= 0.25 * direct["words_per_message"]
    assert throughput["direct, coalescing off"]["words_per_message"] == 1.0
    assert throughput["direct, coalescing off"]["vs_baseline"]["baseline"] == "baseline, 1 word/message"
    assert "seed" in {row["system"] for row in scenarios["5"]["rows"]}
    assert all("held" in row for row in _measured(scenarios["3"]["rows"]))
    held = scenarios["3"]["highest_level_held"]
    assert set(held) == {"baseline", "direct", "baseline (2 processes)", "direct (2 workers)", "envoy (2 replicas)"}
    two = [row for row in _measured(scenarios["3"]["rows"]) if row["system"] == "direct (2 workers)"]
    assert two and all(row["vs_baseline"] for row in two)  # beside the baseline of two processes
    assert all(set(row["server"]) == {"service-w2"} for row in two)  # the group measured as one server
    replicas = [row for row in _measured(scenarios["3"]["rows"]) if row["system"] == "envoy (2 replicas)"]
    assert replicas and all(row["vs_baseline"] for row in replicas)
    assert all(len(row["server"]) == 3 for row in replicas)  # two service processes and Envoy, each measured
    assert {row["telemetry"] for row in scenarios["4"]["rows"]} == {"on", "off"}
    assert set(scenarios["4"]["effective"]) == {"on", "off"}

    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Benchmark")
    assert "## Targets (issue 13)" in markdown
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert "| system |" in done.stdout  # the table is printed at the end
