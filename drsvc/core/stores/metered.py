"""Metering wrapper: times every request to a site and reports it to an observer (the daemon's metrics).

``compose.open_site`` stacks it under the retries, ``RetryStore(MeteredStore(backend))``, so each attempt
is timed and each failed attempt is reported. The observer is called as
``observer(site, op, seconds, error_kind)``: ``op`` is one of put, get, list, stat, delete (``put_file``
counts as put); ``error_kind`` is the class name of the ``StoreError`` the request raised (e.g.
``TransientStoreError``, ``ObjectNotFound``), or None when it succeeded. Anything else that escapes a request
(a cancellation, a bug) is not reported: it is no answer of the site.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from drsvc.core.errors import StoreError
from drsvc.core.stores import ObjectInfo, ObjectStore

T = TypeVar("T")

Observer = Callable[[str, str, float, str | None], None]


class MeteredStore:
    """An ObjectStore that reports the duration and outcome of each call of its inner store."""

    def __init__(self, inner: ObjectStore, observer: Observer) -> None:
        self.inner = inner
        self.name = inner.name
        self.lock_period = inner.lock_period
        self.observer = observer

    async def _timed(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        began = time.monotonic()
        try:
            result = await call()
        except StoreError as exc:
            self.observer(self.name, op, time.monotonic() - began, type(exc).__name__)
            raise
        self.observer(self.name, op, time.monotonic() - began, None)
        return result

    async def put(self, key: str, data: bytes) -> None:
        await self._timed("put", lambda: self.inner.put(key, data))

    async def put_file(self, key: str, path: Path) -> None:
        await self._timed("put", lambda: self.inner.put_file(key, path))

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._timed("get", lambda: self.inner.get(key, offset, length))

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._timed("stat", lambda: self.inner.stat(key))

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Timed from the first request to the last page (the time the caller spends between items included;
        RetryStore collects the listing before handing it on). A listing abandoned early is not reported."""
        began = time.monotonic()
        try:
            async for item in self.inner.list(prefix):
                yield item
        except StoreError as exc:
            self.observer(self.name, "list", time.monotonic() - began, type(exc).__name__)
            raise
        self.observer(self.name, "list", time.monotonic() - began, None)

    async def delete(self, key: str) -> None:
        await self._timed("delete", lambda: self.inner.delete(key))

    async def close(self) -> None:
        await self.inner.close()
