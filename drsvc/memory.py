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
import importlib.util
import sys
import types

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


def lazy_module(name: str) -> types.ModuleType:
    """`name` imported on first attribute access rather than now (importlib's LazyLoader recipe), for a big
    module that a command needs only late, past its own peak of memory."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
