"""What every scenario shares: the run's context, starting the stack, and measuring one load phase."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import envoy, procs
from tests.bench.config import Sizes
from tests.bench.load import LoadPool, LoadResult, LoadSpec
from tests.bench.otlp_sink import OtlpSink
from tests.bench.procs import RssSampler, ServerProcess
from tests.bench.stats import median, minus, ratio, spread, summarize_ms

Row = dict[str, Any]


@dataclass
class Context:
    """One harness run.

    Servers are started when a scenario first asks for them, or all at once before the
    scenarios run (`plan`: their start-ups, seconds of imports each, overlap), and kept
    until the run ends (`close`), so scenarios that measure the same configuration share
    one process.
    """

    sizes: Sizes
    pool: LoadPool
    out_dir: Path
    target: str | None = None  # --target: measure this address instead of starting the stack
    telemetry: str = "on"  # the stack's telemetry in scenarios other than 4
    sink: OtlpSink | None = None
    _running: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _stacks: dict[tuple[Any, ...], Stack] = field(default_factory=dict)
    _raws: dict[tuple[Any, ...], ServerProcess] = field(default_factory=dict)
    _ready: set[str] = field(default_factory=set)

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.out_dir / "agent-data"

    def raw(
        self, *, words: int, delay_ms: float, processes: int = 1, loop: str = "asyncio", wait: bool = True
    ) -> ServerProcess:
        """The raw baseline server (one per shape; requests may ask for another shape, see `servers`)."""
        key = (words, delay_ms, processes, loop)
        if key not in self._raws:
            spec = procs.raw_launch(words=words, delay_ms=delay_ms, processes=processes, loop=loop)
            self._raws[key] = self.launch(spec)
        if wait:
            self.wait_ready(self._raws[key])
        return self._raws[key]

    def launch(self, spec: procs.Launch) -> ServerProcess:
        """Start a server's process now, stopped when the run ends."""
        server = procs.launch(spec, self.log_dir)
        self._running.callback(server.stop)
        return server

    def wait_ready(self, server: ServerProcess) -> None:
        if server.name + server.address not in self._ready:
            server.wait_ready()
            self._ready.add(server.name + server.address)

    def close(self) -> None:
        """Stop every server the run started."""
        self._running.close()


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
    env: dict[str, str] = field(default_factory=dict)  # the service's telemetry settings
    replicas: list[ServerProcess] = field(default_factory=list)  # more service processes of their own, behind Envoy

    @property
    def label(self) -> str:
        if self.service is None:
            return "target"
        return "direct" if self.workers == 1 else f"direct ({self.workers} workers)"

    def processes(self, through_envoy: bool = False) -> list[ServerProcess]:
        found = [self.service] if self.service is not None else []
        found += self.replicas
        if through_envoy and self.envoy_process is not None:
            found.append(self.envoy_process)
        return found


# on: metrics and traces (every call traced); sampled: metrics and traces of 1 call in `SAMPLED_RATIO`.
TELEMETRY_MODES = ("off", "metrics", "traces", "on", "sampled")
SAMPLED_RATIO = 0.1


def telemetry_env(ctx: Context, mode: str) -> dict[str, str]:
    """The service's telemetry settings for `mode`: metrics served on a loopback port, spans exported to the
    in-harness OTLP sink (so their cost includes the export), both, or neither."""
    if mode not in TELEMETRY_MODES:
        raise ValueError(f"telemetry mode {mode!r} is not one of {TELEMETRY_MODES}")
    metrics, traces = mode in ("metrics", "on", "sampled"), mode in ("traces", "on", "sampled")
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
    } | ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(SAMPLED_RATIO)}
         if mode == "sampled" else {})  # fmt: skip


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


def stack(
    ctx: Context,
    *,
    words: int,
    delay_ms: float,
    telemetry: str | None = None,
    uvloop: bool = False,
    with_envoy: bool = False,
    workers: int = 1,
    replicas: int = 1,
    coalesce: bool = True,
    wait: bool = True,
) -> Stack:
    """The service as a process (or the --target address), and Envoy in front of it when asked and possible.

    Started on first use (`wait=False`: only launched, for `plan`) and shared until the run
    ends (`Context`). `workers`: the service's AGENT_WORKERS (worker processes sharing its
    port); `replicas`: service processes of their own, each on its port, that only Envoy puts together
    (`with_envoy`; `direct` is the first one); `coalesce`: its AGENT_COALESCE_TEXT.
    """
    if ctx.target:
        reason = "not measured: --target given (point --target at the Envoy to measure it)"
        return Stack(direct=ctx.target, service=None, envoy_reason=reason if with_envoy else None)
    mode = telemetry or ctx.telemetry
    key = (words, delay_ms, mode, uvloop, workers, coalesce, replicas)
    found = ctx._stacks.get(key)
    if found is None:
        env = telemetry_env(ctx, mode) | {"AGENT_COALESCE_TEXT": str(coalesce).lower()}
        launched = []
        for replica in range(1, replicas + 1) if replicas > 1 else (0,):
            own = env if replica <= 1 else env | {"AGENT_METRICS_PORT": str(procs.free_port())}  # a port each
            spec = procs.service_launch(
                ctx.data_dir,
                words=words,
                delay_ms=delay_ms,
                telemetry_env=own,
                uvloop=uvloop,
                workers=workers,
                replica=replica,
            )
            launched.append(ctx.launch(spec))
        service, *others = launched
        found = Stack(direct=service.address, service=service, workers=workers, env=env, replicas=others)
        ctx._stacks[key] = found
    if not wait:
        return found
    assert found.service is not None
    for each in found.processes():
        ctx.wait_ready(each)
    if not found.telemetry:
        found.telemetry = {"mode": mode, "metrics_endpoint": metrics_served(found.env), "coalesce_text": coalesce}
    if with_envoy and found.envoy is None and found.envoy_reason is None:
        found.envoy_reason = envoy.unavailable()
        if found.envoy_reason is None:
            otlp_port = ctx.sink.port if mode in ("traces", "on") and ctx.sink is not None else None
            upstreams = [process.address for process in found.processes()]
            proxy = ctx._running.enter_context(envoy.running(upstreams, ctx.log_dir, otlp_port))
            found.envoy, found.envoy_process = proxy.address, proxy
    return found


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
                "cpu_us_per_word": round(cpu[name] / result.words * 1e6, 1) if result.words else None,
                "rss_idle_mb": round(idle_rss[name] / 2**20, 1),
                "rss_peak_mb": round(rss.peak[name] / 2**20, 1),
                "rss_per_stream_kb": round((rss.peak[name] - idle_rss[name]) / spec.users / 1024, 1),
            }
            for name in cpu
        }
        total = sum(cpu.values())
        row["server_cpu_us_per_word"] = _per(total * 1e6, result.words)
        row["server_cpu_us_per_message"] = _per(total * 1e6, result.messages)
        row["server_cpu_us_per_call"] = _per(total * 1e6, result.streams_run)
    return row


def _per(total: float, count: float, digits: int = 1) -> float | None:
    return round(total / count, digits) if count else None


def describe(system: str, spec: LoadSpec, result: LoadResult) -> Row:
    errors = {code: n for code, n in sorted(result.codes.items()) if code != "OK"}
    return {
        "system": system,
        "streams": spec.users,
        "calls": result.streams_run,
        "recorded": result.streams,
        "words": result.words,
        "messages": result.messages,
        "wall_s": round(result.wall_s, 3),
        "words_per_s": _per(result.words, result.wall_s),
        "messages_per_s": _per(result.messages, result.wall_s),
        "words_per_message": _per(result.words, result.messages, 2),
        "ttfc_ms": summarize_ms(result.ttfc),
        "gap_ms": summarize_ms(result.gaps) if spec.record_gaps else None,
        "duration_ms": summarize_ms(result.duration),
        "ok": result.codes.get("OK", 0),
        "errors": errors,
        "client_cpu_s": round(result.client_cpu_s, 3),
        "client_workers": result.workers,
    }


# Figures of a row whose repeats are summarised (median and spread); paths into the row.
REPEATED: tuple[tuple[str, ...], ...] = (
    ("words_per_s",),
    ("messages_per_s",),
    ("words_per_message",),
    ("server_cpu_us_per_word",),
    ("server_cpu_us_per_message",),
    ("server_cpu_us_per_call",),
    ("ttfc_ms", "p50"),
    ("ttfc_ms", "p99"),
)


def _read(row: Row, path: tuple[str, ...]) -> Any:
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def combine(runs: Sequence[Row]) -> Row:
    """Repeats of one measurement as one row: each repeated figure is the median of the runs, and
    `repeats` keeps every run's value and the spread. The rest is the run of median throughput."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r.get("words_per_s") or 0.0)
    row = {**ordered[len(ordered) // 2], "ttfc_ms": dict(ordered[len(ordered) // 2]["ttfc_ms"])}
    repeats: dict[str, Any] = {"n": len(runs)}
    for path in REPEATED:
        values = [v for r in runs if isinstance(v := _read(r, path), int | float)]
        if len(values) != len(runs):
            continue
        middle = median(values)
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = None if middle is None else round(middle, 3)
        repeats[".".join(path)] = spread(values) | {"values": values}
    row["repeats"] = repeats
    return row


def compare(row: Row, baseline: Row | None) -> Row:
    """Add the ratios to the baseline row of the same load (same streams) in place; returns the row."""
    if baseline is None or row is baseline:
        return row
    row["vs_baseline"] = {
        "baseline": baseline["system"],
        "words_per_s_ratio": ratio(row.get("words_per_s"), baseline.get("words_per_s")),
        "messages_per_s_ratio": ratio(row.get("messages_per_s"), baseline.get("messages_per_s")),
        "cpu_per_word_ratio": ratio(row.get("server_cpu_us_per_word"), baseline.get("server_cpu_us_per_word")),
        **{
            f"ttfc_{q}_added_ms": minus(row["ttfc_ms"].get(q), baseline["ttfc_ms"].get(q))
            for q in ("p50", "p95", "p99")
        },
    }
    return row


def not_measured(system: str, reason: str, **extra: Any) -> Row:
    return {"system": system, **extra, "not_measured": reason}
