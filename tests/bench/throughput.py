"""Scenario 1 (throughput, compared at equal words per message) and scenario 4 (telemetry on vs off).

The service coalesces the words waiting behind a slow stream into one message
(AGENT_COALESCE_TEXT), so at zero token delay it sends a 200-word answer in a few
messages where a baseline sending one word per message sends 200: comparing their
words/s compares a per-call cost with a per-message cost. Every service row is
therefore compared with the raw baseline sending the same words per message (the
service's own average in that run, fractional if need be), the service with
coalescing off is compared with the baseline at one word per message, and a second
token delay (1 ms by default) shows the per-token cost where coalescing has nothing
to merge. Each figure is measured `repeats` times, interleaved, and reported as the
median with its spread.
"""

from __future__ import annotations

from typing import Any

from tests.bench.common import Context, Row, Stack, combine, compare, measure, not_measured, stack
from tests.bench.load import LoadSpec
from tests.bench.stats import median, ratio, spread

BASELINE_1 = "baseline, 1 word/message"


def _spec(ctx: Context, target: str, users: int, metadata: dict[str, str] | None = None) -> LoadSpec:
    duration = ctx.sizes.throughput_duration_s
    return LoadSpec(
        target,
        users=users,
        streams_per_user=100_000,  # bounded by duration_s and time_cap_s
        duration_s=duration,
        time_cap_s=duration * 3 + 10,
        call_timeout_s=60,
        metadata=tuple(sorted((metadata or {}).items())),
    )


def _workers(ctx: Context, users: int) -> int:
    return 1 if users == 1 else ctx.pool.workers


def _shape(words: int, delay_ms: float, per_message: float) -> dict[str, str]:
    """The raw baseline's answer shape for one phase (request metadata, see `servers`)."""
    return {"words": str(words), "delay_ms": f"{delay_ms:g}", "words_per_message": f"{per_message:.3f}"}


def plan_throughput(ctx: Context) -> None:
    """Launch scenario 1's servers (see `Context`)."""
    sizes = ctx.sizes
    for delay in sizes.throughput_delays_ms:
        stack(ctx, words=sizes.throughput_words, delay_ms=delay, wait=False)
        if delay == 0 and sizes.throughput_uncoalesced:
            stack(ctx, words=sizes.throughput_words, delay_ms=delay, coalesce=False, wait=False)
    ctx.raw(words=sizes.throughput_words, delay_ms=0, wait=False)


def throughput(ctx: Context) -> dict[str, Any]:
    """Words/s, messages/s and server CPU per word: the service (direct, through Envoy) beside the raw
    baseline at the same words per message; the service with coalescing off beside one word per message."""
    sizes = ctx.sizes
    runs: dict[tuple[float, int, str], list[Row]] = {}
    stacks: dict[float, tuple[Stack, Stack | None]] = {}
    for delay in sizes.throughput_delays_ms:
        deployed = stack(ctx, words=sizes.throughput_words, delay_ms=delay, with_envoy=True)
        plain = None
        if delay == 0 and sizes.throughput_uncoalesced and not ctx.target:
            plain = stack(ctx, words=sizes.throughput_words, delay_ms=delay, with_envoy=True, coalesce=False)
        stacks[delay] = (deployed, plain)
    raw = ctx.raw(words=sizes.throughput_words, delay_ms=0)
    for _ in range(sizes.repeats):
        for delay, (deployed, plain) in stacks.items():
            for users in sizes.throughput_levels:
                for system, row in _round(ctx, delay, users, deployed, plain, raw):
                    runs.setdefault((delay, users, system), []).append(row)
    rows = [combine(found) for found in runs.values()]
    _compare_all(rows)
    rows.sort(key=lambda r: (r.get("token_delay_ms", 0), r["streams"], _ORDER.get(r["system"], 9)))
    deployed = stacks[sizes.throughput_delays_ms[0]][0]
    return {
        "title": "Throughput: words/s at equal words per message",
        "params": {
            "words_per_answer": sizes.throughput_words,
            "token_delays_ms": "/".join(f"{d:g}" for d in sizes.throughput_delays_ms),
            "duration_s": sizes.throughput_duration_s,
            "repeats": f"{sizes.repeats} (median; spread in results.json)",
        },
        "stack_telemetry": deployed.telemetry,
        "rows": rows,
        "notes": [
            "words/message is the service's own average (coalescing merges the words waiting behind a stream); "
            "each service row is compared with the raw baseline sending that many words per message",
            "coalescing off: the service sends one word per message, compared with the baseline at one word "
            "per message",
        ],
    }


_ORDER = {
    BASELINE_1: 0,
    "baseline, direct's words/message": 1,
    "direct": 2,
    "baseline, envoy's words/message": 3,
    "envoy": 4,
    "direct, coalescing off": 5,
    "envoy, coalescing off": 6,
}


def _round(
    ctx: Context, delay: float, users: int, deployed: Stack, plain: Stack | None, raw: Any
) -> list[tuple[str, Row]]:
    """One measurement of every system at one load: the service first, then the baselines it sets."""
    words = ctx.sizes.throughput_words
    found: list[tuple[str, Row]] = []

    def phase(system: str, target: str, servers: list[Any], metadata: dict[str, str] | None = None) -> Row:
        row = measure(ctx, system, _spec(ctx, target, users, metadata), servers, _workers(ctx, users))
        row["token_delay_ms"] = delay
        found.append((system, row))
        return row

    direct = phase(deployed.label, deployed.direct, deployed.processes())
    paths = [("direct", direct)]
    if deployed.envoy is not None:
        paths.append(("envoy", phase("envoy", deployed.envoy, deployed.processes(through_envoy=True))))
    elif delay == ctx.sizes.throughput_delays_ms[0]:
        found.append(("envoy", not_measured("envoy", deployed.envoy_reason or "not measured", streams=users)))
    for path, row in paths:
        per_message = row.get("words_per_message") or 1.0
        phase(f"baseline, {path}'s words/message", raw.address, [raw], _shape(words, delay, per_message))
    if plain is not None:
        phase(BASELINE_1, raw.address, [raw], _shape(words, delay, 1.0))
        phase("direct, coalescing off", plain.direct, plain.processes())
        if plain.envoy is not None:
            phase("envoy, coalescing off", plain.envoy, plain.processes(through_envoy=True))
    return found


def _compare_all(rows: list[Row]) -> None:
    """Each service row beside its baseline of the same delay and streams: the same words per message."""
    index = {(r.get("token_delay_ms"), r["streams"], r["system"]): r for r in rows if "not_measured" not in r}
    pairs = {
        "direct": "baseline, direct's words/message",
        "envoy": "baseline, envoy's words/message",
        "direct, coalescing off": BASELINE_1,
        "envoy, coalescing off": BASELINE_1,
    }
    for (delay, streams, system), row in index.items():
        if system in pairs:
            compare(row, index.get((delay, streams, pairs[system])))


def plan_telemetry_cost(ctx: Context) -> None:
    if not ctx.target:
        for mode in ctx.sizes.telemetry_modes:
            stack(ctx, words=ctx.sizes.throughput_words, delay_ms=0, telemetry=mode, wait=False)


def telemetry_cost(ctx: Context) -> dict[str, Any]:
    """Scenario 1's load on the service with telemetry off, metrics only, traces only (exported to the OTLP
    sink) and both, repeated and interleaved; every figure beside the "off" one of the same repeat."""
    sizes = ctx.sizes
    result: dict[str, Any] = {
        "title": "Telemetry cost: tracing and metrics on vs off",
        "params": {
            "words_per_answer": sizes.throughput_words,
            "duration_s": sizes.throughput_duration_s,
            "modes": ", ".join(sizes.telemetry_modes),
            "repeats": f"{sizes.repeats} (interleaved; ratios are the median of each repeat's ratio to off)",
        },
    }
    if ctx.target:
        result["reason"] = "not measured: --target given (needs to start the service with telemetry on and off)"
        return result
    if ctx.sink is None:
        raise RuntimeError("the OTLP sink is not running")
    spans_before = ctx.sink.snapshot()["spans"]
    words = sizes.throughput_words
    stacks = {mode: stack(ctx, words=words, delay_ms=0, telemetry=mode) for mode in sizes.telemetry_modes}
    runs: dict[tuple[str, int], list[Row]] = {}
    for _ in range(sizes.repeats):
        for users in sizes.throughput_levels:
            for mode, st in stacks.items():
                spec = _spec(ctx, st.direct, users)
                row = measure(ctx, f"telemetry {mode}", spec, st.processes(), _workers(ctx, users))
                row["telemetry"] = mode
                runs.setdefault((mode, users), []).append(row)
    rows = []
    for (mode, users), found in runs.items():
        row = combine(found)
        off = runs.get(("off", users))
        if mode != "off" and off:
            row["vs_off"] = _paired(found, off)
        rows.append(row)
    rows.sort(key=lambda r: (r["streams"], sizes.telemetry_modes.index(r["telemetry"])))
    spans_after = ctx.sink.snapshot()["spans"]
    result["effective"] = {mode: {"metrics_endpoint": st.telemetry["metrics_endpoint"]} for mode, st in stacks.items()}
    result["spans_exported"] = None if spans_before is None or spans_after is None else spans_after - spans_before
    result["sink"] = ctx.sink.snapshot()
    result["rows"] = rows
    return result


def _paired(runs: list[Row], off: list[Row]) -> Row:
    """Each repeat's ratio to the "off" run of the same repeat (measured moments apart), as medians."""
    words = [ratio(r["words_per_s"], o["words_per_s"], 4) for r, o in zip(runs, off, strict=False)]
    cpu = [ratio(r["server_cpu_us_per_word"], o["server_cpu_us_per_word"], 4) for r, o in zip(runs, off, strict=False)]
    added = [
        r["server_cpu_us_per_word"] - o["server_cpu_us_per_word"]
        for r, o in zip(runs, off, strict=False)
        if r.get("server_cpu_us_per_word") is not None and o.get("server_cpu_us_per_word") is not None
    ]
    words_ok = [w for w in words if w is not None]
    cpu_ok = [c for c in cpu if c is not None]
    return {
        "words_per_s_ratio": _round2(median(words_ok)),
        "cpu_per_word_ratio": _round2(median(cpu_ok)),
        "cpu_us_per_word_added": None if not added else round(median(added) or 0.0, 1),
        "words_per_s_ratio_spread": spread(words_ok),
    }


def _round2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
