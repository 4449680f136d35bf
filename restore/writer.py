"""Fetching the blobs a plan needs, verified, and writing them into the staging directory.

1. Locate every needed blob in the index; group by pack; coalesce neighbouring blobs of a pack into ranged
   reads of at most RANGE_MAX bytes (gaps up to RANGE_GAP are read and dropped).
2. Each range is fetched from the preferred site; if it is missing or any blob in it fails verification
   (AEAD tag, length, keyed content id), the same range is read from the next site (``Repository.fetch``),
   skipping the blobs already written from the failed copy.
3. One thread per range, started through the restore's ``Fence``, verifies each blob and writes it at each
   offset where a file uses it (pwrite, files opened O_NOFOLLOW); the write of a file's last blob also sets
   its owner, mode and times; spans of WRITEBACK_MIN bytes or more start their writeback (the restore
   flushes the file system once, at the end: ``sync_filesystem``). Progress is counted on the event loop.
4. On any failure or cancellation the other fetches are cancelled and ``run`` returns only once none of
   its writes is still going on (the fence is closed): the caller's cleanup cannot race a late write.
Memory is bounded by RANGE_MAX plus one blob, times the fetch concurrency.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import errno
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from drsvc.core.errors import ObjectNotFound
from drsvc.core.format import Node
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository
from restore.plan import Plan, coalesce

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


@dataclass(eq=False)
class _File:
    path: str
    node: Node
    remaining: int  # placements of its blobs not yet written (under BlobWriter._lock)


@dataclass(eq=False)
class _Range:
    pack: str
    start: int
    end: int
    blobs: list[tuple[bytes, BlobLocation]]
    # what attempts at this range have written so far (a retry at another site skips those blobs)
    written: set[bytes] = field(default_factory=set)
    bytes_done: int = 0
    files_done: int = 0


def _ranges(needed: dict[bytes, BlobLocation]) -> list[_Range]:
    return [
        _Range(pack, start, end, blobs) for pack, start, end, blobs in coalesce(needed, RANGE_MAX, RANGE_GAP)
    ]


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
        self.targets: dict[bytes, list[tuple[_File, int]]] = defaultdict(list)  # blob id -> [(file, offset)]
        self._lock = threading.Lock()

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
            if not f.node.content:  # made, with its metadata, with the skeleton
                self.progress.files_done += 1
                continue
            file = _File(os.path.join(self.staging, f.rel), f.node, len(f.node.content))
            off = 0
            for cid in f.node.content:
                loc = index.get(cid)
                if loc is None:
                    loc = await self.repo.locate(cid)  # raises, naming the blob
                needed[cid] = loc
                self.targets[cid].append((file, off))
                off += loc.entry.raw_length
        if self.on_progress is not None:
            self.on_progress(self.progress)
        ranges = _ranges(needed)
        todo = iter(ranges)

        async def worker() -> None:
            for r in todo:  # shared by the workers: each range is taken once
                for done in await self._fetch(r):
                    self._count(done)

        try:  # the first failure cancels the other workers, and the group waits for them
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.concurrency, len(ranges))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _fetch(self, r: _Range) -> list[_Range]:
        """Fetch, verify and write the blobs of one range (in one fenced thread); the range, or the ranges
        it was split into. If the pack is gone from every site (a prune deleted it after the index was
        read), the blobs are read again from where the current indexes put them."""
        try:
            await self.repo.fetch(
                Handle(Kind.PACK, r.pack),
                functools.partial(self._write_range, r),
                r.start,
                r.end - r.start,
                run=self.fence.run,
            )
            return [r]
        except ObjectNotFound:
            await self.repo.relocate(r.pack)
            moved = {bid: await self.repo.locate(bid) for bid, _ in r.blobs if bid not in r.written}
            if any(loc.pack == r.pack for loc in moved.values()):
                raise
            return [r, *[d for rr in _ranges(moved) for d in await self._fetch(rr)]]

    def _write_range(self, r: _Range, data: bytes) -> None:
        """Blocking, in a fenced thread: verify each blob of the range (``Repository.open_blob``), then write
        it at each of its places. A file whose last blob this wrote gets its owner, mode and times, and its
        writeback starts (the restore flushes the file system once, at the end). Raises IntegrityError
        for a blob that fails verification: ``Repository.fetch`` then calls again with another site's
        copy, and the blobs this call wrote (``r.written``) are skipped."""
        mv = memoryview(data)
        out = _Out()
        try:
            for bid, loc in r.blobs:
                if bid in r.written:
                    continue
                e = loc.entry
                blob = self.repo.open_blob(loc, mv[e.offset - r.start : e.offset - r.start + e.length], bid)
                for file, off in self.targets[bid]:
                    self.fence.check()
                    fd = out.open(file)
                    _pwrite_all(fd, blob, off, file.path)
                    out.wrote(off, len(blob))
                    r.bytes_done += len(blob)
                    with self._lock:
                        file.remaining -= 1
                        last = file.remaining == 0
                    if last:
                        apply_metadata(fd, file.node)
                        r.files_done += 1
                r.written.add(bid)
        finally:
            out.close()

    def _count(self, r: _Range) -> None:
        """On the event loop, once a range is written: progress, then the callback."""
        self.progress.bytes_done += r.bytes_done
        self.progress.files_done += r.files_done
        if self.on_progress is not None:
            self.on_progress(self.progress)


def _pwrite_all(fd: int, data: bytes, offset: int, path: str) -> None:
    n = os.pwrite(fd, data, offset)
    if n != len(data):
        view = memoryview(data)
        while n < len(view):
            k = os.pwrite(fd, view[n:], offset + n)
            if k <= 0:
                raise OSError(errno.ENOSPC, "short write", path)
            n += k


def apply_metadata(fd: int, node: Node) -> None:
    """Owner (as root), mode and times of a restored file, through its open descriptor."""
    if os.geteuid() == 0:
        try:
            os.fchown(fd, node.uid, node.gid)
        except OSError:
            pass
    os.fchmod(fd, node.mode & 0o7777)
    os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))


# -- durability: start writeback as files are written, one flush of the file system at the end -----------

SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_MIN = 1024 * 1024  # bytes written to a file by one range, at least, to start their writeback


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these dirty pages now (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
    which does not wait for them): the disk works while the restore decodes, and the flush at the end
    finds little left to write. A hint: does nothing where the call is missing or fails."""
    fn = getattr(_libc(), "sync_file_range", None)
    if fn is not None:
        fn(fd, ctypes.c_int64(offset), ctypes.c_int64(length), ctypes.c_uint(SYNC_FILE_RANGE_WRITE))


class _Out:
    """The file a range is writing to (one open at a time: the blobs of a file mostly lie together in a
    pack), and the span written through it. Closing it starts the writeback of that span when it is at
    least WRITEBACK_MIN bytes (small files are left to the flush at the end)."""

    def __init__(self) -> None:
        self.file: _File | None = None
        self.fd = -1
        self.lo = self.hi = 0

    def open(self, file: _File) -> int:
        if file is not self.file:
            self.close()
            self.fd = os.open(file.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self.file = file
        return self.fd

    def wrote(self, offset: int, n: int) -> None:
        if self.hi == self.lo:
            self.lo, self.hi = offset, offset + n
        else:
            self.lo, self.hi = min(self.lo, offset), max(self.hi, offset + n)

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd, self.file = self.fd, -1, None
        lo, hi, self.lo, self.hi = self.lo, self.hi, 0, 0
        try:
            if hi - lo >= WRITEBACK_MIN:
                start_writeback(fd, lo, hi - lo)
        finally:
            os.close(fd)


def sync_filesystem(path: str) -> None:
    """Flush the file system holding `path` (``syncfs``): every restored file's data and metadata is on disk
    before the tree is renamed into place. Only that file system, not every one (``os.sync``)."""
    fn = getattr(_libc(), "syncfs", None)
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group (its leaves, depth first)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
