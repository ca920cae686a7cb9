"""`make bench`: load the real stack on loopback beside a raw grpc.aio baseline; write JSON, Markdown and a PNG.

    python -m tests.bench [--quick] [--scenario N ...] [--target HOST:PORT] [--out DIR]

Scenarios: 1 throughput, 2 time to first chunk, 3 capacity under slow streams, 4 telemetry cost,
5 the seed's thread-pool design, 6 levers (strands per token, coalescing, uvloop, Prometheus).
Results go to bench-results/<timestamp>/ (git-ignored): results.json, results.md, chart.png, logs/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.bench import report
from tests.bench.capacity import capacity, plan_capacity, plan_seed_design, seed_design
from tests.bench.common import TELEMETRY_MODES, Context
from tests.bench.config import FULL, QUICK
from tests.bench.latency import plan_time_to_first_chunk, time_to_first_chunk
from tests.bench.levers import levers, plan_levers
from tests.bench.load import LoadPool
from tests.bench.otlp_sink import OtlpSink
from tests.bench.procs import REPO
from tests.bench.throughput import plan_telemetry_cost, plan_throughput, telemetry_cost, throughput

SCENARIOS: dict[int, Callable[[Context], dict[str, Any]]] = {
    1: throughput,
    2: time_to_first_chunk,
    3: capacity,
    4: telemetry_cost,
    5: seed_design,
    6: levers,
}

# Each scenario's servers, launched together before the first scenario runs (their start-ups overlap).
PLANS: dict[int, Callable[[Context], None]] = {
    1: plan_throughput,
    2: plan_time_to_first_chunk,
    3: plan_capacity,
    4: plan_telemetry_cost,
    5: plan_seed_design,
    6: plan_levers,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=int, action="append", choices=sorted(SCENARIOS), help="repeatable")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path once, in well under a minute")
    parser.add_argument("--target", metavar="HOST:PORT", help="measure this address instead of starting the stack")
    parser.add_argument("--out", type=Path, help="results folder (default bench-results/<timestamp>)")
    parser.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--telemetry",
        choices=TELEMETRY_MODES,
        default="on",
        help="the stack's telemetry outside scenario 4 (default on: metrics and traces, as deployed)",
    )
    return parser.parse_args(argv)


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now()
    out = args.out or REPO / "bench-results" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    selected = sorted(set(args.scenario or SCENARIOS))
    results: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "quick": args.quick,
            "scenarios": selected,
            "target": args.target,
            "telemetry": args.telemetry,
            "client_workers": args.workers,
            "commit": _commit(),
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "scenarios": {},
    }
    with OtlpSink() as sink, LoadPool(args.workers) as pool:
        ctx = Context(QUICK if args.quick else FULL, pool, out, args.target, args.telemetry, sink)
        try:
            for number in selected:
                PLANS[number](ctx)
            pool.warm()
            failed = _run(ctx, selected, results, out)
        finally:
            ctx.close()
    results["meta"]["elapsed_s"] = round((dt.datetime.now() - started).total_seconds(), 1)
    results["meta"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    _write(out, results)
    png = report.chart(results, out / "chart.png")
    print(report.markdown(results))
    print(f"bench: results in {out} (results.json, results.md{', chart.png' if png else ''})", file=sys.stderr)
    return 1 if failed else 0


def _run(ctx: Context, selected: list[int], results: dict[str, Any], out: Path) -> bool:
    """Every selected scenario in turn; True when one failed (its error is in the results)."""
    failed = False
    for number in selected:
        print(f"bench: scenario {number} ({SCENARIOS[number].__name__}) ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            outcome = SCENARIOS[number](ctx)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            outcome = {"title": SCENARIOS[number].__name__, "reason": f"failed: {type(exc).__name__}: {exc}"}
        outcome["elapsed_s"] = round(time.monotonic() - began, 1)
        results["scenarios"][str(number)] = outcome
        _write(out, results)  # a partial result survives an interrupted run
    return failed


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results) + "\n")


if __name__ == "__main__":
    sys.exit(main())
