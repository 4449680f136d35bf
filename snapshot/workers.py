"""Worker processes for the data path: one ``FileReader`` per process, each with its own packs.

Threads did not scale on the benchmark (2 threads: 1.25x one thread) because every chunk crosses the GIL
several times; processes do (1.9x). Each worker process:
1. receives the snapshot's context once (keys, parameters, the spool, the blob ids already stored);
2. reads the batches routed to it, packing new chunks into its own spool files and outbox rows;
3. returns per file the chunk ids and stats, and at the end the index entries of the packs it wrote.
Jobs are routed by (file size, offset), so identical files, and the same segment of identical files, always
meet the same worker's dedup set: a snapshot stores duplicate content once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from drsvc.core.crypto import Keys
from drsvc.core.errors import SnapshotError
from drsvc.core.format import PackIndex
from drsvc.core.layout import Layout
from drsvc.core.repository import RepoParams
from drsvc.core.spool import Spool
from snapshot.chunker import ChunkParams
from snapshot.packer import Packer
from snapshot.reader import FileJob, FileOut, FileReader

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerContext:
    tenant: str
    keys: Keys
    params: RepoParams
    state_dir: Path
    sites: tuple[str, ...]
    page_chunk: int
    known: frozenset[bytes]


@dataclass(frozen=True)
class WorkerTotals:
    packs: list[PackIndex]
    bytes_written: int
    blobs_written: int


class _Worker:
    """The state of one snapshot inside one worker process."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.known = set(ctx.known)
        self.spool = Spool(ctx.state_dir)
        p = ctx.params
        self.packer = Packer(
            ctx.keys, Layout(ctx.tenant), self.spool, ctx.sites, p.pack_size, p.compression_level
        )
        chunk = ChunkParams(p.chunk_min, p.chunk_avg, p.chunk_max, ctx.keys.chunker_seed)
        self.reader = FileReader(
            chunk, ctx.page_chunk, ctx.keys.content_id_function(), self.claim, self.packer
        )

    def claim(self, blob_id: bytes) -> bool:
        if blob_id in self.known:
            return False
        self.known.add(blob_id)
        return True

    def close(self) -> None:
        self.spool.close()


_worker: _Worker | None = None  # process-local: one snapshot at a time per worker process


def _begin(ctx: WorkerContext) -> int:
    global _worker
    if _worker is not None:
        _worker.packer.abort()
        _worker.close()
    _worker = _Worker(ctx)
    return os.getpid()


def _read(batch: list[FileJob]) -> list[FileOut]:
    assert _worker is not None, "begin() was not called"
    return _worker.reader.read_batch(batch)


def _finish() -> WorkerTotals:
    global _worker
    assert _worker is not None, "begin() was not called"
    w, _worker = _worker, None
    try:
        w.packer.flush()
        return WorkerTotals(list(w.packer.packs), w.packer.bytes_written, w.packer.blobs_written)
    finally:
        w.close()


def _abort() -> None:
    global _worker
    if _worker is not None:
        w, _worker = _worker, None
        w.packer.abort()
        w.close()


class WorkerPool:
    """N single-process executors, so that a job can be routed to one worker."""

    def __init__(self, n: int | None = None) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["snapshot.workers"])
        self.size = max(1, n or os.cpu_count() or 1)
        self._execs = [ProcessPoolExecutor(max_workers=1, mp_context=self._ctx) for _ in range(self.size)]

    async def _on(self, i: int, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._execs[i], fn, *args)
        except BrokenProcessPool:
            # the process died (killed, out of memory): replace it for the next snapshot, fail this one
            self._execs[i].shutdown(wait=False, cancel_futures=True)
            self._execs[i] = ProcessPoolExecutor(max_workers=1, mp_context=self._ctx)
            raise SnapshotError(
                f"snapshot worker process {i} died",
                hint="look for the OOM killer in the kernel log; "
                "nothing was acknowledged, the next snapshot starts a new worker",
            ) from None

    def route(self, job: FileJob) -> int:
        return hash((job.st.st_size, job.offset)) % self.size

    async def warm(self) -> None:
        """Start the processes now (a forkserver start costs ~0.3 s), e.g. while the repository opens."""
        await asyncio.gather(*(self._on(i, os.getpid) for i in range(self.size)))

    async def begin(self, ctx: WorkerContext) -> None:
        async def one(i: int) -> None:
            try:
                await self._on(i, _begin, ctx)
            except (
                SnapshotError
            ):  # it died since the last snapshot, which lost nothing: its replacement begins
                await self._on(i, _begin, ctx)

        await asyncio.gather(*(one(i) for i in range(self.size)))

    async def read(self, worker: int, batch: list[FileJob]) -> list[FileOut]:
        return await self._on(worker, _read, batch)

    async def finish(self) -> WorkerTotals:
        parts = await asyncio.gather(*(self._on(i, _finish) for i in range(self.size)))
        return WorkerTotals(
            [p for t in parts for p in t.packs],
            sum(t.bytes_written for t in parts),
            sum(t.blobs_written for t in parts),
        )

    async def abort(self) -> None:
        await asyncio.gather(*(self._on(i, _abort) for i in range(self.size)), return_exceptions=True)

    def close(self) -> None:
        for e in self._execs:
            e.shutdown(wait=True, cancel_futures=True)


def routed_batches(
    jobs: Sequence[FileJob], route: Callable[[FileJob], int], small: int, max_bytes: int, max_files: int
) -> list[tuple[int, list[FileJob]]]:
    """Small files in batches per worker (one round trip each); large files alone."""
    out: list[tuple[int, list[FileJob]]] = []
    open_batches: dict[int, tuple[list[FileJob], list[int]]] = {}
    for j in jobs:
        w = route(j)
        if j.st.st_size >= small:
            out.append((w, [j]))
            continue
        cur, size = open_batches.setdefault(w, ([], [0]))
        cur.append(j)
        size[0] += j.st.st_size
        if len(cur) >= max_files or size[0] >= max_bytes:
            out.append((w, cur))
            del open_batches[w]
    out.extend((w, cur) for w, (cur, _) in open_batches.items())
    return out
