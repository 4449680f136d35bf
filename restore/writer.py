"""Fetching the blobs a plan needs, verified, and writing them into the staging directory.

1. Locate every needed blob in the index; group by pack; coalesce neighbouring blobs of a pack into ranged
   reads of at most RANGE_MAX bytes (gaps up to RANGE_GAP are read and dropped).
2. Each range is fetched from the preferred site; if it is missing or any blob in it fails verification
   (AEAD tag, length, keyed content id), the same range is read from the next site (``Repository.fetch``).
3. Every verified blob is written at each offset where a file uses it (pwrite, files opened O_NOFOLLOW).
Memory is bounded by RANGE_MAX times the fetch concurrency.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from drsvc.core.errors import ObjectNotFound
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import BlobLocation, Repository
from restore.plan import Plan

RANGE_MAX = 2 * 1024 * 1024
RANGE_GAP = 64 * 1024


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
    ) -> None:
        self.repo = repo
        self.plan = plan
        self.staging = staging
        self.concurrency = concurrency
        self.on_progress = progress
        self.progress = Progress(files_total=len(plan.files), bytes_total=plan.total_bytes)
        # blob id -> [(path, offset)]
        self.targets: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
        self._remaining: dict[str, int] = {}

    async def run(self) -> None:
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
        sem = asyncio.Semaphore(self.concurrency)

        async def one(r: _Range) -> None:
            async with sem:
                for blobs in await self._fetch(r):
                    await asyncio.to_thread(self._write, blobs)

        await asyncio.gather(*(one(r) for r in _ranges(needed)))

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
        for bid, data in blobs:
            for path, off in self.targets[bid]:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    if os.pwrite(fd, data, off) != len(data):
                        raise OSError(errno.ENOSPC, "short write", path)
                finally:
                    os.close(fd)
                self.progress.bytes_done += len(data)
                self._remaining[path] -= 1
                if self._remaining[path] == 0:
                    self.progress.files_done += 1
        if self.on_progress:
            self.on_progress(self.progress)
