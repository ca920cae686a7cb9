"""Scenario 2: time to first chunk added by the stack, over sequential short calls on a warm connection."""

from __future__ import annotations

from typing import Any

from tests.bench import procs
from tests.bench.common import Context, Row, compare, measure, not_measured, stack
from tests.bench.load import LoadSpec


def _spec(ctx: Context, target: str) -> LoadSpec:
    calls = ctx.sizes.ttfc_calls
    return LoadSpec(
        target, users=1, streams_per_user=calls, call_timeout_s=10, time_cap_s=calls * 0.5 + 30, warmup_calls=5
    )


def time_to_first_chunk(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    rows: list[Row] = []
    with procs.raw_server(ctx.log_dir, words=sizes.ttfc_words, delay_ms=0) as raw:
        baseline = measure(ctx, "baseline", _spec(ctx, raw.address), [raw], workers=1)
    rows.append(baseline)
    with stack(ctx, words=sizes.ttfc_words, delay_ms=0, with_envoy=True) as st:
        rows.append(compare(measure(ctx, st.label, _spec(ctx, st.direct), st.processes(), workers=1), baseline))
        if st.envoy is None:
            rows.append(not_measured("envoy", st.envoy_reason or "not measured"))
        else:
            row = measure(ctx, "envoy", _spec(ctx, st.envoy), st.processes(through_envoy=True), workers=1)
            rows.append(compare(row, baseline))
        telemetry = st.telemetry
    return {
        "title": "Time to first chunk added by the stack (sequential short calls)",
        "params": {"calls": sizes.ttfc_calls, "chunks_per_call": sizes.ttfc_words},
        "stack_telemetry": telemetry,
        "rows": rows,
    }
