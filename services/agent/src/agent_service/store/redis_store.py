"""The shared store: conversations in Redis, so any replica serves any session.

Every key of a session shares one hash tag, `agent:{<owner>/<session id>}:...`, so the
scripts below touch a single slot (Redis Cluster works too). The lease is a key set
with NX and an expiry of `AGENT_SESSION_LEASE_S`, renewed at a third of that while the
turn runs; its value is a token from a per-session counter, and every write is a
script that checks the lease still holds that token (a fencing token): a process that
paused past its lease and woke up cannot overwrite the turn of the replica that took
the session over. A crashed process's lease simply expires.

Redis unreachable: every operation gives up within about a second
(`StoreUnavailableError`, UNAVAILABLE) instead of waiting for the client's deadline.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from strands.types.content import Message

from agent_service.store.base import BUSY_POLL_S, BUSY_WAIT_S, SessionBusyError, SessionKey, StoreUnavailableError

T = TypeVar("T")
CONNECT_TIMEOUT_S = 0.5
OPERATION_TIMEOUT_S = 1.0

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_FENCED_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""
_FENCED_DEL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast: short timeouts, no retries (the caller decides what to do)."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=OPERATION_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=10,
    )


class RedisLease:
    """A session's lease in Redis, renewed in the background while held."""

    def __init__(self, store: RedisStore, key: SessionKey, token: str, lease_s: float) -> None:
        self.key = key
        self._store = store
        self._token = token
        self._prefix = f"agent:{{{key.owner}/{key.session_id}}}:"
        self._lease_key = self._prefix + "lease"
        self._lease_ms = int(lease_s * 1000)
        self._held = True
        self._lost_callbacks: builtins.list[Callable[[], None]] = []
        self._renewal = asyncio.get_running_loop().create_task(self._renew_forever(lease_s / 3))

    async def write(self, key: str, data: bytes) -> None:
        await self._fenced(_FENCED_SET, self._prefix + "blob:" + key, data)

    async def read(self, key: str) -> bytes | None:
        return _bytes(await self._store.call(lambda client: client.get(self._prefix + "blob:" + key)))

    async def delete(self, key: str) -> None:
        await self._fenced(_FENCED_DEL, self._prefix + "blob:" + key)

    async def list(self, query: str) -> builtins.list[str]:
        pattern = self._prefix + "blob:" + query.replace("*", r"\*") + "*"

        async def scan(client: aioredis.Redis) -> builtins.list[str]:
            found = [key.decode() async for key in client.scan_iter(match=pattern, count=500)]
            return sorted(key[len(self._prefix) + len("blob:") :] for key in found)

        return await self._store.call(scan)

    async def read_journal(self) -> str | None:
        data = _bytes(await self._store.call(lambda client: client.get(self._prefix + "journal")))
        return None if data is None else data.decode()

    async def write_journal(self, partial: str) -> None:
        await self._fenced(_FENCED_SET, self._prefix + "journal", partial.encode())

    async def clear_journal(self) -> None:
        await self._fenced(_FENCED_DEL, self._prefix + "journal")

    async def legacy_messages(self) -> builtins.list[Message] | None:
        return None

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callbacks.append(callback)

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._renewal.cancel()
        with contextlib.suppress(StoreUnavailableError):  # unreachable: the lease expires by itself
            await self._store.call(lambda client: client.eval(_RELEASE, 1, self._lease_key, self._token))

    async def _fenced(self, script: str, key: str, *data: bytes) -> None:
        if not self._held:
            raise StoreUnavailableError(f"session {self.key.session_id!r} was written after its lease was released")
        done = await self._store.call(lambda client: client.eval(script, 2, self._lease_key, key, self._token, *data))
        if not done:
            self._lose()
            raise StoreUnavailableError(
                f"the lease of session {self.key.session_id!r} was lost; the turn was not saved"
            )

    async def _renew_forever(self, interval_s: float) -> None:
        while self._held:
            await asyncio.sleep(interval_s)
            try:
                renewed = await self._store.call(
                    lambda client: client.eval(_RENEW, 1, self._lease_key, self._token, self._lease_ms)
                )
            except StoreUnavailableError:
                renewed = 0
            if not renewed and self._held:
                self._lose()
                return

    def _lose(self) -> None:
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:
            callback()


class RedisStore:
    """Session data and leases in Redis (`AGENT_SESSION_STORE=redis://...` or `rediss://...`)."""

    name = "redis"

    def __init__(self, url: str, lease_s: float) -> None:
        self._url = url
        self._lease_s = lease_s
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}

    async def lease(self, key: SessionKey) -> RedisLease:
        prefix = f"agent:{{{key.owner}/{key.session_id}}}:"
        ttl_ms = int(self._lease_s * 1000)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUSY_WAIT_S
        while True:
            token = await self.call(lambda client: client.eval(_ACQUIRE, 2, prefix + "lease", prefix + "fence", ttl_ms))
            if token:
                return RedisLease(self, key, str(token), self._lease_s)
            if loop.time() >= give_up:
                raise SessionBusyError(key)
            await asyncio.sleep(BUSY_POLL_S)

    async def check(self) -> None:
        await self.call(lambda client: client.ping())

    async def call(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one operation with this loop's client; any Redis failure becomes StoreUnavailableError."""
        try:
            return await operation(self._client())
        except RedisError as exc:
            raise StoreUnavailableError(_describe(exc)) from exc
        except OSError as exc:
            raise StoreUnavailableError(_describe(exc)) from exc

    def _client(self) -> aioredis.Redis:
        """One client per event loop: strands restores and saves some snapshots on loops of its own."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for stale in [other for other in self._clients if other.is_closed()]:
                del self._clients[stale]
            client = self._clients[loop] = connect(self._url)
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
