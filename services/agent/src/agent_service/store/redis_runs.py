"""Run event logs in Redis: one stream per run, read from any replica.

`agent:{run:<id>}:events` is a Redis stream whose entry ids are the events'
sequences (`<seq>-0`), so "after sequence N" is an exclusive XREAD/XRANGE start and a
follower blocks in XREAD until the next event; `agent:{run:<id>}:meta` holds the
owner. Both keys live `ttl` while the run may still run, and `retention` after it
ended. A stream is capped at `MAX_EVENTS` entries (oldest trimmed): resuming from
before the trim point is OUT_OF_RANGE.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from agent_service.core.errors import ChatError, ErrorKind

if TYPE_CHECKING:
    from agent_service.store.redis_store import RedisStore

MAX_EVENTS = 100_000
# A blocking read waits at most this long per round trip (under the client's operation timeout).
BLOCK_MS = 1000


def _keys(run_id: str) -> tuple[str, str]:
    prefix = f"agent:{{run:{run_id}}}:"
    return prefix + "meta", prefix + "events"


class RedisRunLog:
    """`RunLog` over Redis streams."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def start(self, run_id: str, owner: str, ttl_s: float) -> None:
        meta, _ = _keys(run_id)

        async def record(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(meta, mapping={"owner": owner})
                pipe.pexpire(meta, int(ttl_s * 1000))
                await pipe.execute()

        await self._store.call(record)

    async def append(self, run_id: str, records: list[dict[str, Any]]) -> None:
        meta, events = _keys(run_id)

        async def add(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for record in records:
                    entry = {"r": json.dumps(record, ensure_ascii=False)}
                    pipe.xadd(events, entry, id=f"{record['seq']}-0", maxlen=MAX_EVENTS, approximate=True)  # type: ignore[arg-type]
                pipe.pexpiretime(meta)
                results = await pipe.execute()
            expires_at_ms = results[-1]
            if expires_at_ms > 0:
                await client.pexpireat(events, expires_at_ms)

        await self._store.call(add)

    async def end(
        self, run_id: str, owner: str, retention_s: float, records: list[dict[str, Any]] | None = None
    ) -> None:
        meta, events = _keys(run_id)
        retention_ms = max(1, int(retention_s * 1000))

        async def finish(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                for record in records or ():
                    entry = {"r": json.dumps(record, ensure_ascii=False)}
                    pipe.xadd(events, entry, id=f"{record['seq']}-0", maxlen=MAX_EVENTS, approximate=True)  # type: ignore[arg-type]
                pipe.xadd(events, {"end": "1"})  # an automatic id: after every event's
                pipe.pexpire(meta, retention_ms)
                pipe.pexpire(events, retention_ms)
                await pipe.execute()

        await self._store.call(finish)

    async def owner(self, run_id: str) -> str | None:
        meta, _ = _keys(run_id)
        value = await self._store.call(lambda client: client.hget(meta, "owner"))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def read(self, run_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        _, events = _keys(run_id)
        if after > 0:
            first: Any = await self._store.call(lambda client: client.xrange(events, count=1))
            if first:
                first_seq = int(first[0][0].split(b"-")[0]) if isinstance(first[0][0], bytes) else 0
                if first_seq > after + 1 and b"r" in first[0][1]:
                    raise ChatError(
                        ErrorKind.OUT_OF_RANGE,
                        f"events before {first_seq} of run {run_id!r} are no longer kept; resume after {first_seq - 1}",
                    )
        block = max(1, min(BLOCK_MS, int(wait_s * 1000)))
        reply: Any = await self._store.call(
            lambda client: client.xread({events: f"{after}-0"}, count=1000, block=block)
        )
        records: list[dict[str, Any]] = []
        ended = False
        for _stream, entries in reply or []:
            for _entry_id, fields in entries:
                if b"end" in fields:
                    ended = True
                elif b"r" in fields:
                    records.append(json.loads(fields[b"r"]))
        return records, ended
