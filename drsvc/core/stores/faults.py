"""Fault injection wrapper: scripted failures for tests and drills, instead of patching.

A rule names an operation ("put", "get", ...), an optional key substring, and what happens: raise a given
error, or corrupt the bytes returned (flip one byte), for the next `times` matching calls (-1: always).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from drsvc.core.errors import StoreError
from drsvc.core.stores import ObjectInfo, ObjectStore


@dataclass
class Fault:
    op: str
    key_contains: str = ""
    error: StoreError | None = None
    corrupt: bool = False
    times: int = -1
    hits: int = field(default=0)

    def matches(self, op: str, key: str) -> bool:
        return self.op == op and self.key_contains in key and (self.times < 0 or self.hits < self.times)


class FaultyStore:
    def __init__(self, inner: ObjectStore, faults: list[Fault] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.lock_period = inner.lock_period
        self.faults: list[Fault] = list(faults or [])

    def _check(self, op: str, key: str) -> Fault | None:
        for f in self.faults:
            if f.matches(op, key):
                f.hits += 1
                if f.error is not None:
                    raise f.error
                return f
        return None

    async def put(self, key: str, data: bytes) -> None:
        self._check("put", key)
        await self.inner.put(key, data)

    async def put_file(self, key: str, path: Path) -> None:
        self._check("put", key)
        await self.inner.put_file(key, path)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        fault = self._check("get", key)
        data = await self.inner.get(key, offset, length)
        if fault is not None and fault.corrupt and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        self._check("stat", key)
        return await self.inner.stat(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self._check("list", prefix)
        async for item in self.inner.list(prefix):
            yield item

    async def delete(self, key: str) -> None:
        self._check("delete", key)
        await self.inner.delete(key)

    async def close(self) -> None:
        await self.inner.close()
