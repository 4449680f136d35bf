"""Reading files into chunks and packs: the data path of a snapshot, free of asyncio.

A ``FileReader`` lives in one worker (process or thread): it opens each file without following symlinks,
cuts it (content-defined, or page-aligned for page files), computes each chunk's keyed id, and hands the
chunks it has not seen to its packer. A file whose stat changes while it is read is read once more, then
reported as changed.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from drsvc.core.crypto import BlobType
from drsvc.core.errors import SnapshotError
from snapshot.chunker import Chunker, ChunkParams
from snapshot.packer import Packer


@dataclass(frozen=True)
class FileJob:
    path: str
    rel: str
    st: os.stat_result
    page: bool
    offset: int = 0
    length: int = -1  # bytes from offset; -1: to the end of the file


@dataclass
class FileOut:
    content: tuple[bytes, ...] = ()
    st: os.stat_result | None = None
    changed: bool = False
    error: str = ""
    bytes_read: int = 0


def same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )


class FileReader:
    def __init__(
        self,
        chunk_params: ChunkParams,
        page_chunk: int,
        id_fn: Callable[[bytes | memoryview], bytes],
        claim: Callable[[bytes], bool],
        packer: Packer,
    ) -> None:
        self.chunker = Chunker(chunk_params)
        self.page_chunk = page_chunk
        self.id_fn = id_fn
        self.claim = claim
        self.packer = packer

    def _store(self, cid: bytes, data: memoryview) -> None:
        """Pack a chunk. A failure to write the spool is not a failure to read this file: it ends the snapshot
        (the open pack is unusable), so it must not be caught as one."""
        try:
            self.packer.add(BlobType.DATA, cid, data)
        except OSError as exc:
            raise SpoolWriteError(f"cannot write to the spool: {exc.strerror}", path=exc.filename) from exc

    def read_batch(self, batch: list[FileJob]) -> list[FileOut]:
        return [self.read_file(job) for job in batch]

    def read_file(self, job: FileJob) -> FileOut:
        """Chunk and store one file (or segment); read it again once if it changed meanwhile."""
        out = FileOut()
        for _attempt in range(2):
            out = self.read_once(job)
            if out.error or not out.changed:
                return out
        return out

    def read_once(self, job: FileJob) -> FileOut:
        try:
            fd = _open_nofollow(job.path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return FileOut(error="replaced by a symlink while scanning")
            return FileOut(error=f"cannot open: {exc.strerror}")
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return FileOut(error="no longer a regular file")
            ids: list[bytes] = []
            total = 0
            if job.offset:
                os.lseek(fd, job.offset, os.SEEK_SET)
            with io.FileIO(fd, "rb", closefd=False) as f:
                chunks = (
                    self.chunker.fixed(f, self.page_chunk, job.length) if job.page else self.chunker.cdc(f)
                )
                for data in chunks:
                    cid = self.id_fn(data)
                    ids.append(cid)
                    total += len(data)
                    if self.claim(cid):
                        self._store(cid, data)
            after = os.fstat(fd)
        except OSError as exc:
            return FileOut(error=f"read failed: {exc.strerror}")
        finally:
            os.close(fd)
        expected = after.st_size - job.offset if job.length < 0 else job.length
        changed = not same_stat(before, after) or total != expected
        return FileOut(tuple(ids), after, changed, "", total)


class SpoolWriteError(SnapshotError):
    hint = (
        "the spool's file system is full or failing: free space under the state directory; nothing was lost"
    )


def _open_nofollow(path: str) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, flags)
    except PermissionError:
        if flags & getattr(os, "O_NOATIME", 0):  # O_NOATIME needs ownership; try without it
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        raise
