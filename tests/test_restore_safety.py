"""Crafted snapshots (path traversal, absolute names, symlink tricks) write nothing outside the target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard
from helpers import init_app, local_sites, make_config

from drsvc.app import App
from drsvc.core import crypto, format
from drsvc.core.crypto import BlobType, ObjectType
from drsvc.core.errors import RestoreError, UnsafePathError
from drsvc.core.format import Node, PackIndex, PackWriter, SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import new_id, now_ns


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
