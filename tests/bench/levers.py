"""Scenario 6: the known levers, each measured on its own.

- strands' own per-token cost: the demo model's raw generator vs a strands Agent running it, in-process;
- coalescing several words per gRPC message: the raw server sending K words per message;
- uvloop: the raw server and the service on uvloop vs asyncio's default loop;
- the per-chunk cost of a Prometheus histogram observation.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tests.bench.common import Context, Row, measure, not_measured, stack
from tests.bench.load import LoadSpec
from tests.bench.stats import ratio


def plan_levers(ctx: Context) -> None:
    words = ctx.sizes.throughput_words
    for loop in ("asyncio", "uvloop"):
        ctx.raw(words=words, delay_ms=0, loop=loop, wait=False)
        stack(ctx, words=words, delay_ms=0, uvloop=loop == "uvloop", wait=False)


def levers(ctx: Context) -> dict[str, Any]:
    return {
        "title": "Levers: strands per-token cost, coalescing, uvloop, Prometheus per chunk",
        "strands": ctx.pool.call(strands_per_token, ctx.sizes.strands_tokens, ctx.sizes.strands_repeats),
        "coalescing": _coalescing(ctx),
        "uvloop": _uvloop(ctx),
        "prometheus": prometheus_per_observation(ctx.sizes.prometheus_observations),
    }


def _spec(ctx: Context, target: str, metadata: dict[str, str] | None = None) -> LoadSpec:
    duration = ctx.sizes.lever_duration_s
    return LoadSpec(
        target,
        users=ctx.sizes.lever_streams,
        streams_per_user=100_000,
        duration_s=duration,
        time_cap_s=duration * 3 + 10,
        call_timeout_s=60,
        metadata=tuple(sorted((metadata or {}).items())),
    )


def _coalescing(ctx: Context) -> dict[str, Any]:
    """Words/s and CPU per word when the raw server sends K words per message (same words per answer)."""
    words = ctx.sizes.throughput_words
    raw = ctx.raw(words=words, delay_ms=0)
    rows: list[Row] = []
    for factor in ctx.sizes.coalesce_factors:
        spec = _spec(ctx, raw.address, {"words_per_message": str(factor)})
        row = measure(ctx, f"baseline, {factor} words/message", spec, [raw])
        row["words_per_message_asked"] = factor
        rows.append(row)
    for row in rows[1:]:
        row["words_per_s_ratio"] = ratio(row["words_per_s"], rows[0]["words_per_s"])
    return {"words_per_answer": words, "streams": ctx.sizes.lever_streams, "rows": rows}


def _uvloop(ctx: Context) -> dict[str, Any]:
    """The raw server and the service, asyncio's loop vs uvloop (the service unchanged: the policy is set first)."""
    words = ctx.sizes.throughput_words
    rows: list[Row] = []
    for loop in ("asyncio", "uvloop"):
        raw = ctx.raw(words=words, delay_ms=0, loop=loop)
        rows.append(measure(ctx, f"baseline, {loop}", _spec(ctx, raw.address), [raw]) | {"loop": loop})
    if ctx.target:
        rows.append(not_measured("service", "not measured: --target given (needs to start the service)"))
    else:
        for loop in ("asyncio", "uvloop"):
            st = stack(ctx, words=words, delay_ms=0, uvloop=loop == "uvloop")
            rows.append(measure(ctx, f"{st.label}, {loop}", _spec(ctx, st.direct), st.processes()) | {"loop": loop})
    for first, second in ((0, 1), (2, 3)):
        if second < len(rows) and "not_measured" not in rows[second]:
            rows[second]["vs_asyncio"] = {
                "words_per_s_ratio": ratio(rows[second]["words_per_s"], rows[first]["words_per_s"]),
                "cpu_per_word_ratio": ratio(
                    rows[second]["server_cpu_us_per_word"], rows[first]["server_cpu_us_per_word"]
                ),
            }
    return {"streams": ctx.sizes.lever_streams, "words_per_answer": words, "rows": rows}


def strands_per_token(tokens: int, repeats: int) -> dict[str, Any]:
    """In a worker process: tokens/s of the demo model's generator alone, and of a strands Agent running it."""
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    from strands import Agent

    from agent_service.models.demo import DemoModel

    prompt = [{"role": "user", "content": [{"text": "bench"}]}]

    async def model_only(model: DemoModel) -> int:
        count = 0
        async for event in model.stream(prompt):  # type: ignore[arg-type]
            count += "contentBlockDelta" in event
        return count

    async def agent_run(model: DemoModel) -> int:
        agent = Agent(model=model, callback_handler=None)
        count = 0
        async for event in agent.stream_async("bench"):
            count += "data" in event
        return count

    async def timed(run: Any, words: int) -> tuple[float, int]:
        model = DemoModel(token_delay_ms=0, reply_words=words, max_tokens=words + 16)
        await run(model)  # warm-up
        best, count = float("inf"), 0
        for _ in range(repeats):
            started = time.perf_counter()
            count = await run(model)
            best = min(best, time.perf_counter() - started)
        return best, count

    async def agent_per_token() -> tuple[float, float, int]:
        """(µs per token past the first, s per 1-token call, tokens/s) of an Agent run."""
        many_s, many_tokens = await timed(agent_run, tokens)
        one_s, _ = await timed(agent_run, 1)
        return (many_s - one_s) / max(1, many_tokens - 1) * 1e6, one_s, many_tokens / many_s

    async def main() -> dict[str, Any]:
        model_s, model_tokens = await timed(model_only, tokens)
        agent_us, one_token_s, agent_rate = await agent_per_token()
        _install_tracing()
        traced_us, traced_one_s, _ = await agent_per_token()
        model_us = model_s / model_tokens * 1e6
        return {
            "tokens_per_call": tokens,
            "model_only_tokens_per_s": round(model_tokens / model_s),
            "agent_tokens_per_s": round(agent_rate),
            "model_only_us_per_token": round(model_us, 2),
            "agent_us_per_token": round(agent_us, 2),
            "strands_us_per_token": round(agent_us - model_us, 2),
            "agent_fixed_ms_per_call": round(one_token_s * 1000, 3),
            "agent_traced_us_per_token": round(traced_us, 2),
            "tracing_us_per_token": round(traced_us - agent_us, 2),
            "agent_traced_fixed_ms_per_call": round(traced_one_s * 1000, 3),
            "method": f"best of {repeats} runs, in one process, no gRPC; an Agent per call (as an ephemeral "
            "session); traced: an SDK tracer provider whose batch processor drops the spans",
        }

    return asyncio.run(main())


def _install_tracing() -> None:
    """A real SDK tracer provider (as the service installs), exporting to nowhere: the cost of making spans."""
    os.environ["OTEL_SDK_DISABLED"] = "false"  # this worker process only
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)


def prometheus_per_observation(observations: int) -> dict[str, Any]:
    """ns per histogram observation (a bound labelled child, as the service binds it) and per counter increment."""
    try:
        from prometheus_client import CollectorRegistry, Counter, Histogram
    except ImportError:
        return {"reason": "not measured: prometheus_client is not installed"}
    registry = CollectorRegistry()
    histogram = Histogram("bench_gap_seconds", "x", ["method", "model"], registry=registry).labels("StreamChat", "demo")
    counter = Counter("bench_chunks", "x", ["method"], registry=registry).labels("StreamChat")

    def per_call_ns(run: Any) -> float:
        started = time.perf_counter()
        for _ in range(observations):
            run()
        return (time.perf_counter() - started) / observations * 1e9

    observe = per_call_ns(lambda: histogram.observe(0.001))
    increment = per_call_ns(counter.inc)
    clock = per_call_ns(time.perf_counter)
    empty = per_call_ns(lambda: None)
    return {
        "histogram_observe_ns": round(observe - empty),
        "counter_inc_ns": round(increment - empty),
        "perf_counter_ns": round(clock - empty),
        "per_chunk_us_estimate": round((observe + clock - 2 * empty) / 1000, 3),
        "method": f"{observations} calls in a loop, minus an empty call's cost",
    }
