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

    def __init__(self, params: ChunkParams, read_size: int = 1024 * 1024) -> None:
        self.params = params
        self.read_size = read_size
        self._buf: bytearray | None = None
        self._cdc_buf: bytearray | None = None
        self._cdc = FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size, seed=params.seed
        )

    def cdc(self, f: io.RawIOBase) -> Iterator[memoryview]:
        """Content-defined chunks; each view is valid only until the next one is taken.

        The same cut points as pyfastcdc's ``cut_stream``, but over one reused window per thread:
        ``cut_stream`` allocates (and zeroes) a buffer of twice the maximum chunk size per file, with the GIL
        held, which made small files cost more than their data. A cut starting at `s` depends only on
        [s, s + max_size), so a chunk is final once that much is in the window or the file has ended; the
        unfinished tail moves to the front of the window and the cut resumes there.
        """
        window = self._window()
        view = memoryview(window)
        max_size = self.params.max_size
        filled = 0
        eof = False
        while True:
            if not eof:
                n = _fill(f, view[filled:])
                filled += n
                eof = filled < len(window)
            if filled == 0:
                return
            start = 0
            for chunk in self._cdc.cut_buf(view[:filled]):
                if not eof and chunk.offset + max_size > filled:
                    break  # not enough data after this point to know its cut: read more first
                yield chunk.data
                start = chunk.offset + chunk.length
            if eof and start >= filled:
                return
            view[: filled - start] = view[start:filled]
            filled -= start

    def _window(self) -> bytearray:
        size = max(self.read_size, 4 * self.params.max_size)
        if self._cdc_buf is None:
            self._cdc_buf = bytearray(size)
        return self._cdc_buf

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
