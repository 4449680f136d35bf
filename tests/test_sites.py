"""Copy policy, site failure and integrity fallback against real SeaweedFS sites."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedServer
from helpers import init_app, make_config, tree_state

from drsvc.app import App
from drsvc.core.errors import IntegrityError, ReplicationError, WrongKeyError
from drsvc.core.layout import Kind
from replicator import replicate, require_protected


def s3_site(server: WeedServer, bucket: str) -> dict[str, Any]:
    return {
        "type": "s3",
        "endpoint": server.endpoint,
        "bucket": bucket,
        "secure": False,
        "timeout": 5,
        "create_bucket": True,
        "access_key": {"value": server.access_key},
        "secret_key": {"value": server.secret_key},
    }


def corpus(src: Path, seed: int = 3) -> None:
    rng = random.Random(seed)
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"{i}.txt").write_bytes(f"record {i}\n".encode() * rng.randint(1, 5000))
    (src / "blob.bin").write_bytes(rng.randbytes(1_500_000))


async def test_one_site_down_stays_protected_and_catches_up(tmp_path: Path, seaweed_factory: Any) -> None:
    servers = [seaweed_factory() for _ in range(3)]
    sites = {f"s{i}": s3_site(s, "drsvc") for i, s in enumerate(servers)}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=2))
    try:
        servers[2].stop()
        o = await app.snapshot("docs")
        assert o.protection.protected
        assert set(o.protection.holding) == {"s0", "s1"} and o.protection.lacking == ("s2",)
        failed = {r.site: r.error for r in o.reports}
        assert failed["s2"] and not failed["s0"] and not failed["s1"]
        backlog = app.spool.outbox.backlog("s2")
        assert backlog.objects > 0 and backlog.bytes > 0
        servers[2].start()
        reports = await replicate(app.spool, [app.store("s2")])
        assert reports[0].error is None
        assert app.spool.outbox.backlog("s2").objects == 0
        assert not any((app.config.state.dir / "spool").rglob("data/*/*"))  # every spool file shipped
        r = await app.restore("docs", tmp_path / "out", None, site="s2")
        assert r.site == "s2" and not r.fallbacks
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_two_of_three_sites_down_fails_naming_them(tmp_path: Path, seaweed_factory: Any) -> None:
    servers = [seaweed_factory() for _ in range(3)]
    sites = {f"s{i}": s3_site(s, "drsvc") for i, s in enumerate(servers)}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=2))
    try:
        servers[1].stop()
        servers[2].stop()
        o = await app.snapshot("docs")
        assert not o.protection.protected
        with pytest.raises(ReplicationError) as ei:
            require_protected(o.protection, o.reports, "docs")
        text = str(ei.value)
        assert "s1:" in text and "s2:" in text and "1 of the 2" in text
        # nothing lost: the objects wait in the spool for the two sites
        assert app.spool.outbox.backlog("s1").objects > 0
        assert app.spool.outbox.backlog("s2").objects > 0
    finally:
        await app.close()


def _flip_byte_in_every_pack(server: WeedServer, bucket: str) -> list[str]:
    c = server.client()
    keys = [o.object_name for o in c.list_objects(bucket, prefix="fin/data/", recursive=True)]
    for key in keys:
        resp = c.get_object(bucket, key)
        data = bytearray(resp.read())
        resp.close()
        resp.release_conn()
        data[len(data) // 3] ^= 0x40
        c.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    return [k for k in keys if k]


async def test_corrupt_pack_at_one_site_is_read_from_another(tmp_path: Path, seaweed: WeedServer) -> None:
    sites = {"a": s3_site(seaweed, seaweed.make_bucket()), "b": s3_site(seaweed, seaweed.make_bucket())}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=2))
    try:
        await app.snapshot("docs")
        damaged = _flip_byte_in_every_pack(seaweed, sites["a"]["bucket"])
        assert damaged
        r = await app.restore("docs", tmp_path / "out", None, site="a")
        assert r.fallbacks and all(f.site == "a" for f in r.fallbacks)
        assert any("authentication" in f.error for f in r.fallbacks)
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)

    # with site a alone, the restore fails naming the object and the site, and leaves no target behind
    only_a = await init_app(make_config(tmp_path, src, {"a": sites["a"]}))
    try:
        with pytest.raises(IntegrityError) as ei:
            await only_a.restore("docs", tmp_path / "out-a", None)
    finally:
        await only_a.close()
    msg = str(ei.value)
    assert "a:" in msg and "data/" in msg
    assert not (tmp_path / "out-a").exists()
    assert not [p for p in tmp_path.iterdir() if "drsvc-restore" in p.name]


async def test_wrong_passphrase_is_a_clear_error(tmp_path: Path, seaweed: WeedServer) -> None:
    sites = {"a": s3_site(seaweed, seaweed.make_bucket())}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites))
    await app.close()
    bad = App(make_config(tmp_path, src, sites, passphrase="guess"))
    try:
        with pytest.raises(WrongKeyError) as ei:
            await bad.open_repo("fin")
    finally:
        await bad.close()
    assert "wrong passphrase" in str(ei.value) and "tenant=fin" in str(ei.value)


async def test_ls_shows_which_sites_hold_each_snapshot(tmp_path: Path, seaweed: WeedServer) -> None:
    sites = {"a": s3_site(seaweed, seaweed.make_bucket()), "b": s3_site(seaweed, seaweed.make_bucket())}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=1))
    try:
        o = await app.snapshot("docs")
        repo = await app.open_repo("fin")
        # remove the record from site b: ls must show it at a only
        tag = repo.keys.source_tag("docs")
        handles = await repo.list_handles(Kind.SNAPSHOT, tag, store=app.store("b"))
        await app.store("b").delete(repo.layout.key(handles[0]))
        records, holders = await app.snapshots("docs")
    finally:
        await app.close()
    assert [r.id for r in records] == [o.result.record.id]
    assert holders[o.result.record.id] == {"a"}
