"""Watched trees: a snapshot that lists only what the watcher saw change equals a full walk of the same state,
and everything uncertain falls back to the full walk."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from helpers import init_app, local_sites, make_config, tree_state
from hypothesis import HealthCheck, given, settings
from inotify_simple import Event, flags

import replicator
from drsvc import watch
from drsvc.app import App
from drsvc.core.layout import Handle, Kind
from drsvc.watch import TreeWatcher
from snapshot.dedup import IndexCache
from snapshot.tree import Changes, SnapshotResult


def _seed(root: Path, rng: random.Random) -> None:
    for d in ("a", "a/b", "a/b/c", "d", "e/f"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(12):
        d = rng.choice(["", "a", "a/b", "a/b/c", "d", "e/f"])
        (root / d / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    os.symlink("a/f0", root / "link")


def _dirs(root: Path) -> list[Path]:
    return [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def mutate(root: Path, rng: random.Random, n: int) -> list[str]:
    """`n` random operations of the kinds a watcher must see; what was done, for the failure message."""
    done = []
    for i in range(n):
        op = rng.choice(
            [
                "create",
                "rewrite",
                "append",
                "delete",
                "rename",
                "chmod",
                "mkdir",
                "rmtree",
                "mvdir",
                "mvdir-out-in",
                "chmod-dir",
                "symlink",
                "hardlink",
                "utime",
            ]
        )
        files, dirs = _files(root), _dirs(root)
        d = rng.choice(dirs)
        tag = f"n{rng.randrange(10**6)}_{i}"
        if op in ("rewrite", "append", "delete", "rename", "chmod", "utime", "hardlink") and not files:
            op = "create"
        if op == "create":
            (d / tag).write_bytes(rng.randbytes(rng.randint(0, 5000)))
        elif op == "rewrite":
            f = rng.choice(files)
            f.write_bytes(
                rng.randbytes(f.stat().st_size + rng.randint(1, 500))
            )  # a new size, even in the same tick
        elif op == "append":
            with rng.choice(files).open("ab") as fh:
                fh.write(rng.randbytes(rng.randint(1, 500)))
        elif op == "delete":
            rng.choice(files).unlink()
        elif op == "rename":
            rng.choice(files).rename(d / tag)
        elif op == "chmod":
            rng.choice(files).chmod(rng.choice([0o600, 0o644, 0o755]))
        elif op == "utime":
            t = rng.randint(10**18, 2 * 10**18)
            os.utime(rng.choice(files), ns=(t, t))
        elif op == "mkdir":
            (d / tag / "sub").mkdir(parents=True)
            (d / tag / "sub" / "x").write_bytes(rng.randbytes(100))
        elif op in ("rmtree", "mvdir", "chmod-dir") and d == root:
            op = "mkdir"
            (root / tag).mkdir()
        elif op == "rmtree":
            shutil.rmtree(d)
        elif op == "mvdir":
            target = rng.choice([p for p in _dirs(root) if not p.is_relative_to(d)])
            d.rename(target / tag)
        elif op == "mvdir-out-in":  # built outside the tree, then moved in whole
            outside = root.parent / f"outside-{tag}"
            (outside / "deeper").mkdir(parents=True)
            (outside / "deeper" / "y").write_bytes(rng.randbytes(300))
            outside.rename(d / tag)
        elif op == "chmod-dir":
            d.chmod(rng.choice([0o700, 0o755, 0o750]))
        elif op == "symlink":
            os.symlink(tag, d / tag)
        elif op == "hardlink":  # written through the other link: no event in the first one's directory
            f = rng.choice(files)
            os.link(f, d / tag)
            with (d / tag).open("ab") as fh:
                fh.write(b"via the other link")
        done.append(op)
    return done


@asynccontextmanager
async def watched(tmp: Path, src: Path) -> AsyncIterator[tuple[App, TreeWatcher, IndexCache]]:
    app = await init_app(make_config(tmp, src, local_sites(tmp, ["a", "b"]), min_copies=2))
    w = TreeWatcher(src, lambda: None)
    assert await w.start()
    try:
        yield app, w, IndexCache()
    finally:
        w.close()
        await app.close()


async def snap(app: App, w: TreeWatcher, cache: IndexCache, full: bool = False) -> SnapshotResult:
    """A snapshot as the daemon takes it, then shipped to both sites."""
    result = await app.snapshot_to_spool("docs", changes=w.take, index_cache=cache, full=full)
    done = asyncio.Event()
    done.set()
    await replicator.replicate(app.spool, [app.store("a"), app.store("b")], {"a": 2, "b": 2}, done=done)
    return result


def same_tree(a: SnapshotResult, b: SnapshotResult) -> None:
    assert a.record.tree == b.record.tree  # keyed hashes of every tree: the same trees, all the way down
    assert a.record.root == b.record.root
    for k in ("files", "dirs", "symlinks", "bytes_total"):
        assert a.stats.as_dict()[k] == b.stats.as_dict()[k], k


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), rounds=st.lists(st.integers(1, 8), min_size=1, max_size=3))
async def test_an_incremental_snapshot_equals_a_full_walk(
    tmp_path_factory: pytest.TempPathFactory, seed: int, rounds: list[int]
) -> None:
    tmp = tmp_path_factory.mktemp("inc")
    src = tmp / "src"
    rng = random.Random(seed)
    _seed(src, rng)
    kept: list[int] = []  # directories kept unlisted (incrementality itself: the tests below)
    async with watched(tmp, src) as (app, w, cache):
        await snap(app, w, cache, full=True)
        for n in rounds:
            ops = mutate(src, rng, n)
            inc = await snap(app, w, cache)
            kept.append(inc.stats.dirs_kept)
            await app.restore("docs", tmp / "out", None)
            assert tree_state(tmp / "out") == tree_state(src), ops
            shutil.rmtree(tmp / "out")
            full = await snap(app, w, cache, full=True)
            assert full.stats.dirs_kept == 0
            same_tree(inc, full)


async def test_only_changed_directories_are_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(1))
    async with watched(tmp_path, src) as (app, w, cache):
        first = await snap(app, w, cache, full=True)
        (src / "a" / "b" / "c" / "new").write_text("x")
        inc = await snap(app, w, cache)
        # listed: the root, a, a/b, a/b/c; kept: d, e, e/f
        assert inc.stats.dirs_kept == 3 and inc.stats.dirs == first.stats.dirs
        assert inc.stats.files == first.stats.files + 1
        quiet = await snap(app, w, cache)  # nothing changed: only the root is listed
        assert quiet.record.tree == inc.record.tree and quiet.stats.dirs_kept == first.stats.dirs - 1


async def test_the_first_snapshot_and_a_periodic_rescan_walk_everything(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(2))
    async with watched(tmp_path, src) as (app, w, cache):
        assert (await snap(app, w, cache)).stats.dirs_kept == 0  # first after start: take() is None
        (src / "d" / "g").write_text("x")
        assert (await snap(app, w, cache, full=True)).stats.dirs_kept == 0
        (src / "d" / "h").write_text("x")
        assert (await snap(app, w, cache)).stats.dirs_kept > 0


class Overflowing(watch.INotify):  # type: ignore[misc]
    overflow = False

    def read(self, *args: Any, **kw: Any) -> list[Event]:
        events = list(super().read(*args, **kw))
        if Overflowing.overflow:
            Overflowing.overflow = False
            events.append(Event(-1, flags.Q_OVERFLOW, 0, ""))
        return events


async def test_a_queue_overflow_means_a_full_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "INotify", Overflowing)
    src = tmp_path / "src"
    _seed(src, random.Random(3))
    w = TreeWatcher(src, lambda: None)
    assert await w.start()
    try:
        assert w.take() is None  # the first snapshot walks everything
        (src / "a" / "x").write_text("1")
        assert w.take() == Changes(frozenset({"a"}), frozenset())
        Overflowing.overflow = True
        (src / "d" / "y").write_text("1")
        assert w.take() is None
        (src / "d" / "z").write_text("1")
        assert w.take() == Changes(frozenset({"d"}), frozenset())
    finally:
        w.close()


async def test_an_unwatchable_directory_means_full_walks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Denied(watch.INotify):  # type: ignore[misc]
        def add_watch(self, path: Any, mask: int) -> int:
            if str(path).endswith("/d"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return int(super().add_watch(path, mask))

    monkeypatch.setattr(watch, "INotify", Denied)
    src = tmp_path / "src"
    _seed(src, random.Random(4))
    w = TreeWatcher(src, lambda: None)
    assert await w.start()
    try:
        for _ in range(3):
            (src / "a" / "x").write_text("1")
            assert w.take() is None
    finally:
        w.close()


async def test_events_name_the_directories_and_new_subtrees(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(5))
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    w = TreeWatcher(src, lambda: None)
    assert await w.start()
    try:
        w.take()
        (src / "a" / "b" / "f1").write_text("changed")
        outside.rename(src / "d" / "moved")
        (src / "e" / "f").chmod(0o700)  # the directory's own node lives in e/
        c = w.take()
        assert c is not None
        assert {"a/b", "d", "e"} <= c.dirs and c.deep == {"d/moved"}
        (src / "d" / "moved" / "deep" / "g").write_text("1")  # watched now, under its new name
        assert w.take() == Changes(frozenset({"d/moved/deep"}), frozenset())
        src.rename(tmp_path / "elsewhere")  # the root itself moved: nothing is certain
        assert w.take() is None
    finally:
        w.close()


async def test_a_failed_snapshot_puts_its_changes_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(6))
    w = TreeWatcher(src, lambda: None)
    assert await w.start()
    try:
        w.take()
        (src / "a" / "x").write_text("1")
        taken = w.take()
        (src / "d" / "y").write_text("1")
        w.put_back(taken)
        assert w.take() == Changes(frozenset({"a", "d"}), frozenset())
        w.put_back(None)
        assert w.take() is None
    finally:
        w.close()


async def test_a_new_prune_marker_reloads_the_cached_index_and_walks_everything(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(7))
    async with watched(tmp_path, src) as (app, w, cache):
        await snap(app, w, cache, full=True)
        (src / "a" / "n1").write_text("1")
        assert (await snap(app, w, cache)).stats.dirs_kept > 0
        repo = await app.open_repo("fin")
        for site in ("a", "b"):  # a prune run condemned packs: the listing shows a marker not seen before
            await app.store(site).put(repo.layout.key(Handle(Kind.PRUNE, "f" * 32)), b"sealed marker")
        (src / "a" / "n2").write_text("1")
        after = await snap(app, w, cache)
        assert after.stats.dirs_kept == 0  # reloaded from the sites: not known to cover the parent
        (src / "a" / "n3").write_text("1")
        assert (await snap(app, w, cache)).stats.dirs_kept == 0  # the marker is unreadable: it never settles


async def test_a_cached_index_expires(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _seed(src, random.Random(8))
    async with watched(tmp_path, src) as (app, w, _):
        cache = IndexCache(max_age=2.0)
        await snap(app, w, cache, full=True)
        (src / "a" / "n1").write_text("1")
        assert (await snap(app, w, cache)).stats.dirs_kept > 0
        await asyncio.sleep(2.1)
        (src / "a" / "n2").write_text("1")
        assert (await snap(app, w, cache)).stats.dirs_kept == 0
