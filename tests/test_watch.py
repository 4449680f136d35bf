"""Watched tree sources: inotify-driven snapshots with an RPO of seconds, and the fallback to scanning."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import init_app, local_sites, make_config, tree_state
from test_supervisor import _samples

from drsvc import watch
from drsvc.metrics import Metrics
from drsvc.supervisor import DEBOUNCE, WATCH_FALLBACK, Supervisor
from drsvc.watch import TreeWatcher


async def wait_for(cond: Any, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while not cond():  # noqa: ASYNC110 - polls state that other tasks change
            await asyncio.sleep(0.05)


async def test_the_watcher_sees_changes_in_new_directories_and_ignores_excluded_ones(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "skip").mkdir()
    hits: list[float] = []
    w = TreeWatcher(root, lambda: hits.append(time.monotonic()), lambda rel: rel.split("/")[0] == "skip")
    assert await w.start() and w.watches == 2  # the root and a/, not skip/
    try:
        (root / "skip" / "x").write_text("ignored")
        await asyncio.sleep(0.2)
        assert not hits
        (root / "a" / "f").write_text("1")
        await wait_for(lambda: hits, 2)
        (root / "new" / "deeper").mkdir(parents=True)
        await wait_for(lambda: w.watches == 4, 2)  # new/ and new/deeper/ are watched now
        hits.clear()
        (root / "new" / "deeper" / "g").write_text("2")
        await wait_for(lambda: hits, 2)
    finally:
        w.close()


async def test_a_change_is_protected_within_seconds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("first\n")
    cfg = make_config(
        tmp_path,
        src,
        local_sites(tmp_path, ["a", "b"]),
        min_copies=2,
        source={"watch": True, "interval": "1d"},
    )
    app = await init_app(cfg)
    metrics = Metrics()
    sup = Supervisor(app, metrics)
    await sup.start()
    try:
        st = sup.sources["docs"]
        await wait_for(lambda: st.protected_until > 0, 30)  # the first snapshot (never taken before)
        first = st.protected_until
        (src / "docs" / "b.txt").write_text("second\n")
        changed = time.time()
        await wait_for(lambda: st.protected_until > first, 15)
        lag = time.time() - changed
        assert lag < 15  # generous for a shared machine; benchmarks measure it
        assert st.protected_until >= changed - 1  # the new recovery point covers the change
        s = _samples(metrics)
        assert s[("drsvc_source_watching", (("source", "docs"), ("tenant", "fin")))] == 1
    finally:
        await sup.stop(5)
    await app.restore("docs", tmp_path / "out", None, "b")
    await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_the_watch_limit_falls_back_to_scanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)

    class Limited(watch.INotify):  # type: ignore[misc]
        def add_watch(self, path: Any, mask: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(watch, "INotify", Limited)
    cfg = make_config(tmp_path, src, local_sites(tmp_path, ["a"]), source={"watch": True, "interval": "1d"})
    app = await init_app(cfg)
    metrics = Metrics()
    sup = Supervisor(app, metrics)
    try:
        await sup.start_watchers()
        st = sup.sources["docs"]
        assert st.watch_failed and "max_user_watches" in st.watch_failed
        s = _samples(metrics)
        assert s[("drsvc_source_watching", (("source", "docs"), ("tenant", "fin")))] == 0
        st.last_snapshot = 1000.0
        assert sup.next_due("docs", st) == 1000.0 + WATCH_FALLBACK  # scanned every minute, not every day
    finally:
        await sup.stop(1)
        await app.close()


async def test_a_change_after_quiet_is_snapshotted_at_once_and_a_burst_is_coalesced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_config(tmp_path, src, local_sites(tmp_path, ["a"]), source={"watch": True, "interval": "1d"})
    app = await init_app(cfg)
    now = [10_000.0]
    sup = Supervisor(app, Metrics(), clock=lambda: now[0])
    try:
        st = sup.sources["docs"]
        st.last_snapshot = st.snapshot_ended = 9_000.0
        sup.changed("docs")  # quiet since the last snapshot: due at once
        assert sup.next_due("docs", st) == 10_000.0
        st.snapshot_ended = 10_000.2  # a snapshot ran; more changes came during it (a burst): debounced
        st.changed_first = 10_000.1
        now[0] = 10_000.3
        sup.changed("docs")
        assert sup.next_due("docs", st) == pytest.approx(10_000.3 + DEBOUNCE)
    finally:
        await sup.stop(1)
        await app.close()
