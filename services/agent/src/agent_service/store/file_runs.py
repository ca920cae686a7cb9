"""Run event logs as files, for the embedded store: `<data_dir>/runs/<run id>.jsonl` and `.json`.

One writer per run (the process running it) appends JSON lines; readers in any
process on the machine follow the file, polling for growth. The meta file records
the owner and when the run is forgotten; expired runs are swept now and then.
Process-crash safe (appends and an atomic meta rename), not power-loss durable.
Every run of the service writes here, so the writer keeps its system calls few: the
owner comes with a run's end rather than being read back, the directory is made once,
paths are plain strings (pathlib showed in profiles), and the last events go out with
the end marker. The file work (opens, writes, renames, reads) runs on one thread of
its own, in order: on the event loop it was a tenth of a short call's time and sat
before its first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent_service.store.base import StoreUnavailableError

POLL_S = 0.05
SWEEP_EVERY_S = 60.0
END = "end"

T = TypeVar("T")


def _lines(records: list[dict[str, Any]]) -> bytes:
    """JSON lines, encoded on the event loop: the file thread then mostly waits in system calls
    (without the GIL) instead of contending for it with the loop."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


class FileRunLog:
    """`RunLog` over a directory of JSON-lines files."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._last_sweep = 0.0
        self._made = False  # the directory exists
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-log")  # one: writes stay in order

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        try:
            future = asyncio.get_running_loop().run_in_executor(self._io, work, *args)
        except RuntimeError as exc:  # closed: the service is stopping
            raise StoreUnavailableError("the run log is closed") from exc
        return await future

    def _events(self, run_id: str) -> Path:
        return self._directory / f"{run_id}.jsonl"

    def _meta(self, run_id: str) -> Path:
        return self._directory / f"{run_id}.json"

    async def start(self, run_id: str, owner: str, ttl_s: float) -> None:
        await self._off_loop(self._start, run_id, owner, ttl_s)

    async def append(self, run_id: str, records: list[dict[str, Any]]) -> None:
        await self._off_loop(self._append, run_id, _lines(records))

    async def end(
        self, run_id: str, owner: str, retention_s: float, records: list[dict[str, Any]] | None = None
    ) -> None:
        data = _lines([*(records or ()), {END: True}])
        await self._off_loop(self._end, run_id, owner, retention_s, data)

    def _start(self, run_id: str, owner: str, ttl_s: float) -> None:
        self._sweep()
        self._write_meta(run_id, {"owner": owner, "expires": time.time() + ttl_s})

    def _end(self, run_id: str, owner: str, retention_s: float, data: bytes) -> None:
        self._append(run_id, data)
        self._write_meta(run_id, {"owner": owner, "expires": time.time() + retention_s})

    def _append(self, run_id: str, data: bytes) -> None:
        try:
            with open(os.path.join(self._directory, run_id + ".jsonl"), "ab") as events:
                events.write(data)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot append to run {run_id}: {exc.strerror}") from exc

    async def owner(self, run_id: str) -> str | None:
        meta = await self._off_loop(self._read_meta, run_id)
        if meta is None or meta["expires"] < time.time():
            return None
        return str(meta["owner"])

    async def read(self, run_id: str, after: int, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        deadline = time.monotonic() + wait_s
        while True:
            records, ended = await self._off_loop(self._read_all, run_id, after)
            if records or ended or time.monotonic() >= deadline:
                return records, ended
            await asyncio.sleep(POLL_S)

    async def aclose(self) -> None:
        """Stop the file thread once the writes handed to it are done (the run log writer flushed before)."""
        await asyncio.get_running_loop().run_in_executor(None, self._io.shutdown)

    def _read_all(self, run_id: str, after: int) -> tuple[list[dict[str, Any]], bool]:
        try:
            lines = self._events(run_id).read_bytes().splitlines()
        except FileNotFoundError:
            return [], False
        records: list[dict[str, Any]] = []
        ended = False
        for line in lines:
            with contextlib.suppress(ValueError):  # a line being written right now
                record = json.loads(line)
                if record.get(END):
                    ended = True
                elif record["seq"] > after:
                    records.append(record)
        return records, ended

    def _read_meta(self, run_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._meta(run_id).read_bytes()))
        except (FileNotFoundError, ValueError):
            return None

    def _write_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        base = os.path.join(self._directory, run_id)
        try:
            if not self._made:
                self._directory.mkdir(parents=True, exist_ok=True)
                self._made = True
            with open(base + ".tmp", "w") as temporary:
                temporary.write(json.dumps(meta))
            os.replace(base + ".tmp", base + ".json")
        except OSError as exc:
            raise StoreUnavailableError(f"cannot record run {run_id}: {exc.strerror}") from exc

    def _sweep(self) -> None:
        """Forget runs whose retention has passed (at most once a minute)."""
        now = time.time()
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        with contextlib.suppress(OSError):
            for meta in self._directory.glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if json.loads(meta.read_bytes())["expires"] < now:
                        meta.with_suffix(".jsonl").unlink(missing_ok=True)
                        meta.unlink()
