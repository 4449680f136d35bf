"""Crafted snapshots (path traversal, absolute names, symlink tricks) write nothing outside the target."""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard
from helpers import init_app, local_sites, make_config, tree_state

from drsvc.app import App
from drsvc.core import crypto, format
from drsvc.core.crypto import BlobType, ObjectType
from drsvc.core.errors import DRError, RestoreError, StoreError, UnsafePathError
from drsvc.core.format import Node, PackIndex, PackWriter, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import new_id, now_ns
from drsvc.core.stores.faults import Fault, FaultyStore
from restore import Staging, Stopped


async def forge(app: App, trees: list[list[Node]], payload: bytes = b"evil\n") -> bytes:
    """Write a snapshot whose last tree is the root straight to site `a`, bypassing every check."""
    repo = await app.open_repo("fin")
    keys, cid_fn = repo.keys, repo.keys.content_id_function()
    cctx = zstandard.ZstdCompressor()
    pw = PackWriter(keys, new_id())
    cid = cid_fn(payload)
    pw.add(BlobType.DATA, cid, format.encode_payload(payload, cctx), len(payload))
    tid = b""
    for nodes in trees:
        data = format.encode_tree(
            [
                n
                if n.content or n.kind != "f"
                else Node(
                    **{**{s: getattr(n, s) for s in Node.__slots__}, "content": (cid,), "size": len(payload)}
                )
                for n in nodes
            ]
        )
        tid = cid_fn(data)
        pw.add(BlobType.TREE, tid, format.encode_payload(data, cctx), len(data))
    store = app.store("a")
    await store.put(repo.layout.key(Handle(Kind.PACK, pw.name)), pw.finish())
    iname = new_id()
    idx = format.encode_index([PackIndex(pw.name, pw.cipher.salt, tuple(pw.entries))])
    await store.put(
        repo.layout.key(Handle(Kind.INDEX, iname)), crypto.seal_object(keys, ObjectType.INDEX, iname, idx)
    )
    rec = SnapshotRecord(id=new_id(), tenant="fin", source="docs", time_ns=now_ns(), tree=tid)
    sealed = crypto.seal_object(keys, ObjectType.SNAPSHOT, rec.id, format.encode_snapshot(rec))
    await store.put(repo.layout.key(Handle(Kind.SNAPSHOT, rec.id, keys.source_tag("docs"))), sealed)
    return tid


def f(name: bytes) -> Node:
    return Node(name=name, kind="f", mode=0o644, mtime_ns=0)


@pytest.mark.parametrize("bad", [b"../escaped", b"..", b".", b"/abs", b"a/../../escaped", b"", b"nul\0byte"])
async def test_unsafe_names_are_refused_and_nothing_is_written(tmp_path: Path, bad: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    work = tmp_path / "work"
    work.mkdir()
    try:
        await forge(app, [[f(b"fine.txt"), f(bad)]])
        with pytest.raises(UnsafePathError):
            await app.restore("docs", work / "target", None)
    finally:
        await app.close()
    assert os.listdir(work) == []  # no target, no staging directory
    assert not (tmp_path / "escaped").exists() and not Path("/abs").exists()


async def test_duplicate_name_symlink_then_directory_is_refused(tmp_path: Path) -> None:
    """A symlink 'd' -> outside and a directory 'd' holding a file: the file must never land outside."""
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        sub_tree = [f(b"payload.txt")]
        sub_id = await forge(app, [sub_tree])
        link = Node(name=b"d", kind="l", mode=0o777, mtime_ns=0, target=str(outside).encode())
        d = Node(name=b"d", kind="d", mode=0o755, mtime_ns=0, subtree=sub_id)
        await forge(app, [sub_tree, [link, d]])
        with pytest.raises(UnsafePathError):
            await app.restore("docs", tmp_path / "target", None)
    finally:
        await app.close()
    assert os.listdir(outside) == []
    assert not (tmp_path / "target").exists()


async def test_symlinks_are_restored_as_links_and_never_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        sub_tree = [f(b"payload.txt")]
        sub_id = await forge(app, [sub_tree])
        root = [
            Node(name=b"a-link", kind="l", mode=0o777, mtime_ns=0, target=str(outside).encode()),
            Node(name=b"z-dir", kind="d", mode=0o755, mtime_ns=0, subtree=sub_id),
            Node(name=b"up", kind="l", mode=0o777, mtime_ns=0, target=b"../../../etc/passwd"),
        ]
        await forge(app, [sub_tree, root])
        await app.restore("docs", tmp_path / "target", None)
    finally:
        await app.close()
    t = tmp_path / "target"
    assert os.readlink(t / "a-link") == str(outside) and os.readlink(t / "up") == "../../../etc/passwd"
    assert (t / "z-dir" / "payload.txt").read_bytes() == b"evil\n"
    assert os.listdir(outside) == []


async def test_target_that_is_a_symlink_or_not_empty_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("x")
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "link")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("keep")
    try:
        await app.snapshot("docs")
        with pytest.raises(RestoreError, match="symlink"):
            await app.restore("docs", tmp_path / "link", None)
        with pytest.raises(RestoreError, match="not empty"):
            await app.restore("docs", busy, None)
    finally:
        await app.close()
    assert os.listdir(elsewhere) == [] and os.listdir(busy) == ["keep.txt"]


# ---- a stopped restore leaves nothing behind --------------------------------------------------------------


def _fill(src: Path) -> None:
    """Many small files in many directories (some read-only), a few larger ones, a symlink to a directory:
    a restore of it takes long enough to be stopped while its threads write."""
    rnd = random.Random(7)
    for d in range(16):
        sub = src / f"d{d:02}"
        sub.mkdir()
        for i in range(100):
            (sub / f"f{i:03}").write_bytes(rnd.randbytes(rnd.randrange(64, 6000)))
        if d % 4 == 0:
            (sub / "big").write_bytes(rnd.randbytes(1 << 20))
            sub.chmod(0o555)
    os.symlink("d01", src / "to-dir")


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if "drsvc-restore" in n)


def _assert_nothing(parent: Path, target: Path, existed: bool) -> None:
    assert _leftovers(parent) == []
    if existed:
        assert target.is_dir() and os.listdir(target) == []
    else:
        assert not os.path.lexists(target)


class _Watch:
    """A progress callback that remembers whether it was called after the restore had ended."""

    def __init__(self) -> None:
        self.calls = 0
        self.ended = False
        self.late = 0

    def __call__(self, _p: object) -> None:
        self.calls += 1
        if self.ended:
            self.late += 1


@pytest.fixture
async def big_app(tmp_path: Path) -> AsyncIterator[App]:
    src = tmp_path / "src"
    src.mkdir()
    _fill(src)
    config = make_config(tmp_path, src, local_sites(tmp_path, ["a"]), tenant={"pack_size": "256KiB"})
    app = await init_app(config)
    try:
        await app.snapshot("docs")
        yield app
    finally:
        await app.close()


async def test_a_cancelled_restore_leaves_no_staging_and_no_target(
    tmp_path: Path, big_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    took = []
    for name in ("full", "warm"):  # the warm restore's time: the cancelled ones below run warm too
        started = time.monotonic()
        await big_app.restore("docs", work / name, None)
        took.append(time.monotonic() - started)
        assert tree_state(work / name) == tree_state(tmp_path / "src")
    full = min(took)
    cancelled = 0
    for i, frac in enumerate([0.0, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95]):
        target = work / f"t{i}"
        existed = i % 2 == 1
        if existed:
            target.mkdir()
        watch = _Watch()
        task = asyncio.ensure_future(big_app.restore("docs", target, None, progress=watch))
        await asyncio.sleep(full * frac)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
            watch.ended = True
            _assert_nothing(work, target, existed)
            await asyncio.sleep(0.2)  # no thread of the restore writes on
            _assert_nothing(work, target, existed)
            assert watch.late == 0
        else:  # it finished first: then it is whole
            assert tree_state(target) == tree_state(tmp_path / "src")
    assert cancelled >= 5
    assert not [r for r in caplog.records if r.name == "asyncio"]  # e.g. "exception was never retrieved"


class _Boom(Exception):
    pass


class _StopAt:
    """A progress callback that cancels the restore (or raises) at its k-th report."""

    def __init__(self, k: int, how: str) -> None:
        self.k, self.how = k, how
        self.calls = 0
        self.task: asyncio.Future[object] | None = None
        self.loop = asyncio.get_running_loop()

    def __call__(self, _p: object) -> None:
        self.calls += 1
        if self.calls == self.k:
            if self.how == "error":
                raise _Boom
            assert self.task is not None
            self.loop.call_soon_threadsafe(self.task.cancel)


async def test_a_restore_stopped_from_its_progress_callback_leaves_nothing(
    tmp_path: Path, big_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """Deterministic moments: cancelled, or failed, at the k-th progress report (mid-write)."""
    work = tmp_path / "work"
    work.mkdir()
    for k in (1, 3, 10, 30):
        for how in ("cancel", "error"):
            target = work / f"t{k}-{how}"
            existed = k % 2 == 1
            if existed:
                target.mkdir()
            stop = _StopAt(k, how)
            stop.task = asyncio.ensure_future(big_app.restore("docs", target, None, progress=stop))
            with pytest.raises(asyncio.CancelledError if how == "cancel" else _Boom):
                await stop.task
            _assert_nothing(work, target, existed)
            await asyncio.sleep(0.1)
            _assert_nothing(work, target, existed)
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_what_finish_adds_goes_in_place_with_the_tree_or_not_at_all(
    tmp_path: Path, big_app: App
) -> None:
    """restore_tree's `finish` (a postgres restore's recovery settings) writes into the staging directory:
    its files arrive with the tree, and when it fails the target is left as it was."""
    from restore import restore_tree

    repo = await big_app.open_repo("fin")
    work = tmp_path / "work"
    work.mkdir()

    def settings(staging: Path) -> None:
        (staging / "recovery.signal").write_bytes(b"")

    done = await restore_tree(repo, "docs", work / "ok", finish=settings)
    assert (work / "ok" / "recovery.signal").exists() and done.files > 0

    def broken(staging: Path) -> None:
        (staging / "half.conf").write_bytes(b"x")
        raise OSError(28, "No space left on device", str(staging / "half.conf"))

    for existed in (False, True):
        target = work / f"t-{existed}"
        if existed:
            target.mkdir()
        with pytest.raises(RestoreError, match="No space left"):
            await restore_tree(repo, "docs", target, finish=broken)
        _assert_nothing(work, target, existed)


async def test_a_restore_failing_to_fetch_mid_way_leaves_nothing(tmp_path: Path, big_app: App) -> None:
    repo = await big_app.open_repo("fin")
    packs = sorted(h.name for h in await repo.list_handles(Kind.PACK))
    assert len(packs) > 8
    work = tmp_path / "work"
    work.mkdir()
    healthy = big_app.store("a")
    for n, pack in enumerate(packs[len(packs) // 3 :: max(1, len(packs) // 4)]):
        big_app._stores["a"] = FaultyStore(
            healthy, [Fault("get", key_contains=pack, error=StoreError("disk on fire", site="a"))]
        )
        target = work / f"t{n}"
        if n % 2:
            target.mkdir()
        with pytest.raises(DRError, match="disk on fire"):
            await big_app.restore("docs", target, None)
        _assert_nothing(work, target, existed=bool(n % 2))
        await asyncio.sleep(0.1)
        _assert_nothing(work, target, existed=bool(n % 2))
    big_app._stores["a"] = healthy


@pytest.mark.parametrize("existed", [False, True])
async def test_a_tree_moved_into_place_is_moved_out_again_when_the_restore_is_abandoned(
    tmp_path: Path, existed: bool
) -> None:
    """A cancellation (or failure) that overtakes the final rename: the target is as it was before."""
    target = tmp_path / "target"
    if existed:
        target.mkdir(0o750)
        os.utime(target, ns=(1_000_000_000, 2_000_000_000))
    staging = await Staging.create(target, scratch=("gens",))
    (staging.path / "sub").mkdir()
    (staging.path / "sub" / "file").write_bytes(b"restored")
    (staging.path / "sub").chmod(0o555)
    os.symlink("sub", staging.path / "link")
    await staging.fence.run(staging.move_into_place, None)
    assert (target / "sub" / "file").read_bytes() == b"restored"
    await staging.abandon()
    _assert_nothing(tmp_path, target, existed)
    if existed:
        st = target.stat()
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime_ns == 2_000_000_000
    with pytest.raises(Stopped):  # the fence stays closed: nothing more runs behind it
        await staging.fence.run(os.mkdir, str(target / "late"))
