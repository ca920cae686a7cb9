"""The shared store: conversations in Redis, so any replica serves any session.

Every key of a session shares one hash tag, `agent:{<owner>/<session id>}:...`, so the
scripts below touch a single slot (Redis Cluster works too). The lease is a key set
with NX and an expiry of `AGENT_SESSION_LEASE_S`, renewed at a third of that while the
turn runs; its value is a token from a per-session counter, and every write is a
script that checks the lease still holds that token (a fencing token): a process that
paused past its lease and woke up cannot overwrite the turn of the replica that took
the session over. A crashed process's lease simply expires.

Redis unreachable: connecting gives up after 0.4 s (twice at most) and a stopped server is
noticed at once (`StoreUnavailableError`, UNAVAILABLE), instead of waiting for the
client's deadline; an answer slower than `OPERATION_TIMEOUT_S` counts as unreachable too.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from strands.types.content import Message

from agent_service.store.base import (
    BUSY_POLL_S,
    BUSY_WAIT_S,
    QueueFullError,
    SessionBusyError,
    SessionKey,
    StoreUnavailableError,
    Waiting,
)
from agent_service.store.redis_runs import RedisRunLog

T = TypeVar("T")
CONNECT_TIMEOUT_S = 0.4
OPERATION_TIMEOUT_S = 2.0

# KEYS: lease, fence, queue; ARGV: lease ms, waiter id, enqueue (0/1), queue limit, waiter key prefix, waiter ms.
# The queue is a sorted set of waiters by arrival; a waiter's liveness key expires unless it keeps
# polling, so a waiter that crashed leaves the line instead of blocking it. Returns the fencing
# token, 0 (busy: refused, or still in line), or -1 (the line is full).
_ACQUIRE = """
local queue = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, waiter in ipairs(queue) do
  if redis.call('EXISTS', ARGV[5] .. waiter) == 0 then redis.call('ZREM', KEYS[3], waiter) end
end
local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if redis.call('EXISTS', KEYS[1]) == 0 and (not first or first == ARGV[2]) then
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('DEL', ARGV[5] .. ARGV[2])
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
  return token
end
if ARGV[3] == '0' then return 0 end
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return -1 end
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[3] .. ':arrivals'), ARGV[2])
end
redis.call('SET', ARGV[5] .. ARGV[2], 1, 'PX', ARGV[6])
return 0
"""
# Every script below starts by checking that the caller still holds the lease. A lease may
# lapse while its holder is alive but stalled (a long pause of its event loop): as long as
# nobody else was granted the session since (the fence counter still holds the caller's
# token), the holder takes it back instead of losing its turn.
# KEYS: lease, fence[, target]; ARGV: token, lease ms[, data]
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder or redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
"""
_RENEW = _HOLD + "return redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
_FENCED_SET = _HOLD + "redis.call('SET', KEYS[3], ARGV[3])\nreturn 1\n"
_FENCED_DEL = _HOLD + "redis.call('DEL', KEYS[3])\nreturn 1\n"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast: short timeouts, one immediate retry on a broken connection.

    The retry is for a pooled connection that died meanwhile (Redis restarted): without it
    the first command after a restart fails. A Redis that is down still fails within a second.
    """
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=OPERATION_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=10,
    )


class RedisLease:
    """A session's lease in Redis, renewed in the background while held."""

    def __init__(self, store: RedisStore, key: SessionKey, token: str, lease_s: float) -> None:
        self.key = key
        self._store = store
        self._token = token
        self._prefix = session_prefix(key)
        self._lease_key = self._prefix + "lease"
        self._fence_key = self._prefix + "fence"
        self._lease_ms = int(lease_s * 1000)
        self._held = True
        self._lost_callbacks: builtins.list[Callable[[], None]] = []
        self._stop_watching: Callable[[], None] | None = None
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

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        self._stop_watching = self._store.watch_interrupt(self.key, callback)

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._renewal.cancel()
        if self._stop_watching is not None:
            self._stop_watching()
        with contextlib.suppress(StoreUnavailableError):  # unreachable: the lease expires by itself
            await self._store.call(lambda client: client.eval(_RELEASE, 1, self._lease_key, self._token))

    async def _fenced(self, script: str, key: str, *data: bytes) -> None:
        if not self._held:
            raise StoreUnavailableError(f"session {self.key.session_id!r} was written after its lease was released")
        done = await self._store.call(
            lambda client: client.eval(
                script, 3, self._lease_key, self._fence_key, key, self._token, self._lease_ms, *data
            )
        )
        if not done:
            self._lose()
            raise StoreUnavailableError(
                f"the lease of session {self.key.session_id!r} was lost; the turn was not saved"
            )

    async def _renew_forever(self, interval_s: float) -> None:
        """Extend the lease every `interval_s`; it is lost only when another holder was granted the session.

        A renewal that fails to reach Redis is retried at the next tick: if the lease lapses
        meanwhile and nobody takes the session, the next renewal (or write) takes it back.
        """
        while self._held:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(StoreUnavailableError):
                renewed = await self._store.call(
                    lambda client: client.eval(_RENEW, 2, self._lease_key, self._fence_key, self._token, self._lease_ms)
                )
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
        self._interrupt_callbacks: dict[str, builtins.list[Callable[[], None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.runs = RedisRunLog(self)

    async def lease(self, key: SessionKey, waiting: Waiting | None = None) -> RedisLease:
        """The session's lease; waiting in line keeps arrival order across every replica."""
        prefix = session_prefix(key)
        ttl_ms = int(self._lease_s * 1000)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUSY_WAIT_S if waiting is None else waiting.until
        waiter = uuid.uuid4().hex
        limit = 0 if waiting is None else waiting.queue_limit
        keys = (prefix + "lease", prefix + "fence", prefix + "queue")
        enqueue = "0" if waiting is None else "1"
        liveness_ms = int(max(1.0, BUSY_POLL_S * 50) * 1000)
        while True:
            token = await self.call(
                lambda client: client.eval(
                    _ACQUIRE, 3, *keys, ttl_ms, waiter, enqueue, limit, prefix + "waiter:", liveness_ms
                )
            )
            if token == -1:
                raise QueueFullError(key, limit)
            if token:
                return RedisLease(self, key, str(token), self._lease_s)
            if loop.time() >= give_up:
                raise SessionBusyError(key)
            await asyncio.sleep(BUSY_POLL_S)

    async def interrupt(self, key: SessionKey) -> None:
        await self.call(lambda client: client.publish(session_prefix(key) + "interrupt", b"1"))

    def watch_interrupt(self, key: SessionKey, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when an interrupt for `key` is published; returns the function that stops watching."""
        channel = session_prefix(key) + "interrupt"
        self._interrupt_callbacks.setdefault(channel, []).append(callback)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen_forever())

        def stop() -> None:
            callbacks = self._interrupt_callbacks.get(channel, [])
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            if not callbacks:
                self._interrupt_callbacks.pop(channel, None)

        return stop

    async def _listen_forever(self) -> None:
        """One pattern subscription per process for every session's interrupts (reconnecting on failure)."""
        while True:
            # Its own client: a subscription waits for messages indefinitely, past the operation timeout.
            client = aioredis.Redis.from_url(
                self._url, socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe("agent:*:interrupt")
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                    for callback in self._interrupt_callbacks.pop(channel, []):
                        callback()
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()

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
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def session_prefix(key: SessionKey) -> str:
    """Every key of a session shares one hash tag (one Redis Cluster slot)."""
    return f"agent:{{{key.owner}/{key.session_id}}}:"


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
