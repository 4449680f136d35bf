"""The ObjectStore protocol: what drsvc needs of a site, and nothing more.

1. Keys are plain strings built by ``drsvc.core.layout``; a store adds its own root (directory, bucket and
   prefix) and never interprets them.
2. Objects are immutable: ``put`` of an existing key with the same bytes is harmless; nobody rewrites one.
3. Errors: ``ObjectNotFound`` for a missing key, ``TransientStoreError`` for whatever may succeed when
   retried (network, timeouts, 5xx, throttling), any other ``StoreError`` is permanent. Only transient
   errors are retried, by the ``RetryStore`` wrapper, never inside a store.
4. Wrappers (retry, fault injection) implement the same protocol and are stacked in ``compose.open_site``.
5. Object lock: a store whose ``lock_period`` is set writes every object under COMPLIANCE retention for that
   long; deleting an object before its retention ends raises ``ObjectLocked`` (permanent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


@runtime_checkable
class ReadStore(Protocol):
    """The read side, all a restore needs."""

    name: str

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or `length` bytes from `offset`. ObjectNotFound if it does not exist."""
        ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None if it does not exist."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in no promised order."""
        ...


@runtime_checkable
class ObjectStore(ReadStore, Protocol):
    lock_period: float | None
    """Seconds of COMPLIANCE retention every object is written with, so that nobody holding the site's
    credentials can delete it earlier (``delete`` raises ObjectLocked). None: the site locks nothing."""

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, durably, before returning. All or nothing: no partial object."""
        ...

    async def put_file(self, key: str, path: Path) -> None:
        """Store the contents of the local file `path` (which must not change) like ``put``, streaming it."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error. ObjectLocked if it is under
        retention (see ``lock_period``): it stays, whole and readable."""
        ...

    async def close(self) -> None: ...


__all__ = ["ObjectInfo", "ObjectStore", "ReadStore"]
