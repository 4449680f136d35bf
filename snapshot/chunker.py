"""Cutting file contents into chunks.

Two strategies, chosen per file by the source's name patterns (benchmarks/chunking_study.py has the numbers):
- content-defined (FastCDC 2020, gear table seeded from the tenant's secret chunker seed, so that chunk
  boundaries cannot be predicted from known content without the key): insertions shift no boundaries beyond
  the edit; the mean chunk is about avg_size + min_size;
- page-aligned fixed chunks for database-like files, whose writes are scattered fixed-size pages: one changed
  page re-stores one chunk, never a CDC chunk straddling it.
Both stream the file through a bounded buffer: memory does not grow with the file.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC


@dataclass(frozen=True)
class ChunkParams:
    min_size: int
    avg_size: int
    max_size: int
    seed: int


class Chunker:
    """Thread-confined: make one per worker thread."""

    def __init__(self, params: ChunkParams, read_size: int = 4 * 1024 * 1024) -> None:
        self.params = params
        self.read_size = read_size
        self._buf: bytearray | None = None
        self._cdc = FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size, seed=params.seed
        )

    def cdc(self, f: io.RawIOBase) -> Iterator[memoryview]:
        """Content-defined chunks; each view is valid only until the next one is taken."""
        for chunk in self._cdc.cut_stream(f):
            yield chunk.data

    def fixed(self, f: io.RawIOBase, size: int, limit: int = -1) -> Iterator[memoryview]:
        """Fixed-size chunks of `size` from the current position (aligned if it is a multiple of `size`),
        reading at most `limit` bytes (-1: to the end)."""
        want_len = max(size, (self.read_size // size) * size)
        if self._buf is None or len(self._buf) != want_len:
            self._buf = bytearray(want_len)
        view = memoryview(self._buf)
        left = limit
        while left != 0:
            want = view if left < 0 else view[: min(len(view), left)]
            n = _fill(f, want)
            if left > 0:
                left -= n
            if n == 0:
                return
            for off in range(0, n, size):
                yield view[off : min(off + size, n)]
            if n < len(want):
                return


def _fill(f: io.RawIOBase, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got
