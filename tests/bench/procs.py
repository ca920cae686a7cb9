"""Server processes under measurement: start, wait until ready, read CPU time and RSS, stop.

Every server (the agent service, the raw baseline, the seed server, Envoy) runs as its own
process on 127.0.0.1 and an ephemeral port, so its CPU time and memory are its own. A server
of several processes (`AGENT_WORKERS`, the raw baseline's `--processes`) is measured as a
whole: CPU time summed over the process and its children, memory as the sum of their PSS
(pages the fork shares counted once, not once per process as RSS would).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

REPO = Path(__file__).resolve().parents[2]

# Run the service on uvloop without touching its code: install the policy, then its own main().
_UVLOOP_SERVICE = (
    "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from agent_service.server import main; main()"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The harness's environment without AGENT_* / OTEL_* (so nothing leaks in), plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "OTEL_"))}
    env.update(overrides)
    return env


@dataclass
class ServerProcess:
    """One measured server process."""

    name: str
    address: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    listeners: int = 1  # processes that listen on the port once the server is ready
    proc: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.proc = psutil.Process(self.popen.pid)

    def _group(self) -> list[psutil.Process]:
        """The process and its children (a supervisor's workers)."""
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return [self.proc]

    def cpu_s(self) -> float:
        """User + system CPU time of the process (all its threads) and its children so far."""
        total = 0.0
        for process in self._group():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident memory: the RSS of a single process, the sum of PSS of a group."""
        group = self._group()
        if len(group) == 1:
            return int(self.proc.memory_info().rss)
        total = 0
        for process in group:
            with contextlib.suppress(psutil.Error):
                total += int(process.memory_full_info().pss)
        return total

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the port accepts a gRPC connection; raise with the log's tail if the process died first."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    if self._listening() >= self.listeners:
                        return
                    time.sleep(0.05)  # the other processes of a group are still starting
                except grpc.FutureTimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready at {self.address}:\n{self.log_tail()}") from None

    def _listening(self) -> int:
        """Processes of the group with a listening socket on the server's port."""
        port = int(self.address.rsplit(":", 1)[1])
        count = 0
        for process in self._group():
            with contextlib.suppress(psutil.Error):
                sockets = process.net_connections(kind="tcp")
                count += any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in sockets)
        return count

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass(frozen=True)
class Launch:
    """How to start one server: `argv` listening on 127.0.0.1:`port` once `listeners` processes listen."""

    name: str
    argv: Sequence[str]
    port: int
    env: Mapping[str, str]
    listeners: int = 1


def launch(spec: Launch, log_dir: Path) -> ServerProcess:
    """Start the server's process and return at once (`ServerProcess.wait_ready` waits for it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-{spec.port}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(list(spec.argv), env=dict(spec.env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return ServerProcess(spec.name, f"127.0.0.1:{spec.port}", popen, log_path, spec.listeners)


@contextlib.contextmanager
def running(spec: Launch, log_dir: Path, ready_timeout_s: float = 60.0) -> Iterator[ServerProcess]:
    """The server, yielded once ready, stopped at the end."""
    server = launch(spec, log_dir)
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()


def raw_launch(
    *, words: int, delay_ms: float, coalesce: float = 1, loop: str = "asyncio", processes: int = 1
) -> Launch:
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.servers", "raw", f"--port={port}", f"--words={words}"]
    argv += [f"--delay-ms={delay_ms}", f"--coalesce={coalesce}", f"--loop={loop}", f"--processes={processes}"]
    name = f"raw-{loop}" + (f"-p{processes}" if processes > 1 else "")
    return Launch(name, argv, port, clean_env({}), listeners=processes)


def seed_server(
    log_dir: Path, *, words: int, delay_ms: float, workers: int = 10
) -> contextlib.AbstractContextManager[ServerProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.servers", "seed", f"--port={port}", f"--words={words}"]
    argv += [f"--delay-ms={delay_ms}", f"--workers={workers}"]
    return running(Launch("seed", argv, port, clean_env({})), log_dir)


def service_launch(
    data_dir: Path,
    *,
    words: int,
    delay_ms: float,
    telemetry_env: Mapping[str, str],
    uvloop: bool = False,
    workers: int = 1,
    replica: int = 0,
) -> Launch:
    """The agent service as `python -m agent_service.server` with the demo model (`workers`: AGENT_WORKERS;
    `replica`: its number among several separate processes, which are measured apart)."""
    port = free_port()
    env = clean_env(
        {
            "AGENT_MODEL_PROVIDER": "demo",
            "AGENT_GRPC_HOST": "127.0.0.1",
            "AGENT_GRPC_PORT": str(port),
            "AGENT_DEMO_TOKEN_DELAY_MS": str(delay_ms),
            "AGENT_DEMO_REPLY_WORDS": str(words),
            "AGENT_MAX_TOKENS": str(max(1024, words + 16)),
            "AGENT_MAX_CONCURRENT_STREAMS": "100000",
            # Every load client calls from 127.0.0.1, one anonymous caller: no per-caller cap here.
            "AGENT_MAX_STREAMS_PER_PRINCIPAL": "100000",
            "AGENT_MAX_SESSIONS": "100000",
            "AGENT_LOG_LEVEL": "warning",
            "AGENT_LOG_FORMAT": "json",
            "AGENT_DATA_DIR": str(data_dir),
            "AGENT_SHUTDOWN_GRACE_S": "2",
            "AGENT_WORKERS": str(workers),
            **telemetry_env,
        }
    )
    argv = [sys.executable, "-c", _UVLOOP_SERVICE] if uvloop else [sys.executable, "-m", "agent_service.server"]
    name = ("service-uvloop" if uvloop else "service") + (f"-w{workers}" if workers > 1 else "")
    name += f"-r{replica}" if replica else ""
    return Launch(name, argv, port, env, listeners=workers)


class RssSampler:
    """Samples the RSS of some processes every `interval_s` in a thread; keeps each one's peak."""

    def __init__(self, servers: Sequence[ServerProcess], interval_s: float = 0.1) -> None:
        self._servers = list(servers)
        self._interval_s = interval_s
        self.peak: dict[str, int] = {s.name: 0 for s in self._servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for server in self._servers:
                with contextlib.suppress(psutil.Error):
                    self.peak[server.name] = max(self.peak[server.name], server.rss())
            if self._stop.wait(self._interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
