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
import functools
import importlib.util
import sys
import types

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``): between the phases of a
    command whose temporary objects are gone, so that the next phase's peak does not sit on top of pages
    that are free but still resident. A few milliseconds; False where the C library has no malloc_trim."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def tune_allocator(mmap_threshold: int = 4 * 1024 * 1024, arenas: int = 2) -> bool:
    """Apply the settings if the C library is glibc; returns whether it did."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
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
