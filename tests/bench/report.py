"""The run's results as Markdown tables (printed at the end) and one PNG chart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.bench.common import SAMPLED_RATIO
from tests.bench.config import HELD_DURATION_SLACK, HELD_TTFC_P99_MS

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any]]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return str(value)


def get(*path: str) -> Callable[[Row], Any]:
    def read(row: Row) -> Any:
        value: Any = row
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return read


def _cpu_util(row: Row) -> Any:
    server = row.get("server")
    if not isinstance(server, dict):
        return None
    return " + ".join(f"{name} {fmt(s['cpu_util'], 2)}" for name, s in server.items())


def _client_cores(row: Row) -> Any:
    wall, cpu = row.get("wall_s"), row.get("client_cpu_s")
    return round(cpu / wall, 2) if wall and cpu is not None else None


def _rss(key: str) -> Callable[[Row], Any]:
    def read(row: Row) -> Any:
        server = row.get("server")
        if not isinstance(server, dict):
            return None
        return " + ".join(fmt(s[key]) for s in server.values())

    return read


def table(rows: Sequence[Row], columns: Sequence[Column]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    skipped = []
    for row in rows:
        if "not_measured" in row:
            where = f" ({row['streams']} streams)" if "streams" in row else ""
            skipped.append(f"- {row['system']}{where}: {row['not_measured']}")
            continue
        lines.append("| " + " | ".join(fmt(read(row)) for _, read in columns) + " |")
    return [*lines, *(["", *skipped] if skipped else [])]


def _spread(*path: str) -> Callable[[Row], Any]:
    """The spread of a repeated figure, in % of its median ("–" for a single run)."""

    def read(row: Row) -> Any:
        found = get("repeats", ".".join(path), "spread_pct")(row)
        return None if found is None else f"±{found / 2:.0f}%"

    return read


THROUGHPUT: list[Column] = [
    ("system", get("system")),
    ("delay ms", get("token_delay_ms")),
    ("streams", get("streams")),
    ("words/s", get("words_per_s")),
    ("spread", _spread("words_per_s")),
    ("messages/s", get("messages_per_s")),
    ("words/message", get("words_per_message")),
    ("× baseline (words/s)", get("vs_baseline", "words_per_s_ratio")),
    ("server CPU µs/word", get("server_cpu_us_per_word")),
    ("× baseline", get("vs_baseline", "cpu_per_word_ratio")),
    ("server CPU µs/message", get("server_cpu_us_per_message")),
    ("server CPU (cores)", _cpu_util),
    ("client CPU (cores)", _client_cores),
    ("errors", get("errors")),
]
TTFC: list[Column] = [
    ("system", get("system")),
    ("calls", get("recorded")),
    ("TTFC p50 ms", get("ttfc_ms", "p50")),
    ("p95", get("ttfc_ms", "p95")),
    ("p99", get("ttfc_ms", "p99")),
    ("p99 spread", _spread("ttfc_ms", "p99")),
    ("added p50 ms", get("vs_baseline", "ttfc_p50_added_ms")),
    ("added p95", get("vs_baseline", "ttfc_p95_added_ms")),
    ("added p99", get("vs_baseline", "ttfc_p99_added_ms")),
    ("server CPU µs/call", get("server_cpu_us_per_call")),
    ("errors", get("errors")),
]
CAPACITY: list[Column] = [
    ("system", get("system")),
    ("streams", get("streams")),
    ("held", get("held")),
    ("TTFC p50 ms", get("ttfc_ms", "p50")),
    ("TTFC p99", get("ttfc_ms", "p99")),
    ("gap p50 ms", get("gap_ms", "p50")),
    ("gap p99", get("gap_ms", "p99")),
    ("duration p50 ms", get("duration_ms", "p50")),
    ("duration p99", get("duration_ms", "p99")),
    ("p99 × ideal", get("duration_vs_ideal_p99")),
    ("errors", get("errors")),
    ("server CPU (cores)", _cpu_util),
    ("server CPU µs/word", get("server_cpu_us_per_word")),
    ("client CPU (cores)", _client_cores),
    ("RSS peak MB", _rss("rss_peak_mb")),
    ("RSS/stream KB", _rss("rss_per_stream_kb")),
]
TELEMETRY: list[Column] = [
    ("telemetry", get("telemetry")),
    ("streams", get("streams")),
    ("words/s", get("words_per_s")),
    ("spread", _spread("words_per_s")),
    ("words/message", get("words_per_message")),
    ("× off (words/s)", get("vs_off", "words_per_s_ratio")),
    ("server CPU µs/word", get("server_cpu_us_per_word")),
    ("added µs/word", get("vs_off", "cpu_us_per_word_added")),
    ("× off (CPU/word)", get("vs_off", "cpu_per_word_ratio")),
]
SEED: list[Column] = [
    ("system", get("system")),
    ("streams", get("streams")),
    ("TTFC p50 ms", get("ttfc_ms", "p50")),
    ("TTFC p99", get("ttfc_ms", "p99")),
    ("TTFC max", get("ttfc_ms", "max")),
    ("duration p50 ms", get("duration_ms", "p50")),
    ("duration max", get("duration_ms", "max")),
    ("waited > ½ stream", get("streams_waiting_over_half_a_stream")),
    ("wall s", get("wall_s")),
    ("errors", get("errors")),
]
LOOP: list[Column] = [
    ("system", get("system")),
    ("words/s", get("words_per_s")),
    ("words/message", get("words_per_message")),
    ("× asyncio", get("vs_asyncio", "words_per_s_ratio")),
    ("server CPU µs/word", get("server_cpu_us_per_word")),
    ("× asyncio", get("vs_asyncio", "cpu_per_word_ratio")),
]
COALESCE: list[Column] = [
    ("words/message", get("words_per_message")),
    ("messages/s", get("messages_per_s")),
    ("words/s", get("words_per_s")),
    ("× 1 word/message", get("words_per_s_ratio")),
    ("server CPU µs/word", get("server_cpu_us_per_word")),
    ("server CPU µs/message", get("server_cpu_us_per_message")),
]
_SCENARIO_COLUMNS = {"1": THROUGHPUT, "2": TTFC, "3": CAPACITY, "4": TELEMETRY, "5": SEED}


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark {meta['started']}{' (quick)' if meta['quick'] else ''}",
        "",
        f"Commit {meta['commit']}; {meta['cpus']} CPUs; load average before {meta['load_before']}; "
        f"{meta['client_workers']} client processes; stack telemetry {meta['telemetry']}"
        + (f"; target {meta['target']}" if meta.get("target") else "")
        + ".",
        "",
    ]
    if goals := targets(results["scenarios"]):
        lines += ["## Targets (issue 13)", "", "| target | measured | ratio to baseline | |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goals]
        lines.append("")
    if summary := headline(results["scenarios"]):
        lines += ["## Summary", "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary), ""]
    for number, scenario in results["scenarios"].items():
        lines += [f"## {number}. {scenario.get('title', '')}", ""]
        if params := scenario.get("params"):
            lines += ["Parameters: " + "; ".join(f"{k} {fmt(v)}" for k, v in params.items()) + ".", ""]
        if reason := scenario.get("reason"):
            lines += [reason, ""]
            continue
        if number in _SCENARIO_COLUMNS:
            lines += [*table(scenario["rows"], _SCENARIO_COLUMNS[number]), ""]
        if number == "3" and (held := scenario.get("highest_level_held")):
            lines += ["Highest level held: " + ", ".join(f"{k} {fmt(v)}" for k, v in held.items()) + ".", ""]
            if scaling := scenario.get("scaling"):
                lines += ["Scaling: " + ", ".join(f"{k} ×{v}" for k, v in scaling.items()) + ".", ""]
        if number == "3" and (memory := scenario.get("memory")):
            lines += ["RSS per open stream: " + "; ".join(f"{k}: {fmt(v)}" for k, v in memory.items()) + ".", ""]
        if number == "4" and (effective := scenario.get("effective")):
            lines += ["Effective: " + "; ".join(f"{mode}: {fmt(v)}" for mode, v in effective.items()) + ".", ""]
        if number == "6":
            lines += _levers(scenario)
        lines += [f"- {note}" for note in scenario.get("notes", [])]
        if scenario.get("notes"):
            lines.append("")
    return "\n".join(lines)


def _find(scenario: dict[str, Any] | None, system: str, **match: Any) -> Row | None:
    for row in (scenario or {}).get("rows", []):
        if row.get("system") == system and "not_measured" not in row and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _times(row: Row | None, *path: str) -> str:
    value = get(*path)(row) if row else None
    return f" (×{value})" if value is not None else ""


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def headline(scenarios: dict[str, Any]) -> list[tuple[str, str]]:
    """The few figures worth quoting, each beside the raw baseline."""
    found: list[tuple[str, str]] = []
    throughput = scenarios.get("1")
    loads = dict.fromkeys(
        (r.get("token_delay_ms"), r.get("streams")) for r in _measured(scenarios, "1") if "vs_baseline" in r
    )
    for delay, streams in loads:
        cells = []
        for system in ("direct", "target", "envoy", "direct, coalescing off", "envoy, coalescing off"):
            if row := _find(throughput, system, streams=streams, token_delay_ms=delay):
                cells.append(
                    f"{system} {fmt(row['words_per_s'], 0)} words/s at {fmt(row.get('words_per_message'), 1)} "
                    f"words/message{_times(row, 'vs_baseline', 'words_per_s_ratio')}"
                )
        if cells:
            found.append((f"1. {streams} stream(s), {fmt(delay, 0)} ms/token (× baseline at equal words/message)",
                          " · ".join(cells)))  # fmt: skip
    ttfc = scenarios.get("2")
    cells = [
        f"{system} {_signed(get('vs_baseline', 'ttfc_p50_added_ms')(row))} / "
        f"{_signed(get('vs_baseline', 'ttfc_p99_added_ms')(row))}"
        for system in ("direct", "target", "envoy")
        if (row := _find(ttfc, system))
    ]
    if cells and (base := _find(ttfc, "baseline")):
        cells.insert(0, f"baseline {fmt(base['ttfc_ms']['p50'], 2)} / {fmt(base['ttfc_ms']['p99'], 2)}")
        found.append(("2. time to first chunk p50 / p99 ms (added by the stack)", " · ".join(cells)))
    if held := (scenarios.get("3") or {}).get("highest_level_held"):
        levels = "/".join(str(r["streams"]) for r in scenarios["3"]["rows"] if r.get("system") == "baseline")
        text = " · ".join(f"{k} {fmt(v) if v else 'none'}" for k, v in held.items())
        if scaling := scenarios["3"].get("scaling"):
            text += " (scaling: " + ", ".join(f"{k} ×{v}" for k, v in scaling.items()) + ")"
        found.append((f"3. slow streams held (of {levels})", text))
    for row in (scenarios.get("4") or {}).get("rows", []):
        if row.get("vs_off"):
            found.append(
                (
                    f"4. telemetry {row['telemetry']} at {row['streams']} stream(s)",
                    f"{_signed(row['vs_off']['cpu_us_per_word_added'])} µs CPU/word "
                    f"(×{row['vs_off']['cpu_per_word_ratio']}), words/s ×{row['vs_off']['words_per_s_ratio']}",
                )
            )
    seed = scenarios.get("5")
    cells = [
        f"{system} {fmt(row['ttfc_ms']['p99'], 0)} ms ({row.get('streams_waiting_over_half_a_stream')} waited)"
        for system in ("baseline", "seed", "direct", "target")
        if (row := _find(seed, system))
    ]
    if cells:
        streams = seed["params"]["concurrent_streams"] if seed else "?"
        found.append(
            (f"5. TTFC p99, {streams} slow streams at once (streams that waited > ½ stream)", " · ".join(cells))
        )
    found += _lever_headline(scenarios.get("6") or {})
    return found


def targets(scenarios: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Issue 13's targets, each from this run: (target, measured, ratio to the baseline, met?)."""
    found: list[tuple[str, str, str, str]] = []
    ttfc = scenarios.get("2")
    for system, limit in (("direct", 3.0), ("envoy", 5.0)):
        if (row := _find(ttfc, system)) and (base := _find(ttfc, "baseline")):
            added = get("vs_baseline", "ttfc_p99_added_ms")(row)
            found.append(
                (
                    f"added TTFC p99 ≤ {limit:g} ms, {system}",
                    f"{fmt(row['ttfc_ms']['p99'], 2)} ms vs baseline {fmt(base['ttfc_ms']['p99'], 2)} ms: "
                    f"+{fmt(added, 2)} ms (p50 +{fmt(get('vs_baseline', 'ttfc_p50_added_ms')(row), 2)})",
                    f"×{ratio_of(row['ttfc_ms']['p99'], base['ttfc_ms']['p99'])}",
                    _met(added is not None and added <= limit),
                )
            )
    capacity = scenarios.get("3") or {}
    if held := capacity.get("highest_level_held"):
        base, mine = held.get("baseline"), held.get("direct")
        found.append(
            (
                "slow streams held per process ≥ the baseline's",
                f"direct {fmt(mine) if mine else 'none'} vs baseline {fmt(base) if base else 'none'}",
                f"×{ratio_of(mine or 0, base)}" if base else "–",
                _met(bool(base) and (mine or 0) >= base),
            )
        )
        for key, value in (capacity.get("scaling") or {}).items():
            if key.startswith("service"):
                workers = key.split()[1]
                found.append(
                    (
                        f"{workers} workers hold ≥ 0.8 × {workers} × one worker's level",
                        f"{fmt(held.get(f'direct ({workers} workers)'))} vs {workers} × {fmt(held.get('direct'))}",
                        f"×{value}",
                        _met(value >= 0.8),
                    )
                )
    if row := _find(scenarios.get("1"), "envoy", streams=50, token_delay_ms=0.0):
        value = get("vs_baseline", "words_per_s_ratio")(row)
        found.append(
            (
                "words/s through Envoy at 50 streams ≥ 0.7 × the baseline at equal words/message",
                f"{fmt(row['words_per_s'], 0)} words/s at {fmt(row.get('words_per_message'), 1)} words/message",
                f"×{value}",
                _met(value is not None and value >= 0.7),
            )
        )
    for row in (scenarios.get("4") or {}).get("rows", []):
        if row.get("telemetry") in ("on", "sampled") and row.get("vs_off"):
            value = row["vs_off"]["words_per_s_ratio"]
            what = "on" if row["telemetry"] == "on" else f"on, 1 trace in {round(1 / SAMPLED_RATIO)}"
            found.append(
                (
                    f"telemetry {what} costs ≤ 10% (median of repeats), {row['streams']} stream(s)",
                    f"words/s ×{value} of off; {_signed(row['vs_off']['cpu_us_per_word_added'])} µs CPU/word",
                    f"×{value}",
                    _met(value is not None and value >= 0.9),
                )
            )
    memory = (scenarios.get("3") or {}).get("memory") or {}
    if (kb := memory.get("direct kb_per_stream")) is not None:
        base_kb = memory.get("baseline kb_per_stream")
        found.append(
            (
                "≤ 50 KB RSS per open stream at 100 streams",
                f"{fmt(kb)} KB (baseline {fmt(base_kb)} KB): the slope between {memory['streams']}",
                f"×{ratio_of(kb, base_kb)}" if base_kb else "–",
                _met(kb <= 50),
            )
        )
    return found


def ratio_of(value: float | None, baseline: float | None) -> str:
    return "–" if value is None or not baseline else f"{value / baseline:.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _lever_headline(levers: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if (strands := levers.get("strands")) and "agent_us_per_token" in strands:
        found.append(
            (
                "6. strands Agent per token, in-process",
                f"{fmt(strands['agent_us_per_token'], 2)} µs (model alone {fmt(strands['model_only_us_per_token'], 2)}"
                f" µs); {fmt(strands['agent_fixed_ms_per_call'], 2)} ms per call; with tracing "
                f"{_signed(strands.get('tracing_us_per_token'))} µs/token, "
                f"{fmt(strands.get('agent_traced_fixed_ms_per_call'), 2)} ms per call",
            )
        )
    for row in (levers.get("coalescing") or {}).get("rows", [])[1:]:
        found.append(
            (
                f"6. {row['words_per_message_asked']} words/message (raw server)",
                f"words/s ×{row.get('words_per_s_ratio')}, {fmt(row.get('server_cpu_us_per_word'))} µs CPU/word",
            )
        )
    for row in (levers.get("uvloop") or {}).get("rows", []):
        if row.get("vs_asyncio"):
            found.append(
                (
                    f"6. uvloop, {row['system'].split(',')[0]}",
                    f"words/s ×{row['vs_asyncio']['words_per_s_ratio']}, "
                    f"CPU/word ×{row['vs_asyncio']['cpu_per_word_ratio']}",
                )
            )
    if (prometheus := levers.get("prometheus")) and "per_chunk_us_estimate" in prometheus:
        found.append(("6. one Prometheus histogram observation per chunk", f"{prometheus['per_chunk_us_estimate']} µs"))
    return found


def _levers(scenario: dict[str, Any]) -> list[str]:
    strands, prometheus = scenario.get("strands", {}), scenario.get("prometheus", {})
    lines = ["Strands' own per-token cost (" + strands.get("method", "") + "):", ""]
    lines += [f"- {k}: {fmt(v, 2)}" for k, v in strands.items() if k != "method"]
    lines += ["", f"Words per message ({scenario['coalescing'].get('streams')} streams, raw baseline server):", ""]
    lines += table(scenario["coalescing"]["rows"], COALESCE)
    lines += ["", f"uvloop ({scenario['uvloop'].get('streams')} streams, zero delay):", ""]
    lines += table(scenario["uvloop"]["rows"], LOOP)
    lines += ["", "Prometheus per chunk (" + prometheus.get("method", prometheus.get("reason", "")) + "):", ""]
    lines += [f"- {k}: {fmt(v, 3)}" for k, v in prometheus.items() if k not in ("method", "reason")]
    return [*lines, ""]


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """One PNG with a panel per measured scenario; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = results["scenarios"]
    figure, axes = plt.subplots(2, 3, figsize=(18, 11))
    zero_delay = [r for r in _measured(scenarios, "1") if not r.get("token_delay_ms")]
    _bars(axes[0][0], zero_delay, "words_per_s", "1. throughput at zero delay (words/s; words/message on top)")
    _bars(axes[0][1], zero_delay, "server_cpu_us_per_word", "1. server CPU µs per word at zero delay")
    _ttfc(axes[0][2], _measured(scenarios, "2"), "2. time to first chunk (ms)")
    ideal_ms = (scenarios.get("3") or {}).get("params", {}).get("ideal_stream_ms")
    limit = ideal_ms * (1 + HELD_DURATION_SLACK) if ideal_ms else None
    rows = _measured(scenarios, "3")
    _capacity(axes[1][0], rows, ("ttfc_ms", "p99"), "3. TTFC p99 (ms) vs streams", HELD_TTFC_P99_MS)
    _capacity(axes[1][1], rows, ("duration_ms", "p99"), "3. duration p99 (ms) vs streams", limit)
    _ttfc(axes[1][2], _measured(scenarios, "5"), "5. seed design: TTFC (ms)", log=True)
    meta = results["meta"]
    figure.suptitle(
        f"agent-grpc-stack benchmark {meta['started']} ({meta['commit']}){' quick' if meta['quick'] else ''}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _measured(scenarios: dict[str, Any], number: str) -> list[Row]:
    return [r for r in scenarios.get(number, {}).get("rows", []) if "not_measured" not in r]


def _empty(axis: Any, title: str) -> None:
    axis.set_title(title)
    axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)


def _bars(axis: Any, rows: list[Row], key: str, title: str) -> None:
    if not rows:
        return _empty(axis, title)
    labels = [f"{r['system'].replace(', ', chr(10))}\n{r['streams']} streams" for r in rows]
    bars = axis.bar(range(len(rows)), [r.get(key) or 0 for r in rows], color=[_colour(r["system"]) for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        if row.get("words_per_message") is not None:
            axis.annotate(f"{row['words_per_message']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7)  # fmt: skip
    axis.set_xticks(range(len(rows)), labels, rotation=90)
    axis.set_title(title)
    axis.tick_params(axis="x", labelsize=7)
    return None


def _ttfc(axis: Any, rows: list[Row], title: str, log: bool = False) -> None:
    if not rows:
        return _empty(axis, title)
    width = 0.8 / 3
    for offset, q in enumerate(("p50", "p95" if not log else "p99", "p99" if not log else "max")):
        xs = [i + offset * width for i in range(len(rows))]
        axis.bar(xs, [r["ttfc_ms"].get(q) or 0 for r in rows], width, label=q)
    axis.set_xticks([i + width for i in range(len(rows))], [r["system"] for r in rows])
    if log:
        axis.set_yscale("log")
    axis.legend()
    axis.set_title(title)
    return None


def _capacity(axis: Any, rows: list[Row], key: tuple[str, str], title: str, limit: float | None) -> None:
    if not rows:
        return _empty(axis, title)
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        axis.plot([r["streams"] for r in mine], [r[key[0]].get(key[1]) for r in mine], "o-", label=system)
    if limit is not None:
        axis.axhline(limit, color="tab:red", linestyle="--", label=f"held below {limit:g} ms")
    axis.set_xscale("log")
    axis.set_yscale("log")
    levels = sorted({r["streams"] for r in rows})
    axis.set_xticks(levels, [str(level) for level in levels])
    axis.tick_params(axis="x", which="minor", labelbottom=False)
    axis.legend()
    axis.set_title(title)
    return None


def _colour(system: str) -> str:
    if system.startswith("baseline"):
        return "tab:grey" if "1 word" in system else "silver"
    if "coalescing off" in system:
        return "lightsteelblue" if system.startswith("direct") else "navajowhite"
    return {"direct": "tab:blue", "target": "tab:blue", "envoy": "tab:orange"}.get(system, "tab:green")
