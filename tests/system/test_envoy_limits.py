"""Abuse limits at the edge, each refused by Envoy at once with a clear status: a caller's rate
(per principal, per address without auth), the JSON door's body size (413 before Envoy holds
more than the limit: its memory is measured), and the agent cluster's streams in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil

from agent_service.proto import agent_pb2
from tests.support.servers import collect, read_until_error
from tests.support.tokens import Issuer
from tests.system.conftest import front_door
from tests.system.front_door import wait_until
from tests.system.test_envoy_identity import bearer, grpc_call, grpc_web_call, secured_door, sse_call

MB = 1 << 20
# The Envoy container's memory limit in compose and Kubernetes.
ENVOY_MEMORY_LIMIT = 256 * MB


async def test_the_rate_limit_is_per_principal_and_leaves_others_served(tmp_path: Path) -> None:
    issuer = Issuer()
    alice, bob = bearer(issuer.token(sub="alice")), bearer(issuer.token(sub="bob"))
    async with (
        secured_door(tmp_path, issuer, ENVOY_RATE_LIMIT_CALLS="3", ENVOY_RATE_LIMIT_INTERVAL="60s") as door,
        httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
    ):
        assert [await grpc_call(door, alice) for _ in range(2)] == [("OK", "")] * 2
        assert (await grpc_web_call(client, alice))[0] == "OK"  # the doors share alice's bucket
        refused = await grpc_call(door, alice)
        assert refused == ("RESOURCE_EXHAUSTED", "too many calls: at most 3 per 60s per caller")
        assert await grpc_web_call(client, alice) == refused
        assert await sse_call(client, alice) == (429, refused[1])
        # Another principal is served all the while.
        assert await grpc_call(door, bob) == ("OK", "")
        status, last = await sse_call(client, bob)
        assert status == 200 and '"done"' in last
        entries = await door.envoy.access_log(lambda found: sum(e["response_flags"] == "RL" for e in found) >= 3)
    limited = [(e["principal"], e["grpc_status"], e["upstream_host"]) for e in entries if e["response_flags"] == "RL"]
    assert limited == [("alice", "ResourceExhausted", None)] * 3


async def test_without_auth_the_rate_limit_is_per_client_address(tmp_path: Path) -> None:
    async with front_door(tmp_path, envoy_vars={"ENVOY_RATE_LIMIT_CALLS": "2"}) as door:
        first = httpx.AsyncClient(base_url=door.envoy.url, timeout=30)
        second = httpx.AsyncClient(
            base_url=door.envoy.url, timeout=30, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        )
        async with first, second:
            assert [(await sse_call(first, {}))[0] for _ in range(3)] == [200, 200, 429]
            assert (await sse_call(second, {}))[0] == 200
        entries = await door.envoy.access_log_of("/v1/chat:stream", count=4)
    by_address = [
        (e["downstream_remote_address"].split(":")[0], e["response_code"])
        for e in entries
        if e["path"] == "/v1/chat:stream"
    ]
    assert by_address == [("127.0.0.1", 200), ("127.0.0.1", 200), ("127.0.0.1", 429), ("127.0.0.2", 200)]


class RssSampler:
    """A process's resident memory, sampled every 10 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.after = self.process.memory_info().rss


def big_json_body(megabytes: int) -> Iterator[bytes]:
    """A `{"content": "xxx..."}` body of about `megabytes` MB, streamed (chunked) 1 MB at a time."""
    yield b'{"content":"'
    chunk = b"x" * MB
    for _ in range(megabytes):
        yield chunk
    yield b'"}'


async def test_a_100_mb_post_gets_413_and_envoy_never_holds_it(tmp_path: Path) -> None:
    async with front_door(tmp_path) as door, httpx.AsyncClient(base_url=door.envoy.url, timeout=120) as client:
        with RssSampler(door.envoy.process.pid) as rss:
            started = time.monotonic()
            # httpx's sync client reads the answer Envoy sends while the body is still going out.
            response = await asyncio.to_thread(
                httpx.post,
                f"{door.envoy.url}/v1/chat:stream",
                content=big_json_body(100),
                headers={"content-type": "application/json"},
                timeout=120,
            )
            took = time.monotonic() - started
        print(
            f"100 MB POST: HTTP {response.status_code} in {took:.2f} s; Envoy RSS before {rss.before / MB:.1f} MB, "
            f"peak {rss.peak / MB:.1f} MB, after {rss.after / MB:.1f} MB"
        )
        assert response.status_code == 413
        assert response.json() == {"code": 8, "message": "the request body is larger than 1048576 bytes"}
        assert rss.peak - rss.before < 16 * MB, "Envoy held the body (the transcoder alone took 570 MB)"
        assert rss.peak < ENVOY_MEMORY_LIMIT
        # Just under the limit is still served (and refused by the agent for its length, not by Envoy).
        response = await client.post("/v1/chat:stream", json={"content": "x" * (MB - 100)})
        assert response.status_code == 400 and "characters" in response.json()["message"]
        assert door.agent.server.admission.in_flight == 0


async def test_the_agent_cluster_at_its_stream_limit_refuses_at_once(tmp_path: Path) -> None:
    """ENVOY_AGENT_MAX_STREAMS in flight: the next call is refused by Envoy in milliseconds, on every door,
    with RESOURCE_EXHAUSTED (HTTP 503 on the JSON door), never queued until its deadline."""
    async with (
        front_door(
            tmp_path, envoy_vars={"ENVOY_AGENT_MAX_STREAMS": "2"}, demo_token_delay_ms=100, demo_reply_words=50
        ) as door,
        httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
    ):
        running = [door.stub.StreamChat(agent_pb2.ChatRequest(content="a long story"), timeout=30) for _ in range(2)]
        for call in running:
            await call.read()
        await wait_until(lambda: door.agent.server.admission.in_flight == 2, "two streams in flight")
        message = "the agent is at its limit of 2 streams in flight; retry later"
        started = time.monotonic()
        _, error = await read_until_error(door.stub.StreamChat(agent_pb2.ChatRequest(content="hi"), timeout=20))
        assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        assert await grpc_web_call(client, {}) == ("RESOURCE_EXHAUSTED", message)
        assert await sse_call(client, {}) == (503, message)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"three refusals took {elapsed:.2f} s"
        assert door.agent.server.admission.in_flight == 2  # the agent never saw them
        for call in running:
            call.cancel()
        await asyncio.gather(*(collect(call) for call in running), return_exceptions=True)
        entries = await door.envoy.access_log(lambda found: sum(e["response_flags"] == "UO" for e in found) >= 3)
    overflowed = [e["grpc_status"] for e in entries if e["response_flags"] == "UO"]
    assert overflowed == ["ResourceExhausted"] * 3
