"""Retry wrapper: retries transient errors only, with exponential backoff and jitter (tenacity).

Only ``TransientStoreError`` is retried; every other ``StoreError`` is permanent and passes at once, among
them ``ObjectLocked`` (an object under retention stays locked whatever the number of attempts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from drsvc.core.errors import TransientStoreError
from drsvc.core.stores import ObjectInfo, ObjectStore

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    max_delay: float = 60.0  # give up on one request after this many seconds in all
    initial_wait: float = 0.2
    max_wait: float = 10.0


class RetryStore:
    """An ObjectStore that retries its inner store's TransientStoreErrors; others pass straight through."""

    def __init__(self, inner: ObjectStore, policy: RetryPolicy = RetryPolicy()) -> None:
        self.inner = inner
        self.name = inner.name
        self.lock_period = inner.lock_period
        self.policy = policy

    def _retrying(self) -> AsyncRetrying:
        p = self.policy
        return AsyncRetrying(
            retry=retry_if_exception_type(TransientStoreError),
            stop=stop_after_attempt(p.attempts) | stop_after_delay(p.max_delay),
            wait=wait_random_exponential(multiplier=p.initial_wait, max=p.max_wait),
            reraise=True,
        )

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async for attempt in self._retrying():
            with attempt:
                return await fn()
        raise AssertionError("unreachable")  # pragma: no cover

    async def put(self, key: str, data: bytes) -> None:
        await self._call(lambda: self.inner.put(key, data))

    async def put_file(self, key: str, path: Path) -> None:
        await self._call(lambda: self.inner.put_file(key, path))

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._call(lambda: self.inner.get(key, offset, length))

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._call(lambda: self.inner.stat(key))

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async def collect() -> list[ObjectInfo]:
            return [i async for i in self.inner.list(prefix)]

        for item in await self._call(collect):
            yield item

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.inner.delete(key))

    async def close(self) -> None:
        await self.inner.close()
