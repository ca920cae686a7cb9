"""The `agent-service` console script as a test process: ephemeral loopback ports, stderr kept in a file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import free_port

CHANNEL_READY_S = 30


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    target: str
    log: Path  # the process's stderr: its JSON log lines


@contextmanager
def service_process(tmp_path: Path, **settings: str) -> Iterator[ServiceProcess]:
    """`agent-service` on ephemeral loopback ports (gRPC and metrics), its stderr captured in a file."""
    port = free_port()
    defaults = dict(
        AGENT_MODEL_PROVIDER="demo",
        AGENT_GRPC_HOST="127.0.0.1",
        AGENT_GRPC_PORT=str(port),
        AGENT_METRICS_HOST="127.0.0.1",
        AGENT_METRICS_PORT="0",
        AGENT_DEMO_TOKEN_DELAY_MS="20",
        AGENT_SHUTDOWN_GRACE_S="1.5",
        AGENT_DATA_DIR=str(tmp_path / "data"),
        AGENT_LOG_FORMAT="json",
    )
    env = {**os.environ, **defaults, **settings}
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / f"agent-{port}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "agent_service.server"], env=env, stderr=stderr)
        try:
            yield ServiceProcess(process, f"127.0.0.1:{port}", log)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
