"""Sizes of every scenario: the full run (`make bench`) and `--quick` (the smoke test, under 2 minutes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # 1. throughput (and 4. telemetry cost): zero token delay, streams of `throughput_words` chunks
    throughput_levels: tuple[int, ...] = (1, 50)
    throughput_words: int = 200
    throughput_duration_s: float = 10.0
    telemetry_modes: tuple[str, ...] = ("off", "metrics", "traces", "on")  # 4. telemetry cost
    # 2. time to first chunk: sequential short calls
    ttfc_calls: int = 1000
    ttfc_words: int = 10
    # 3. capacity (and 5. the seed): slow streams
    slow_delay_ms: float = 20.0
    slow_tokens: int = 100
    capacity_levels: tuple[int, ...] = (100, 250, 500, 1000, 2000)
    capacity_rounds: int = 2  # streams per user; the first round is the ramp and is not recorded
    # Server processes measured in scenario 3: the service with AGENT_WORKERS=N beside a raw baseline of N
    # processes on one port. The kernel spreads connections, not calls, so the load opens one connection
    # per `capacity_streams_per_channel` streams of each client process.
    capacity_workers: tuple[int, ...] = (1, 2)
    capacity_streams_per_channel: int = 5
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

QUICK = Sizes(
    throughput_words=50,
    throughput_duration_s=1.5,
    telemetry_modes=("off", "on"),
    ttfc_calls=100,
    slow_tokens=20,
    capacity_levels=(25, 100),
    seed_streams=30,
    strands_tokens=300,
    strands_repeats=2,
    coalesce_factors=(1, 8),
    lever_streams=20,
    lever_duration_s=1.5,
    prometheus_observations=20_000,
)

# A level of scenario 3 is held when all three hold:
HELD_TTFC_P99_MS = 50.0
HELD_DURATION_SLACK = 0.10  # stream duration p99 within 10% of the ideal
