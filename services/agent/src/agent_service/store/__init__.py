"""Session stores: where conversations live and who may write them (`AGENT_SESSION_STORE`).

`files` (the default) keeps them under `AGENT_DATA_DIR` for one machine; a `redis://`
or `rediss://` URL keeps them in Redis for any number of replicas.
"""

from __future__ import annotations

from agent_service.settings import Settings
from agent_service.store.base import (
    ANONYMOUS,
    Lease,
    SessionBusyError,
    SessionKey,
    SessionStore,
    StoreUnavailableError,
)
from agent_service.store.files import FileStore
from agent_service.store.redis_store import RedisStore


def open_store(settings: Settings) -> SessionStore:
    """The store the settings name."""
    if settings.session_store.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(settings.session_store, settings.session_lease_s)
    return FileStore(settings.data_dir)


__all__ = [
    "ANONYMOUS",
    "FileStore",
    "Lease",
    "RedisStore",
    "SessionBusyError",
    "SessionKey",
    "SessionStore",
    "StoreUnavailableError",
    "open_store",
]
