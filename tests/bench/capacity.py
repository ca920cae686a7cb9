"""Scenario 3 (capacity under slow streams) and scenario 5 (the seed's thread-pool design at the same load)."""

from __future__ import annotations

from typing import Any

from tests.bench import procs
from tests.bench.common import Context, Row, compare, measure, not_measured, stack, telemetry_env
from tests.bench.config import HELD_DURATION_SLACK, HELD_TTFC_P99_MS
from tests.bench.load import LoadResult, LoadSpec


def _steady_spec(ctx: Context, target: str, users: int) -> LoadSpec:
    """`users` concurrent slow streams, steady: users start spread over one stream's length (round 0, the
    ramp), and only round 1 is recorded, while the other users' streams keep the level up (round 2, the tail)."""
    ideal = ctx.sizes.slow_ideal_s
    rounds = max(1, ctx.sizes.capacity_rounds)
    return LoadSpec(
        target,
        users=users,
        streams_per_user=rounds,
        ramp_s=ideal if rounds > 1 else 0.0,
        measure_rounds=(1, 2) if rounds > 1 else (0, 1),
        record_gaps=True,
        call_timeout_s=ideal * 5 + 5,
        time_cap_s=ideal * rounds * 3 + 10,
        warmup_calls=0,
        streams_per_channel=ctx.sizes.capacity_streams_per_channel,
    )


def _held(ctx: Context, row: Row) -> Row:
    """Whether the level is held, and if not, why."""
    ideal_ms = ctx.sizes.slow_ideal_s * 1000
    duration_p99 = row["duration_ms"]["p99"]
    ttfc_p99 = row["ttfc_ms"]["p99"]
    failed = []
    if ttfc_p99 is None or ttfc_p99 >= HELD_TTFC_P99_MS:
        failed.append(f"TTFC p99 {ttfc_p99} ms >= {HELD_TTFC_P99_MS:g} ms")
    if row["errors"]:
        failed.append(f"errors {row['errors']}")
    if duration_p99 is None or duration_p99 > ideal_ms * (1 + HELD_DURATION_SLACK):
        failed.append(f"duration p99 {duration_p99} ms > ideal {ideal_ms:g} ms + {HELD_DURATION_SLACK:.0%}")
    row["duration_vs_ideal_p99"] = None if duration_p99 is None else round(duration_p99 / ideal_ms, 3)
    row["held"] = not failed
    if failed:
        row["not_held_because"] = failed
    return row


def _collapsed(ctx: Context, row: Row) -> bool:
    """Far past capacity: higher levels would only take long to say the same."""
    duration_p99 = row["duration_ms"]["p99"] or 0.0
    errors = sum(row["errors"].values())
    return duration_p99 > 3 * ctx.sizes.slow_ideal_s * 1000 or errors > 0.1 * max(1, row["recorded"])


def plan_capacity(ctx: Context) -> None:
    slow = {"words": ctx.sizes.slow_tokens, "delay_ms": ctx.sizes.slow_delay_ms}
    for processes in ctx.sizes.capacity_workers:
        ctx.raw(processes=processes, wait=False, **slow)
        stack(ctx, workers=processes, wait=False, **slow)
        if processes > 1:
            stack(ctx, replicas=processes, wait=False, **slow)


def capacity(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    rows: list[Row] = []
    baselines: dict[tuple[int, int], Row] = {}  # (processes, streams) -> the baseline's row
    slow = {"words": sizes.slow_tokens, "delay_ms": sizes.slow_delay_ms}
    telemetry: dict[str, Any] = {}
    for processes in sizes.capacity_workers:
        raw = ctx.raw(processes=processes, **slow)
        rows += _levels(ctx, baseline_label(processes), raw.address, [raw], baselines, processes)
        if ctx.target and processes > 1:
            rows.append(not_measured(f"target ({processes} workers)", "not measured: --target given"))
            continue
        st = stack(ctx, workers=processes, **slow)
        rows += _levels(ctx, st.label, st.direct, st.processes(), baselines, processes)
        telemetry = st.telemetry
        if processes > 1:  # as many replicas, each its own process and port, spread by Envoy
            replicas = stack(ctx, replicas=processes, with_envoy=True, **slow)
            label = replicas_label(processes)
            if replicas.envoy is None:
                rows.append(not_measured(label, replicas.envoy_reason or "not measured: no Envoy"))
            else:
                rows += _levels(ctx, label, replicas.envoy, replicas.processes(True), baselines, processes)
    memory = _memory(ctx, slow) if not ctx.target else {"reason": "not measured: --target given"}
    highest = {
        system: max((r["streams"] for r in rows if r["system"] == system and r.get("held")), default=None)
        for system in dict.fromkeys(r["system"] for r in rows)
    }
    return {
        "title": "Capacity: slow streams",
        "params": {
            "token_delay_ms": sizes.slow_delay_ms,
            "tokens": sizes.slow_tokens,
            "ideal_stream_ms": sizes.slow_ideal_s * 1000,
            "held_when": f"TTFC p99 < {HELD_TTFC_P99_MS:g} ms, no errors, duration p99 <= ideal + "
            f"{HELD_DURATION_SLACK:.0%}",
            "load": "users start spread over one stream length; the second stream of each user is recorded",
            "server_processes": "/".join(str(n) for n in sizes.capacity_workers),
            "connections": f"one per {sizes.capacity_streams_per_channel} streams of each client process",
        },
        "stack_telemetry": telemetry,
        "highest_level_held": highest,
        "scaling": _scaling(highest, sizes.capacity_workers),
        "memory": memory,
        "rows": rows,
        "notes": [
            "N workers (AGENT_WORKERS=N) are compared with a raw baseline of N processes on one port "
            "(SO_REUSEPORT, forked like the workers); the kernel spreads connections across them, not calls",
            "N replicas are N service processes on ports of their own behind one Envoy (least request, no "
            "affinity): the same baseline, and Envoy's CPU counted with theirs",
            "server CPU is summed over a group's processes; its RSS is the sum of their PSS (pages shared "
            "since the fork counted once)",
        ],
    }


def _memory(ctx: Context, slow: dict[str, Any]) -> dict[str, Any]:
    """RSS per open stream: the slope between two numbers of open slow streams, each in a fresh process.

    A process keeps (and reuses) what a phase allocated, so the levels' "RSS/stream" flatters every
    phase after the first, and the first includes one-time growth. Here each size gets a process that
    served only a warm-up burst; the difference between the two sizes cancels what both have in common.
    """
    small, large = ctx.sizes.memory_streams
    found: dict[str, Any] = {"streams": f"{small} and {large}, each in a fresh process after a warm-up burst"}
    for system in ("baseline", "direct"):
        growth_mb: dict[int, float] = {}
        for users in (small, large):
            if system == "baseline":
                spec = procs.raw_launch(processes=1, loop="asyncio", **slow)
            else:
                spec = procs.service_launch(ctx.data_dir, telemetry_env=telemetry_env(ctx, ctx.telemetry), **slow)
            server = ctx.launch(spec)
            try:
                ctx.wait_ready(server)
                warm = LoadSpec(server.address, users=min(small, 10), call_timeout_s=ctx.sizes.slow_ideal_s * 5 + 5)
                measure(ctx, f"{system} warm-up", warm, [server])
                row = measure(ctx, system, _steady_spec(ctx, server.address, users), [server])
                rss = row["server"][server.name]
                growth_mb[users] = rss["rss_peak_mb"] - rss["rss_idle_mb"]
                found[f"{system} {users} streams"] = {
                    "rss_idle_mb": rss["rss_idle_mb"],
                    "rss_peak_mb": rss["rss_peak_mb"],
                }
            finally:
                server.stop()
        found[f"{system} kb_per_stream"] = round((growth_mb[large] - growth_mb[small]) * 1024 / (large - small), 1)
    return found


def _scaling(highest: dict[str, int | None], workers: tuple[int, ...]) -> dict[str, Any]:
    """Levels held with N processes against N times the level one process holds (1.0: linear)."""
    found: dict[str, Any] = {}
    for kind, label in (("baseline", baseline_label), ("service", _service_label)):
        one = highest.get(label(1))
        for n in workers:
            if n > 1 and one and (held := highest.get(label(n))) is not None:
                found[f"{kind} {n} vs {n} × 1"] = round(held / (n * one), 2)
    return found


def _service_label(processes: int) -> str:
    return "direct" if processes == 1 else f"direct ({processes} workers)"


def replicas_label(processes: int) -> str:
    return f"envoy ({processes} replicas)"


def baseline_label(processes: int) -> str:
    return "baseline" if processes == 1 else f"baseline ({processes} processes)"


def _levels(
    ctx: Context, system: str, target: str, servers: list, baselines: dict[tuple[int, int], Row], processes: int
) -> list[Row]:
    """Every level of one system, until it collapses or misses `capacity_misses` levels in a row; each row
    beside the baseline of as many processes."""
    rows: list[Row] = []
    stopped: str | None = None
    misses = 0
    for users in ctx.sizes.capacity_levels:
        if stopped is not None:
            rows.append(not_measured(system, f"skipped: {stopped}", streams=users))
            continue
        row = _held(ctx, measure(ctx, system, _steady_spec(ctx, target, users), servers))
        if system == baseline_label(processes):
            baselines[(processes, users)] = row
        rows.append(compare(row, baselines.get((processes, users))))
        misses = 0 if row["held"] else misses + 1
        if _collapsed(ctx, row):
            stopped = f"far past capacity at {users} streams"
        elif misses >= ctx.sizes.capacity_misses:
            stopped = f"{misses} levels in a row not held (up to {users} streams)"
    return rows


def plan_seed_design(ctx: Context) -> None:
    slow = {"words": ctx.sizes.slow_tokens, "delay_ms": ctx.sizes.slow_delay_ms}
    ctx.raw(wait=False, **slow)
    stack(ctx, wait=False, **slow)


def seed_design(ctx: Context) -> dict[str, Any]:
    """The seed's sync server with 10 threads vs the raw grpc.aio baseline and the stack, all streams at once."""
    sizes = ctx.sizes
    users, ideal = sizes.seed_streams, sizes.slow_ideal_s
    slow = {"words": sizes.slow_tokens, "delay_ms": sizes.slow_delay_ms}

    def spec(target: str, timeout_s: float) -> LoadSpec:
        return LoadSpec(target, users=users, record_gaps=True, call_timeout_s=timeout_s, warmup_calls=0)

    def waited(result: LoadResult) -> Row:
        late = sum(1 for t in result.ttfc if t > ideal / 2)
        return {"streams_waiting_over_half_a_stream": late}

    raw = ctx.raw(**slow)
    baseline = measure(ctx, "baseline", spec(raw.address, ideal * 5 + 5), [raw], extra=waited)
    rows: list[Row] = [baseline]
    seed_timeout = ideal * (users / 10 + 3) + 10
    with procs.seed_server(ctx.log_dir, **slow) as seed:
        rows.append(compare(measure(ctx, "seed", spec(seed.address, seed_timeout), [seed], extra=waited), baseline))
    st = stack(ctx, **slow)
    rows.append(compare(measure(ctx, st.label, spec(st.direct, ideal * 5 + 5), st.processes(), extra=waited), baseline))
    return {
        "title": "The seed's design: sync grpc.server(ThreadPoolExecutor(max_workers=10))",
        "params": {
            "concurrent_streams": users,
            "token_delay_ms": sizes.slow_delay_ms,
            "tokens": sizes.slow_tokens,
            "ideal_stream_ms": ideal * 1000,
            "load": "every stream starts at once",
        },
        "rows": rows,
    }
