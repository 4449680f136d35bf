"""Checkpoints of a `log` source: a tree snapshot of exactly the bytes the tailer has sent.

1. At a segment boundary (every byte read is spooled), each tracked file's content is its first `offset`
   bytes, read with pread from the descriptor the tailer holds; the last bytes sent are compared before and
   after, so a file rewritten meanwhile aborts the checkpoint (the next cut sees the rewrite).
2. A file whose chunks were listed by the previous checkpoint of this process keeps all of them but the
   last, if every one is at (or bound for) every site; chunking resumes at the last one's start. A log that
   grew by a few KiB costs a few KiB of reading, not its whole length.
3. Chunks and the one tree blob (files in name order) are packed into the spool as for a tree snapshot, then
   the index objects and the snapshot record (barriers). The record's stats carry the position:
   ``log_stream`` is the stream that starts from it (its segment 0 names the record as ``base``, and its
   generation i is the record's i-th file), ``log_prev_stream``/``log_prev_seq`` the last segment included.
4. Being an ordinary tree record, it keeps its packs alive through prune and is checked by scrub; a restore
   of it alone is the log directory at its time.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from drsvc.core import crypto, format
from drsvc.core.crypto import BlobType, ObjectType
from drsvc.core.errors import SnapshotError
from drsvc.core.format import Node, PackIndex, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Repository, new_id, now_ns
from drsvc.core.spool import Spool
from snapshot.chunker import Chunker, ChunkParams
from snapshot.dedup import DedupIndex
from snapshot.packer import Packer

INDEX_BLOBS_PER_OBJECT = 100_000


@dataclass
class CheckpointFile:
    """One file as the checkpoint sees it: the first `size` bytes of the descriptor `fd`."""

    path: bytes
    fd: int
    size: int
    tail: bytes  # the last bytes sent (must still be there)
    mode: int
    mtime_ns: int
    chunks: list[tuple[bytes, int]] = field(default_factory=list)  # (id, length) of the previous checkpoint


@dataclass(frozen=True)
class CheckpointResult:
    record: SnapshotRecord
    key: str
    files: int
    size: int  # file bytes the checkpoint describes
    bytes_read: int  # bytes read to make it
    bytes_stored: int  # new packs' bytes
    chunks: dict[bytes, list[tuple[bytes, int]]]  # path -> (id, length) of its chunks, for the next one


class CheckpointAborted(SnapshotError):
    hint = "a file changed under the checkpoint; the next one is tried at the next interval"


class _Prefix(io.RawIOBase):
    """Bytes [start, end) of a descriptor, by pread (the descriptor's offset is not used)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.fd, n, self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def build_checkpoint(
    repo: Repository,
    spool: Spool,
    sites: Sequence[str],
    dedup: DedupIndex,
    source: str,
    files: Sequence[CheckpointFile],
    time_ns: int,
    stats: dict[str, int],
) -> CheckpointResult:
    """Spool a checkpoint of `files` (blocking: call from a worker thread)."""
    p = repo.params
    packer = Packer(repo.keys, repo.layout, spool, sites, p.pack_size, p.compression_level)
    chunker = Chunker(ChunkParams(p.chunk_min, p.chunk_avg, p.chunk_max, repo.keys.chunker_seed))
    nodes: list[Node] = []
    chunks: dict[bytes, list[tuple[bytes, int]]] = {}
    read = 0
    try:
        for f in files:
            ids = _reusable(f, dedup)
            start = sum(n for _, n in ids)
            reader = _Prefix(f.fd, start, f.size)
            for data in chunker.cdc(reader):
                cid = repo.content_id(data)
                ids.append((cid, len(data)))
                if dedup.claim(cid):
                    packer.add(BlobType.DATA, cid, data)
            read += reader.pos - start
            if reader.pos != f.size or (
                f.tail and os.pread(f.fd, len(f.tail), f.size - len(f.tail)) != f.tail
            ):
                raise CheckpointAborted(
                    "a file was truncated or rewritten while the checkpoint read it",
                    source=source,
                    path=os.fsdecode(f.path),
                )
            chunks[f.path] = ids
            nodes.append(
                Node(
                    name=f.path,
                    kind=format.FILE,
                    mode=f.mode,
                    mtime_ns=f.mtime_ns,
                    size=f.size,
                    content=tuple(cid for cid, _ in ids),
                )
            )
        tree = format.encode_tree(nodes)
        tree_id = repo.content_id(tree)
        if dedup.claim(tree_id):
            packer.add(BlobType.TREE, tree_id, tree)
        packer.flush()
    except BaseException:
        packer.abort()
        raise
    index = _write_indexes(repo, spool, sites, packer.packs)
    record = SnapshotRecord(
        id=new_id(),
        tenant=repo.tenant,
        source=source,
        time_ns=time_ns,
        tree=tree_id,
        host=socket.gethostname(),
        finished_ns=now_ns(),
        stats={
            **stats,
            "files": len(nodes),
            "bytes_total": sum(f.size for f in files),
            "bytes_read": read,
            "blobs_new": packer.blobs_written,
            "bytes_stored": packer.bytes_written,
        },
        index=tuple(index),
    )
    key = repo.layout.key(Handle(Kind.SNAPSHOT, record.id, repo.keys.source_tag(source)))
    sealed = crypto.seal_object(repo.keys, ObjectType.SNAPSHOT, record.id, format.encode_snapshot(record))
    spool.put(key, sealed, repo.tenant, sites, barrier=True)
    return CheckpointResult(
        record, key, len(nodes), sum(f.size for f in files), read, packer.bytes_written, chunks
    )


def _reusable(f: CheckpointFile, dedup: DedupIndex) -> list[tuple[bytes, int]]:
    """The previous checkpoint's chunks of this file but the last (the cut resumes at its start), if they
    still fit the file and every one is at every site; else none."""
    keep = f.chunks[:-1]
    if sum(n for _, n in keep) > f.size or not all(cid in dedup for cid, _ in keep):
        return []
    return list(keep)


def _write_indexes(repo: Repository, spool: Spool, sites: Sequence[str], packs: list[PackIndex]) -> list[str]:
    names = []
    batch: list[PackIndex] = []
    count = 0
    for pk in [*packs, None]:
        if pk is not None:
            batch.append(pk)
            count += len(pk.blobs)
        if batch and (pk is None or count >= INDEX_BLOBS_PER_OBJECT):
            name = new_id()
            sealed = crypto.seal_object(repo.keys, ObjectType.INDEX, name, format.encode_index(batch))
            spool.put(repo.layout.key(Handle(Kind.INDEX, name)), sealed, repo.tenant, sites, barrier=True)
            names.append(name)
            batch, count = [], 0
    return names


__all__ = ["CheckpointAborted", "CheckpointFile", "CheckpointResult", "build_checkpoint"]
