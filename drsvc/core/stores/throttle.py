"""Bandwidth limit wrapper: a token bucket per site for the bytes moved by put, put_file and get.

A transfer larger than the bucket is let through and leaves the bucket in debt, which the next transfers
wait out: the long-run rate is the configured one, and no request is split or delayed midway.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from drsvc.core.stores import ObjectInfo, ObjectStore


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.capacity = burst if burst is not None else rate  # one second's worth by default
        self.tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until `n` bytes may go (FIFO: transfers are served in the order they ask)."""
        async with self._lock:
            now = self._clock()
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens < 0:  # in debt from an earlier large transfer
                await self._sleep(-self.tokens / self.rate)
                self.tokens, self._last = 0.0, self._clock()
            self.tokens -= n


class ThrottleStore:
    def __init__(self, inner: ObjectStore, bucket: TokenBucket) -> None:
        self.inner = inner
        self.name = inner.name
        self.lock_period = inner.lock_period
        self.bucket = bucket

    async def put(self, key: str, data: bytes) -> None:
        await self.bucket.take(len(data))
        await self.inner.put(key, data)

    async def put_file(self, key: str, path: Path) -> None:
        try:
            size = await asyncio.to_thread(os.path.getsize, path)
        except OSError:
            size = 0  # the inner store reports the missing file
        await self.bucket.take(size)
        await self.inner.put_file(key, path)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is not None:
            await self.bucket.take(length)
            return await self.inner.get(key, offset, length)
        data = await self.inner.get(key, offset, length)
        await self.bucket.take(len(data))  # size unknown before: account for it after
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.inner.stat(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for item in self.inner.list(prefix):
            yield item

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def close(self) -> None:
        await self.inner.close()
