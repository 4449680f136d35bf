"""Fetching the blobs a plan needs, verified, and writing them into the staging directory.

1. Locate every needed blob in the index; group by pack; coalesce neighbouring blobs of a pack into ranged
   reads of at most RANGE_MAX bytes (gaps up to RANGE_GAP are read and dropped).
2. Each range is fetched from the preferred site; if it is missing or any blob in it fails verification
   (AEAD tag, length, keyed content id), the same range is read from the next site (``Repository.fetch``).
3. Every verified blob is written at each offset where a file uses it (pwrite, files opened O_NOFOLLOW),
   in a thread started through the restore's ``Fence``; progress is counted on the event loop.
4. On any failure or cancellation the other fetches are cancelled and ``run`` returns only once none of
   its writes is still going on (the fence is closed): the caller's cleanup cannot race a late write.
Memory is bounded by RANGE_MAX times the fetch concurrency.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from drsvc.core.errors import ObjectNotFound
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository
from restore.plan import Plan

RANGE_MAX = 2 * 1024 * 1024
RANGE_GAP = 64 * 1024

P = ParamSpec("P")
T = TypeVar("T")


class Stopped(Exception):
    """Raised in blocking work at its next ``Fence.check`` once the fence is closed: the work is abandoned."""


class Fence:
    """The blocking work of one restore, run in threads the restore can stop and wait for.

    Cancelling an ``await asyncio.to_thread(...)`` stops the waiting, not the thread: a write it is doing
    (or about to do) still happens, possibly after the staging directory was removed. Work run through a
    fence calls ``check`` between its steps; ``close`` makes every check raise ``Stopped`` and waits until
    no thread of the fence runs. After ``close`` nothing of the restore writes any more, so a cleanup that
    follows is complete.
    """

    def __init__(self) -> None:
        self._closed = threading.Event()
        self._running: set[asyncio.Future[Any]] = set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def check(self) -> None:
        """Called by fenced blocking work between its steps (any thread)."""
        if self._closed.is_set():
            raise Stopped("the restore was stopped")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a thread (as ``asyncio.to_thread``), tracked until it has returned:
        a cancelled caller stops waiting at once, ``close`` still waits for the thread."""
        self.check()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        fut: asyncio.Future[T] = loop.run_in_executor(None, call)
        self._running.add(fut)
        fut.add_done_callback(self._finished)
        return await asyncio.shield(fut)  # a cancellation must not mark the future done while it runs

    def _finished(self, fut: asyncio.Future[Any]) -> None:
        self._running.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a caller that was cancelled meanwhile never sees it (Stopped)

    async def close(self) -> None:
        """Stop fenced work at its next check and wait until none runs; idempotent. Runs to its end even
        when the caller is cancelled meanwhile (the cancellation is raised afterwards)."""
        self._closed.set()
        await run_to_end(self._drain())

    async def _drain(self) -> None:
        while self._running:
            await asyncio.wait(set(self._running))


async def run_to_end(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even if the caller is cancelled meanwhile; such a cancellation is raised once
    `aw` is done (cleanup that must be complete before a restore's failure or cancellation is reported)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@dataclass
class Progress:
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0


@dataclass
class _Range:
    pack: str
    start: int
    end: int
    blobs: list[tuple[bytes, BlobLocation]]


def _ranges(needed: dict[bytes, BlobLocation]) -> list[_Range]:
    by_pack: dict[str, list[tuple[bytes, BlobLocation]]] = defaultdict(list)
    for bid, loc in needed.items():
        by_pack[loc.pack].append((bid, loc))
    out = []
    for pack, blobs in by_pack.items():
        blobs.sort(key=lambda b: b[1].entry.offset)
        cur: _Range | None = None
        for bid, loc in blobs:
            e = loc.entry
            if (
                cur is not None
                and e.offset - cur.end <= RANGE_GAP
                and e.offset + e.length - cur.start <= RANGE_MAX
            ):
                cur.end = e.offset + e.length
                cur.blobs.append((bid, loc))
            else:
                cur = _Range(pack, e.offset, e.offset + e.length, [(bid, loc)])
                out.append(cur)
    return out


class BlobWriter:
    def __init__(
        self,
        repo: Repository,
        plan: Plan,
        staging: str,
        concurrency: int = 4,
        progress: Callable[[Progress], None] | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.repo = repo
        self.plan = plan
        self.staging = staging
        self.concurrency = max(1, concurrency)
        self.on_progress = progress
        self.fence = fence if fence is not None else Fence()
        self.progress = Progress(files_total=len(plan.files), bytes_total=plan.total_bytes)
        # blob id -> [(path, offset)]
        self.targets: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
        self._remaining: dict[str, int] = {}

    async def run(self) -> None:
        """Fetch, verify and write every blob the plan needs. When it raises (or is cancelled), the fence
        is closed (the restore it belongs to is over: later fenced work raises ``Stopped``) and none of
        its writes is still going on."""
        try:
            await self._run()
        except BaseException:
            await self.fence.close()
            raise

    async def _run(self) -> None:
        index = await self.repo.load_index()
        needed: dict[bytes, BlobLocation] = {}
        for f in self.plan.files:
            path = os.path.join(self.staging, f.rel)
            off = 0
            for cid in f.node.content:
                loc = index.get(cid)
                if loc is None:
                    loc = await self.repo.locate(cid)  # raises, naming the blob
                needed[cid] = loc
                self.targets[cid].append((path, off))
                off += loc.entry.raw_length
            self._remaining[path] = len(f.node.content)
            if not f.node.content:
                self.progress.files_done += 1
        if self.on_progress is not None:
            self.on_progress(self.progress)
        ranges = _ranges(needed)
        todo = iter(ranges)

        async def worker() -> None:
            for r in todo:  # shared by the workers: each range is taken once
                for blobs in await self._fetch(r):
                    await self.fence.run(self._write, blobs)
                    self._count(blobs)

        try:  # the first failure cancels the other workers, and the group waits for them
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.concurrency, len(ranges))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _fetch(self, r: _Range) -> list[list[tuple[bytes, bytes]]]:
        """The verified blobs of one range. If the pack is gone from every site (a prune deleted it after the
        index was read), the blobs are read again from where the current indexes put them."""
        try:
            blobs = await self.repo.fetch(
                Handle(Kind.PACK, r.pack), lambda data: self._open(r, data), r.start, r.end - r.start
            )
            return [blobs]
        except ObjectNotFound:
            await self.repo.relocate(r.pack)
            moved = {bid: await self.repo.locate(bid) for bid, _ in r.blobs}
            if any(loc.pack == r.pack for loc in moved.values()):
                raise
            return [b for rr in _ranges(moved) for b in await self._fetch(rr)]

    def _open(self, r: _Range, data: bytes) -> list[tuple[bytes, bytes]]:
        mv = memoryview(data)
        out = []
        for bid, loc in r.blobs:
            e = loc.entry
            out.append(
                (bid, self.repo.open_blob(loc, mv[e.offset - r.start : e.offset - r.start + e.length], bid))
            )
        return out

    def _write(self, blobs: list[tuple[bytes, bytes]]) -> None:
        """Blocking, in a fenced thread: each blob at each of its places."""
        for bid, data in blobs:
            for path, off in self.targets[bid]:
                self.fence.check()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    if os.pwrite(fd, data, off) != len(data):
                        raise OSError(errno.ENOSPC, "short write", path)
                finally:
                    os.close(fd)

    def _count(self, blobs: list[tuple[bytes, bytes]]) -> None:
        """On the event loop, once the blobs are written: progress, then the callback."""
        for bid, data in blobs:
            for path, _off in self.targets[bid]:
                self.progress.bytes_done += len(data)
                self._remaining[path] -= 1
                if self._remaining[path] == 0:
                    self.progress.files_done += 1
        if self.on_progress is not None:
            self.on_progress(self.progress)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group (its leaves, depth first)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
