"""Sizes of every scenario: the full run (`make bench`) and `--quick` (the smoke test: every scenario's code
path once, at sizes too small to mean anything, in well under a minute)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # Figures whose noise is larger than the effects they show (1, 2, 4) are measured this many
    # times, interleaved, and reported as the median with the spread.
    repeats: int = 3
    # 1. throughput (and 4. telemetry cost): answers of `throughput_words` words
    throughput_levels: tuple[int, ...] = (1, 50)
    throughput_words: int = 200
    throughput_duration_s: float = 3.0
    # Zero delay (coalescing merges what waits) and a delay at which it has nothing to merge.
    throughput_delays_ms: tuple[float, ...] = (0.0, 1.0)
    throughput_uncoalesced: bool = True  # also the service with AGENT_COALESCE_TEXT=false (at zero delay)
    telemetry_modes: tuple[str, ...] = ("off", "metrics", "traces", "on", "sampled")  # 4. telemetry cost
    # 2. time to first chunk: sequential short calls
    ttfc_calls: int = 1000
    ttfc_words: int = 10
    # 3. capacity (and 5. the seed): slow streams
    slow_delay_ms: float = 20.0
    slow_tokens: int = 100
    capacity_levels: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 700, 1000, 1500, 2000)
    capacity_misses: int = 2  # a system's levels stop after this many in a row not held
    capacity_rounds: int = 2  # streams per user; the first round is the ramp and is not recorded
    # Server processes measured in scenario 3: the service with AGENT_WORKERS=N beside a raw baseline of N
    # processes on one port. The kernel spreads connections, not calls, so the load opens one connection
    # per `capacity_streams_per_channel` streams of each client process.
    capacity_workers: tuple[int, ...] = (1, 2)
    capacity_streams_per_channel: int = 5
    # RSS per open stream: the slope between these two numbers of open slow streams, each in a fresh process.
    memory_streams: tuple[int, int] = (50, 150)
    seed_streams: int = 100
    # 6. levers
    strands_tokens: int = 1000
    strands_repeats: int = 5
    coalesce_factors: tuple[int, ...] = (1, 4, 16)
    lever_streams: int = 50
    lever_duration_s: float = 10.0
    prometheus_observations: int = 200_000

    @property
    def slow_ideal_s(self) -> float:
        return self.slow_tokens * self.slow_delay_ms / 1000.0


FULL = Sizes()

# Quick: one level per scenario, one repeat, and the same answer size wherever a scenario allows,
# so scenarios share service processes (a start costs seconds of imports).
QUICK = Sizes(
    repeats=1,
    throughput_levels=(8,),
    throughput_words=20,
    throughput_duration_s=0.4,
    throughput_delays_ms=(0.0,),
    telemetry_modes=("off", "on"),
    ttfc_calls=30,
    ttfc_words=20,
    slow_delay_ms=10.0,
    slow_tokens=10,
    capacity_levels=(10,),
    capacity_rounds=1,
    memory_streams=(4, 12),
    seed_streams=12,
    strands_tokens=100,
    strands_repeats=1,
    coalesce_factors=(1, 4),
    lever_streams=8,
    lever_duration_s=0.4,
    prometheus_observations=5_000,
)

# A level of scenario 3 is held when all three hold:
HELD_TTFC_P99_MS = 50.0
HELD_DURATION_SLACK = 0.10  # stream duration p99 within 10% of the ideal
