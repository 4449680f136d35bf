"""drsvc.memory: the allocator settings and lazily imported modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from drsvc.memory import lazy_module


def test_prune_loads_numpy_only_when_it_first_needs_it() -> None:
    code = (
        "import sys, json; import drsvc.prune as p; before = type(sys.modules['numpy']).__name__;"
        "ids = p.np.frombuffer(bytes(range(32)), dtype=p._IDS); after = type(sys.modules['numpy']).__name__;"
        "ok = sorted(p.id_set(ids)) == [bytes(range(16)), bytes(range(16, 32))];"
        "print(json.dumps([before, after, len(ids), ok]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["_LazyModule", "module", 2, True]


def test_lazy_module_of_a_loaded_or_missing_module() -> None:
    assert lazy_module("json") is json
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        lazy_module("no_such_module_here")


def test_allocator_settings_and_trim_apply_on_glibc() -> None:
    import platform

    from drsvc.memory import release_free_memory, tune_allocator

    glibc = platform.libc_ver()[0] == "glibc"
    assert tune_allocator() is glibc
    assert release_free_memory() is glibc
