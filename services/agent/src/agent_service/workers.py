"""`AGENT_WORKERS` > 1: a supervisor and that many worker processes serving one gRPC port.

Python runs one event loop on one core, so one process serves at most one core's worth of
streams. As in grpc's `examples/python/multiprocessing`, the supervisor reserves the port
(SO_REUSEPORT), then forks the workers before any gRPC object exists in it (grpc's state does
not survive a fork); each worker runs a whole `AgentServer` bound to the same address with
`grpc.so_reuseport`, and the kernel spreads connections (not calls) across them.

The supervisor owns what describes the group: `/metrics` (every worker's values, through
prometheus_client's multiprocess files in a fresh directory per run) and `/healthz` (200 only
while every worker is alive and serving, from heartbeats in shared memory). A worker that dies
is restarted with a bounded back-off; SIGTERM or SIGINT is passed to every worker, each drains
as a single process does, and the supervisor exits once all have (0 when every one drained).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import ForkProcess

import structlog
from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead

from agent_service.models.factory import preload
from agent_service.server import AgentServer, serve
from agent_service.settings import Settings
from agent_service.telemetry import tracing
from agent_service.telemetry.metrics import MetricsEndpoint, group_registry, serve_http

HEARTBEAT_S = 0.25  # how often a worker reports whether it is serving
STALE_S = 5.0  # a worker silent this long (a wedged event loop) counts as not serving
RESTART_FIRST_S = 0.5  # back-off before the first restart of a worker; doubles per quick failure
RESTART_MAX_S = 30.0
STABLE_S = 30.0  # a worker that ran this long before dying restarts after the first back-off again
_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Heartbeats:
    """Per worker, the CLOCK_MONOTONIC time it last reported serving (0: not serving); shared memory, set up
    before the fork. CLOCK_MONOTONIC is system-wide on Linux, so the supervisor can compare it with its own."""

    def __init__(self, count: int) -> None:
        # No lock: a worker killed mid-write must not leave one held; an aligned double is written whole.
        self._beats = multiprocessing.get_context("fork").RawArray("d", count)

    def beat(self, index: int, serving: bool) -> None:
        self._beats[index] = time.monotonic() if serving else 0.0

    def clear(self, index: int) -> None:
        self._beats[index] = 0.0

    def fresh(self, index: int, now: float) -> bool:
        beat = float(self._beats[index])
        return beat > 0.0 and now - beat < STALE_S


@dataclass
class _Slot:
    """One worker's place in the group, across its restarts."""

    index: int
    process: ForkProcess | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    served: bool = False  # this slot's worker has reported serving at least once


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) the gRPC address with SO_REUSEPORT: the port is the group's until this socket closes.

    With port 0 the kernel picks a free one, which every worker then binds too.
    """
    address = host.strip("[]") or "::"
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """The parent process of a group of workers: forks, watches, restarts, reports and stops them."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.log = structlog.get_logger("agent_service")
        self._context = multiprocessing.get_context("fork")
        self._beats = Heartbeats(count)
        self._slots = [_Slot(index) for index in range(count)]
        self._pid = os.getpid()
        self._worker_settings = settings
        self._reservation: socket.socket | None = None
        self._metrics_dir: str | None = None
        self._endpoint: MetricsEndpoint | None = None
        self._stopping = False
        self._failed = False
        self._serving_logged = False
        self._wakeup_r = self._wakeup_w = -1

    # --- the supervisor ------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a worker that cannot start; the process's exit code."""
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        try:
            self._reservation = reserve_port(self.settings.grpc_host, self.settings.grpc_port)
        except OSError as error:
            self.log.error("server.failed", address=address, error=f"could not bind {address}: {error}")
            return 1
        port = int(self._reservation.getsockname()[1])
        self._worker_settings = self.settings.model_copy(update={"grpc_port": port})
        if self.settings.metrics_enabled:
            # Read by prometheus_client in each worker (see `_worker_main`); inherited through the fork.
            self._metrics_dir = tempfile.mkdtemp(prefix="agent-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        previous_fd = signal.set_wakeup_fd(self._wakeup_w)
        try:
            return self._supervise(f"{self.settings.grpc_host}:{port}", port)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            if self._endpoint is not None:
                self._endpoint.close()
            self._reservation.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Only a flag: the main loop (woken by the wakeup fd) does the rest, outside the handler."""
        self._stopping = True

    def _supervise(self, address: str, port: int) -> int:
        preload(self.settings)
        # What the supervisor built so far is every worker's too: out of the collector's reach, its pages
        # stay shared instead of being copied into each worker by the first full collection there.
        gc.collect()
        gc.freeze()
        for slot in self._slots:
            self._spawn(slot)
        if self.settings.metrics_enabled and self._metrics_dir is not None:
            try:
                registry = group_registry(self._metrics_dir, self._pids)
                self._endpoint = serve_http(
                    registry, self.settings.metrics_host, self.settings.metrics_port, serving=self.serving
                )
            except OSError as error:
                self.log.error("server.failed", error=f"metrics port {self.settings.metrics_port}: {error}")
                self._failed = self._stopping = True
        while not self._stopping:
            self._wait(1.0 if self._serving_logged else HEARTBEAT_S)
            now = time.monotonic()
            for slot in self._slots:
                self._check(slot, now)
            if not self._serving_logged and all(slot.served for slot in self._slots):
                self._serving_logged = True
                self.log.info(
                    "server.start",
                    address=address,
                    port=port,
                    workers=self.count,
                    pids=self._pids()[1:],
                    provider=self.settings.model_provider,
                    model=self.settings.resolved_model_id(),
                    metrics_port=self._endpoint.port if self._endpoint else None,
                    metrics_dir=self._metrics_dir,
                )
        return self._shutdown()

    def _wait(self, timeout_s: float) -> None:
        """Until a worker exits, a signal arrives or the timeout (the next restart or health check) passes."""
        sentinels: list[int] = [slot.process.sentinel for slot in self._slots if slot.process is not None]
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        if due:
            timeout_s = max(0.0, min(timeout_s, min(due) - time.monotonic()))
        if self._wakeup_r in wait([self._wakeup_r, *sentinels], timeout_s):
            os.read(self._wakeup_r, 512)

    def _check(self, slot: _Slot, now: float) -> None:
        """Notice a worker that exited (schedule its restart) or one due to restart; track first readiness."""
        process = slot.process
        if process is not None and process.exitcode is not None:
            self._reap(slot)
            if self._stopping:
                return
            if not slot.served and not self._serving_logged:
                # It never served, nor had the group: a configuration or start-up fault, not a crash to retry.
                self.log.error("worker.failed", worker=slot.index, pid=process.pid, exit=_describe(process.exitcode))
                self._failed = self._stopping = True
                return
            slot.failures = 1 if now - slot.started >= STABLE_S else slot.failures + 1
            delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (slot.failures - 1))
            slot.restart_at = now + delay
            self.log.warning(
                "worker.exit",
                worker=slot.index,
                pid=process.pid,
                exit=_describe(process.exitcode),
                uptime_s=round(now - slot.started, 3),
                restart_in_s=delay,
            )
        elif process is None and slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
            self._spawn(slot)
        elif process is not None and not slot.served and self._beats.fresh(slot.index, now):
            slot.served = True

    def _reap(self, slot: _Slot) -> None:
        process = slot.process
        if process is None:
            return
        process.join()
        slot.process = None
        self._beats.clear(slot.index)
        if self._metrics_dir is not None and process.pid is not None:
            mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]  # live gauges go

    def _spawn(self, slot: _Slot) -> None:
        self._beats.clear(slot.index)
        slot.served = False
        slot.restart_at = None
        process = self._context.Process(target=self._worker_main, args=(slot.index,), name=f"agent-worker-{slot.index}")
        # Signals wait until the child has put its own handlers in place (see `_worker_main`).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.process, slot.started = process, time.monotonic()
        self.log.info("worker.start", worker=slot.index, pid=process.pid)

    def _shutdown(self) -> int:
        """Every worker drains (SIGTERM), bounded by the drain's own bounds plus a margin; then the exit code."""
        limit_s = self.settings.shutdown_grace_s + 2 * self.settings.cancel_grace_s + 10
        live = [slot for slot in self._slots if slot.process is not None]
        self.log.info("server.drain", workers=len(live), grace_s=self.settings.shutdown_grace_s)
        for slot in live:
            pid = slot.process.pid if slot.process is not None else None
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + limit_s
        clean = not self._failed
        for slot in live:
            process = slot.process
            assert process is not None
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                self.log.error("worker.killed", worker=slot.index, pid=process.pid, after_s=limit_s)
                process.kill()
                process.join(5)
            # A worker still starting when the signal came dies of it at once: nothing was in flight.
            if process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
            self._reap(slot)
        self.log.info("server.stop", workers=self.count, clean=clean)
        return 0 if clean else 1

    # --- read from the metrics thread --------------------------------------------

    def serving(self) -> bool:
        """Every worker alive and serving (a fresh heartbeat), and no drain under way."""
        if self._stopping:
            return False
        now = time.monotonic()
        return all(slot.process is not None and self._beats.fresh(slot.index, now) for slot in self._slots)

    def _pids(self) -> list[int]:
        """The supervisor and its live workers."""
        found = [self._pid]
        for slot in self._slots:
            process = slot.process
            if process is not None and process.pid is not None:
                found.append(process.pid)
        return found

    # --- a worker ----------------------------------------------------------------

    def _worker_main(self, index: int) -> None:
        """In the forked child: drop what is the supervisor's, then serve as worker `index`."""
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # until the worker's loop handles them
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        if self._endpoint is not None:
            self._endpoint.server.socket.close()  # a restarted worker inherits the supervisor's listener
        if self._reservation is not None:
            self._reservation.close()
        structlog.contextvars.bind_contextvars(worker=index)
        if self._metrics_dir is not None:
            # prometheus_client chose its value class at import, before the supervisor set the directory.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        sys.exit(_run_worker(self._worker_settings, index, self._beats, self._pid))


def _run_worker(settings: Settings, index: int, beats: Heartbeats, supervisor_pid: int) -> int:
    log = structlog.get_logger("agent_service")
    provider = tracing.configure_tracing() if tracing.tracing_requested(os.environ) else None

    async def heartbeat(server: AgentServer, stop: asyncio.Event) -> None:
        while True:
            beats.beat(index, server.core.serving)
            if server.metrics is not None:
                server.metrics.refresh()
            if os.getppid() != supervisor_pid and not stop.is_set():
                log.warning("worker.orphaned", supervisor_pid=supervisor_pid)  # the supervisor was killed
                stop.set()
            await asyncio.sleep(HEARTBEAT_S)

    try:
        asyncio.run(serve(settings, traced=provider is not None, worker=index, alongside=heartbeat))
    except Exception as error:  # reported to the supervisor by the exit code
        log.error("worker.failed", error=f"{type(error).__name__}: {error}", exc_info=error)
        return 1
    finally:
        beats.clear(index)
        if provider is not None:
            provider.shutdown()  # flushes spans still batched
    return 0


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
        return f"signal {-exitcode}"
    return f"code {exitcode}"


def run_group(settings: Settings, count: int) -> int:
    """The `agent-service` console script with `count` > 1 workers; returns the exit code."""
    return Supervisor(settings, count).run()
