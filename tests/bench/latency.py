"""Scenario 2: time to first chunk added by the stack, over sequential short calls on a warm connection.

Its tail moves from run to run (a collection, another process scheduled on the core), so the
systems are measured `repeats` times, interleaved, and each percentile is the median of the repeats.
"""

from __future__ import annotations

from typing import Any

from tests.bench.common import Context, Row, combine, compare, measure, not_measured, stack
from tests.bench.load import LoadSpec


def _spec(ctx: Context, target: str) -> LoadSpec:
    calls = ctx.sizes.ttfc_calls
    return LoadSpec(
        target, users=1, streams_per_user=calls, call_timeout_s=10, time_cap_s=calls * 0.5 + 30, warmup_calls=5
    )


def plan_time_to_first_chunk(ctx: Context) -> None:
    ctx.raw(words=ctx.sizes.ttfc_words, delay_ms=0, wait=False)
    stack(ctx, words=ctx.sizes.ttfc_words, delay_ms=0, wait=False)


def time_to_first_chunk(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    raw = ctx.raw(words=sizes.ttfc_words, delay_ms=0)
    st = stack(ctx, words=sizes.ttfc_words, delay_ms=0, with_envoy=True)
    runs: dict[str, list[Row]] = {}
    for _ in range(sizes.repeats):
        runs.setdefault("baseline", []).append(measure(ctx, "baseline", _spec(ctx, raw.address), [raw], workers=1))
        runs.setdefault(st.label, []).append(measure(ctx, st.label, _spec(ctx, st.direct), st.processes(), workers=1))
        if st.envoy is not None:
            row = measure(ctx, "envoy", _spec(ctx, st.envoy), st.processes(through_envoy=True), workers=1)
            runs.setdefault("envoy", []).append(row)
    rows = {system: combine(found) for system, found in runs.items()}
    baseline = rows.get("baseline")
    for system, row in rows.items():
        if system != "baseline":
            compare(row, baseline)
    listed = list(rows.values())
    if st.envoy is None:
        listed.append(not_measured("envoy", st.envoy_reason or "not measured"))
    return {
        "title": "Time to first chunk added by the stack (sequential short calls)",
        "params": {
            "calls": sizes.ttfc_calls,
            "words_per_call": sizes.ttfc_words,
            "repeats": f"{sizes.repeats} (interleaved; each percentile the median of the repeats)",
        },
        "stack_telemetry": st.telemetry,
        "rows": listed,
    }
