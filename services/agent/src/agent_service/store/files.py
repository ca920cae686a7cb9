"""The embedded store: conversations as files under `AGENT_DATA_DIR`, for one machine.

Blobs are written by strands' `LocalFileStorage` (write to a temporary file, then
rename: a crashed process never leaves a torn history). The lease is an exclusive
`flock` on a per-session lock file, so any number of processes on the machine (the
workers of one `agent-service`, or several services sharing a directory) serve a
session one turn at a time; the kernel releases the lock of a process that dies, so
a crash never leaves a session locked.

Layout: `<data_dir>/<owner>/session/<session id>/...` (strands' snapshot keys), the
turn journal beside them, and `<data_dir>/<owner>/locks/<session id>.lock`.
Conversations written by the earlier FileSessionManager layout
(`<data_dir>/session_<id>/`) are read once and carried over (see `legacy_messages`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strands.session import FileSessionManager
from strands.storage import LocalFileStorage
from strands.types.content import Message

from agent_service.store.base import (
    ANONYMOUS,
    BUSY_POLL_S,
    BUSY_WAIT_S,
    SessionBusyError,
    SessionKey,
    StoreUnavailableError,
)

JOURNAL = "journal.json"
LEGACY_AGENT_ID = "default"


class FileLease:
    """An exclusive lock on one session's lock file, and its data under the owner's directory."""

    def __init__(self, key: SessionKey, root: Path, fd: int, data_dir: Path) -> None:
        self.key = key
        self._fd: int | None = fd
        self._storage = LocalFileStorage(str(root))
        self._journal = f"session/{key.session_id}/{JOURNAL}"
        self._data_dir = data_dir

    def _held(self) -> LocalFileStorage:
        if self._fd is None:
            raise StoreUnavailableError(f"session {self.key.session_id!r} was written after its lease was released")
        return self._storage

    async def write(self, key: str, data: bytes) -> None:
        await self._held().write(key, data)

    async def read(self, key: str) -> bytes | None:
        return await self._storage.read(key)

    async def delete(self, key: str) -> None:
        await self._held().delete(key)

    async def list(self, query: str) -> builtins.list[str]:
        return await self._storage.list(query)

    async def read_journal(self) -> str | None:
        data = await self._storage.read(self._journal)
        return None if data is None else str(json.loads(data)["partial"])

    async def write_journal(self, partial: str) -> None:
        await self._held().write(self._journal, json.dumps({"partial": partial}).encode())

    async def clear_journal(self) -> None:
        await self._held().delete(self._journal)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """A flock is held until released or the process dies: it is never lost while held."""

    async def legacy_messages(self) -> builtins.list[Message] | None:
        """The history of this session in the earlier FileSessionManager layout, if there is one."""
        if self.key.principal != ANONYMOUS or not (self._data_dir / f"session_{self.key.session_id}").is_dir():
            return None
        return await asyncio.to_thread(_read_legacy, self._data_dir, self.key.session_id)

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


class FileStore:
    """Session data and leases in a directory (the default: `make run`, one or several workers on one machine)."""

    name = "files"

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir

    async def lease(self, key: SessionKey) -> FileLease:
        root = self._data_dir / key.owner
        lock_path = root / "locks" / f"{key.session_id}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open {lock_path.name}: {exc.strerror}") from exc
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUSY_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return FileLease(key, root, fd, self._data_dir)
            except BlockingIOError:
                if loop.time() >= give_up:
                    os.close(fd)
                    raise SessionBusyError(key) from None
            except OSError as exc:
                os.close(fd)
                raise StoreUnavailableError(f"cannot lock {lock_path.name}: {exc.strerror}") from exc
            await asyncio.sleep(BUSY_POLL_S)

    async def check(self) -> None:
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            probe = self._data_dir / ".probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StoreUnavailableError(f"{self._data_dir} is not writable: {exc.strerror}") from exc

    async def aclose(self) -> None:
        return None


def _read_legacy(data_dir: Path, session_id: str) -> list[Message]:
    """Messages of a FileSessionManager session (strands' own reader), oldest first."""
    manager = FileSessionManager(session_id=session_id, storage_dir=str(data_dir))
    with contextlib.suppress(Exception):
        records: list[Any] = manager.session_repository.list_messages(session_id, LEGACY_AGENT_ID)
        return [record.to_message() for record in records]
    return []
