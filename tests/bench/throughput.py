"""Scenario 1 (throughput at zero token delay) and scenario 4 (the same with telemetry on vs off)."""

from __future__ import annotations

import time
from typing import Any

from tests.bench import procs
from tests.bench.common import Context, Row, compare, measure, not_measured, stack
from tests.bench.load import LoadSpec
from tests.bench.stats import ratio


def _spec(ctx: Context, target: str, users: int) -> LoadSpec:
    duration = ctx.sizes.throughput_duration_s
    return LoadSpec(
        target,
        users=users,
        streams_per_user=100_000,  # bounded by duration_s and time_cap_s
        duration_s=duration,
        time_cap_s=duration * 3 + 10,
        call_timeout_s=60,
    )


def _workers(ctx: Context, users: int) -> int:
    return 1 if users == 1 else ctx.pool.workers


def throughput(ctx: Context) -> dict[str, Any]:
    """Chunks/s and server CPU per chunk: raw baseline, the service direct, the service through Envoy."""
    sizes = ctx.sizes
    rows: list[Row] = []
    baselines: dict[int, Row] = {}
    with procs.raw_server(ctx.log_dir, words=sizes.throughput_words, delay_ms=0) as raw:
        for users in sizes.throughput_levels:
            baselines[users] = measure(ctx, "baseline", _spec(ctx, raw.address, users), [raw], _workers(ctx, users))
            rows.append(baselines[users])
    with stack(ctx, words=sizes.throughput_words, delay_ms=0, with_envoy=True) as st:
        for users in sizes.throughput_levels:
            row = measure(ctx, st.label, _spec(ctx, st.direct, users), st.processes(), _workers(ctx, users))
            rows.append(compare(row, baselines[users]))
        for users in sizes.throughput_levels:
            if st.envoy is None:
                rows.append(not_measured("envoy", st.envoy_reason or "not measured", streams=users))
                continue
            row = measure(
                ctx, "envoy", _spec(ctx, st.envoy, users), st.processes(through_envoy=True), _workers(ctx, users)
            )
            rows.append(compare(row, baselines[users]))
        telemetry = st.telemetry
    return {
        "title": "Throughput at zero token delay",
        "params": {"chunks_per_stream": sizes.throughput_words, "duration_s": sizes.throughput_duration_s},
        "stack_telemetry": telemetry,
        "rows": rows,
    }


def telemetry_cost(ctx: Context) -> dict[str, Any]:
    """Scenario 1 against the service with telemetry off, metrics only, traces only (exported to the OTLP sink)
    and both; every figure beside the "off" one."""
    sizes = ctx.sizes
    result: dict[str, Any] = {
        "title": "Telemetry cost: tracing and metrics on vs off",
        "params": {
            "chunks_per_stream": sizes.throughput_words,
            "duration_s": sizes.throughput_duration_s,
            "modes": ", ".join(sizes.telemetry_modes),
        },
    }
    if ctx.target:
        result["reason"] = "not measured: --target given (needs to start the service with telemetry on and off)"
        return result
    if ctx.sink is None:
        raise RuntimeError("the OTLP sink is not running")
    rows: list[Row] = []
    off: dict[int, Row] = {}
    effective: dict[str, Any] = {}
    for mode in sizes.telemetry_modes:
        spans_before = ctx.sink.snapshot()["spans"]
        with stack(ctx, words=sizes.throughput_words, delay_ms=0, telemetry=mode) as st:
            for users in sizes.throughput_levels:
                spec = _spec(ctx, st.direct, users)
                row = measure(ctx, f"telemetry {mode}", spec, st.processes(), _workers(ctx, users))
                row["telemetry"] = mode
                if mode == "off":
                    off[users] = row
                elif users in off:
                    row["vs_off"] = {
                        "chunks_per_s_ratio": ratio(row["chunks_per_s"], off[users]["chunks_per_s"]),
                        "cpu_per_chunk_ratio": ratio(
                            row["server_cpu_us_per_chunk"], off[users]["server_cpu_us_per_chunk"]
                        ),
                        "cpu_us_per_chunk_added": _added(row, off[users]),
                    }
                rows.append(row)
            metrics_endpoint = st.telemetry["metrics_endpoint"]
            time.sleep(1.0)  # the batch span processor exports every 500 ms
        spans_after = ctx.sink.snapshot()["spans"]
        spans = None if spans_before is None or spans_after is None else spans_after - spans_before
        effective[mode] = {"metrics_endpoint": metrics_endpoint, "spans_exported": spans}
    result["effective"] = effective
    result["sink"] = ctx.sink.snapshot()
    if not any(e["metrics_endpoint"] or e["spans_exported"] for e in effective.values()):
        result["notes"] = [
            "telemetry settings had no effect (no metrics endpoint, no spans exported): the service does not "
            "have AGENT_METRICS_ENABLED / OTEL tracing yet, so every mode measured the same thing"
        ]
    result["rows"] = rows
    return result


def _added(row: Row, off: Row) -> float | None:
    on_cpu, off_cpu = row.get("server_cpu_us_per_chunk"), off.get("server_cpu_us_per_chunk")
    return None if on_cpu is None or off_cpu is None else round(on_cpu - off_cpu, 1)
