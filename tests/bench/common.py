"""What every scenario shares: the run's context, starting the stack, and measuring one load phase."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import envoy, procs
from tests.bench.config import Sizes
from tests.bench.load import LoadPool, LoadResult, LoadSpec
from tests.bench.otlp_sink import OtlpSink
from tests.bench.procs import RssSampler, ServerProcess
from tests.bench.stats import minus, ratio, summarize_ms

Row = dict[str, Any]


@dataclass
class Context:
    """One harness run."""

    sizes: Sizes
    pool: LoadPool
    out_dir: Path
    target: str | None = None  # --target: measure this address instead of starting the stack
    telemetry: str = "on"  # the stack's telemetry in scenarios other than 4
    sink: OtlpSink | None = None

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.out_dir / "agent-data"


@dataclass
class Stack:
    """The stack as one scenario sees it: addresses to load and the processes to measure."""

    direct: str
    service: ServerProcess | None  # None with --target
    envoy: str | None = None
    envoy_process: ServerProcess | None = None
    envoy_reason: str | None = None  # why there is no Envoy path
    telemetry: dict[str, Any] = field(default_factory=dict)
    workers: int = 1  # AGENT_WORKERS of the service

    @property
    def label(self) -> str:
        if self.service is None:
            return "target"
        return "direct" if self.workers == 1 else f"direct ({self.workers} workers)"

    def processes(self, through_envoy: bool = False) -> list[ServerProcess]:
        found = [self.service] if self.service is not None else []
        if through_envoy and self.envoy_process is not None:
            found.append(self.envoy_process)
        return found


TELEMETRY_MODES = ("off", "metrics", "traces", "on")  # on: metrics and traces


def telemetry_env(ctx: Context, mode: str) -> dict[str, str]:
    """The service's telemetry settings for `mode`: metrics served on a loopback port, spans exported to the
    in-harness OTLP sink (so their cost includes the export), both, or neither."""
    if mode not in TELEMETRY_MODES:
        raise ValueError(f"telemetry mode {mode!r} is not one of {TELEMETRY_MODES}")
    metrics, traces = mode in ("metrics", "on"), mode in ("traces", "on")
    env = {
        "AGENT_METRICS_ENABLED": str(metrics).lower(),
        "AGENT_METRICS_HOST": "127.0.0.1",
        "AGENT_METRICS_PORT": str(procs.free_port()),
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    if not traces:
        return env | {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none"}
    if ctx.sink is None:
        raise RuntimeError("the OTLP sink is not running")
    return env | {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": ctx.sink.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        "OTEL_SERVICE_NAME": "agent-service-bench",
    }


def metrics_served(env: dict[str, str], patience_s: float = 3.0) -> bool:
    """Whether the service answers on its metrics port (False when the setting does not exist yet)."""
    url = f"http://127.0.0.1:{env['AGENT_METRICS_PORT']}/metrics"
    deadline = time.monotonic() + (patience_s if env.get("AGENT_METRICS_ENABLED") == "true" else 0.0)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
                return bool(response.status == 200)
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextlib.contextmanager
def stack(
    ctx: Context,
    *,
    words: int,
    delay_ms: float,
    telemetry: str | None = None,
    uvloop: bool = False,
    with_envoy: bool = False,
    workers: int = 1,
) -> Iterator[Stack]:
    """The service as a process (or the --target address), and Envoy in front of it when asked and possible.

    `workers`: the service's AGENT_WORKERS (worker processes sharing its port).
    """
    if ctx.target:
        reason = "not measured: --target given (point --target at the Envoy to measure it)"
        yield Stack(direct=ctx.target, service=None, envoy_reason=reason if with_envoy else None)
        return
    mode = telemetry or ctx.telemetry
    env = telemetry_env(ctx, mode)
    started = procs.service(
        ctx.log_dir, ctx.data_dir, words=words, delay_ms=delay_ms, telemetry_env=env, uvloop=uvloop, workers=workers
    )
    with started as service:
        info = {"mode": mode, "metrics_endpoint": metrics_served(env)}
        result = Stack(direct=service.address, service=service, telemetry=info, workers=workers)
        if not with_envoy:
            yield result
            return
        result.envoy_reason = envoy.unavailable()
        if result.envoy_reason:
            yield result
            return
        otlp_port = ctx.sink.port if mode in ("traces", "on") and ctx.sink is not None else None
        with envoy.running(service.address, ctx.log_dir, otlp_port) as proxy:
            result.envoy, result.envoy_process = proxy.address, proxy
            yield result


def measure(
    ctx: Context,
    system: str,
    spec: LoadSpec,
    servers: Sequence[ServerProcess],
    workers: int | None = None,
    extra: Callable[[LoadResult], Row] | None = None,
) -> Row:
    """Run one load phase and describe it: throughput, latencies, errors, and each server's CPU and RSS.

    `extra` adds figures of its own computed from the raw measurements.
    """
    before: dict[str, float] = {}
    idle_rss = {s.name: s.rss() for s in servers}
    with RssSampler(servers) as rss:
        result = ctx.pool.run(spec, workers, on_start=lambda: before.update({s.name: s.cpu_s() for s in servers}))
        cpu = {s.name: s.cpu_s() - before[s.name] for s in servers}
    row = describe(system, spec, result)
    if extra is not None:
        row.update(extra(result))
    if not servers:
        row["server"] = "not measured: remote target"
    else:
        row["server"] = {
            name: {
                "cpu_s": round(cpu[name], 3),
                "cpu_util": round(cpu[name] / result.wall_s, 3) if result.wall_s else None,
                "cpu_us_per_chunk": round(cpu[name] / result.chunks * 1e6, 1) if result.chunks else None,
                "rss_idle_mb": round(idle_rss[name] / 2**20, 1),
                "rss_peak_mb": round(rss.peak[name] / 2**20, 1),
                "rss_per_stream_kb": round((rss.peak[name] - idle_rss[name]) / spec.users / 1024, 1),
            }
            for name in cpu
        }
        row["server_cpu_us_per_chunk"] = round(sum(cpu.values()) / result.chunks * 1e6, 1) if result.chunks else None
        row["server_cpu_us_per_call"] = (
            round(sum(cpu.values()) / result.streams_run * 1e6, 1) if result.streams_run else None
        )
    return row


def describe(system: str, spec: LoadSpec, result: LoadResult) -> Row:
    errors = {code: n for code, n in sorted(result.codes.items()) if code != "OK"}
    return {
        "system": system,
        "streams": spec.users,
        "calls": result.streams_run,
        "recorded": result.streams,
        "chunks": result.chunks,
        "wall_s": round(result.wall_s, 3),
        "chunks_per_s": round(result.chunks / result.wall_s, 1) if result.wall_s else None,
        "ttfc_ms": summarize_ms(result.ttfc),
        "gap_ms": summarize_ms(result.gaps) if spec.record_gaps else None,
        "duration_ms": summarize_ms(result.duration),
        "ok": result.codes.get("OK", 0),
        "errors": errors,
        "client_cpu_s": round(result.client_cpu_s, 3),
        "client_workers": result.workers,
    }


def compare(row: Row, baseline: Row | None) -> Row:
    """Add the ratios to the baseline row of the same load (same streams) in place; returns the row."""
    if baseline is None or row is baseline:
        return row
    row["vs_baseline"] = {
        "chunks_per_s_ratio": ratio(row.get("chunks_per_s"), baseline.get("chunks_per_s")),
        "cpu_per_chunk_ratio": ratio(row.get("server_cpu_us_per_chunk"), baseline.get("server_cpu_us_per_chunk")),
        **{
            f"ttfc_{q}_added_ms": minus(row["ttfc_ms"].get(q), baseline["ttfc_ms"].get(q))
            for q in ("p50", "p95", "p99")
        },
    }
    return row


def not_measured(system: str, reason: str, **extra: Any) -> Row:
    return {"system": system, **extra, "not_measured": reason}
