"""Process-wide allocator settings that keep the daemon's and the CLI's memory flat.

CPython hands buffers of more than 512 bytes to glibc's malloc. glibc raises its mmap threshold each time a
large mmap'd block is freed (up to 32 MiB), after which the range-sized buffers of a restore come from
per-thread heap arenas that are rarely returned to the kernel. A fixed 4 MiB threshold and two arenas took
the restore benchmark's peak RSS from ~210 to ~125 MiB. (A 256 KiB threshold did as well for memory but
doubled the snapshot's system time in page faults: benchmarks/README.md.)
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_allocator(mmap_threshold: int = 4 * 1024 * 1024, arenas: int = 2) -> bool:
    """Apply the settings if the C library is glibc; returns whether it did."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_ARENA_MAX, arenas))
