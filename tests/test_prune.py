"""Prune: two phases with a grace period, repack, deletion at every site, writers running concurrently."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import WeedServer
from helpers import FAST_SCRYPT, init_app, local_sites, make_config, tree_state
from test_sites import s3_site

import restore
from drsvc.app import App
from drsvc.check import check_site
from drsvc.cli.main import EXIT_USAGE, main
from drsvc.core.config import load_config
from drsvc.core.errors import ObjectLocked, TransientStoreError
from drsvc.core.layout import Kind
from drsvc.core.repository import Repository
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.prune import NS, due_now, id_set, prune_tenant

TENANT = {"pack_size": "256KiB"}  # small packs: a few files each, so forgetting leaves some partly used


def write_files(root: Path, names: list[str], seed: int, size: int = 40_000) -> None:
    rng = random.Random(seed)
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))


async def listing(app: App, site: str, kind: Kind) -> set[str]:
    repo = await app.open_repo("fin")
    return {h.name for h in await repo.list_handles(kind, store=app.store(site))}


async def assert_clean(app: App, sites: list[str]) -> None:
    repo = await app.open_repo("fin")
    for s in sites:
        res = await check_site(repo, app.store(s), read_data=True)
        assert res.ok, (s, res.problems)


async def history(app: App, src: Path) -> dict[str, tuple[int, Any]]:
    """Three snapshots; the first two hold files that later ones do not."""
    states = {}
    write_files(src, [f"old/{i}" for i in range(12)], seed=1)
    write_files(src, [f"keep/{i}" for i in range(6)], seed=2)
    for step in range(3):
        if step == 1:
            for i in range(0, 12, 2):  # half of the old files go: their packs become partly used
                (src / f"old/{i}").unlink()
        if step == 2:
            for i in range(1, 12, 2):
                (src / f"old/{i}").unlink()
            write_files(src, [f"new/{i}" for i in range(4)], seed=3)
        o = await app.snapshot("docs")
        states[o.result.record.id] = (o.result.record.time_ns, tree_state(src))
    return states


async def test_condemn_then_sweep_after_the_grace_period(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sites = ["a", "b"]
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, sites), tenant=TENANT, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        states = await history(app, src)
        latest = max(states, key=lambda k: states[k][0])
        await app.forget("docs")
        packs_before = await listing(app, "a", Kind.PACK)
        assert packs_before == await listing(app, "b", Kind.PACK)

        dry = await prune_tenant(app, "fin", grace=3600, dry_run=True, repack_waste=1.0)
        assert dry.condemned and not dry.deleted
        assert await listing(app, "a", Kind.PRUNE) == set()

        first = await prune_tenant(app, "fin", grace=1.0, repack_waste=1.0)
        assert set(first.condemned) == set(dry.condemned) and not first.deleted
        assert first.waiting == len(first.condemned) and first.next_sweep_ns
        for s in sites:  # condemned, not deleted: the marker is at every site
            assert await listing(app, s, Kind.PACK) == packs_before
            assert len(await listing(app, s, Kind.PRUNE)) == 1

        await asyncio.sleep(1.1)
        second = await prune_tenant(app, "fin", grace=1.0, repack_waste=1.0)
        assert set(second.deleted) == set(first.condemned) and not second.condemned
        assert second.waiting == 0 and second.indexes_rewritten
        for s in sites:
            assert await listing(app, s, Kind.PACK) == packs_before - set(first.condemned)
            assert await listing(app, s, Kind.PRUNE) == set()
        await assert_clean(app, sites)
        for s in sites:
            target = tmp_path / f"r-{s}"
            r = await app.restore("docs", target, None, s)
            assert r.snapshot.id == latest and tree_state(target) == states[latest][1]

        third = await prune_tenant(app, "fin", grace=1.0, repack_waste=1.0)  # nothing left to do
        assert not third.condemned and not third.deleted and not third.waiting
    finally:
        await app.close()


async def test_repack_keeps_used_blobs_and_frees_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sites = ["a", "b"]
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, sites), tenant=TENANT, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        states = await history(app, src)
        latest = max(states, key=lambda k: states[k][0])
        await app.forget("docs")
        stale = await app.open_repo("fin")  # a restore that read the index before the prune
        await stale.load_index()
        r = await prune_tenant(app, "fin", grace=0, repack_waste=0.1)
        assert r.repacked and r.repack_blobs and r.deleted
        assert set(r.repacked) <= set(r.deleted)
        assert r.waiting == 0
        for s in sites:
            packs = await listing(app, s, Kind.PACK)
            assert not packs & set(r.deleted)
        await assert_clean(app, sites)
        again = await prune_tenant(app, "fin", grace=0, repack_waste=0.1)
        assert not again.repacked and not again.deleted  # nothing wasteful is left
        target = tmp_path / "r"
        res = await app.restore("docs", target, None, "b")
        assert res.snapshot.id == latest and tree_state(target) == states[latest][1]
        # the stale reader finds the repacked blobs in their new packs
        res = await restore.restore_tree(stale, "docs", tmp_path / "r-stale", None)
        assert res.snapshot.id == latest and tree_state(tmp_path / "r-stale") == states[latest][1]
    finally:
        await app.close()


async def test_a_writer_that_read_the_index_before_the_marker_gets_its_packs_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep takes back a condemned pack that a snapshot written since references (a writer that loaded
    the index before the marker existed), and a writer that sees the marker stores the blobs again."""
    src = tmp_path / "src"
    src.mkdir()
    sites = ["a", "b"]
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, sites), tenant=TENANT, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        write_files(src, ["x/1", "x/2", "x/3"], seed=7)
        await app.snapshot("docs")
        saved = {p: p.read_bytes() for p in (src / "x").iterdir()}
        for p in saved:
            p.unlink()
        await app.snapshot("docs")
        await app.forget("docs")
        mark = await prune_tenant(app, "fin", grace=0.5, repack_waste=1.0)
        assert mark.condemned and not mark.deleted

        # a writer blind to the marker (it read the index before the marker was written) reuses the blobs
        for p, data in saved.items():
            p.write_bytes(data)
        blind = monkeypatch.context()
        with blind as m:

            async def no_markers(self: Repository, stores: Any = None) -> list[Any]:
                return []

            m.setattr(Repository, "prune_markers", no_markers)
            o = await app.snapshot("docs")
        assert o.result.record.stats["bytes_stored"] < 60_000  # the 120 kB of x/ were deduplicated
        await asyncio.sleep(0.6)
        sweep = await prune_tenant(app, "fin", grace=0.5, repack_waste=1.0)
        assert sweep.resurrected and not set(sweep.resurrected) & set(sweep.deleted)
        await assert_clean(app, sites)
        target = tmp_path / "r"
        res = await app.restore("docs", target, None, "a")
        assert tree_state(target) == tree_state(src) and res.snapshot.id == o.result.record.id

        # a writer that sees a marker does not deduplicate against condemned packs
        for p in saved:
            p.unlink()
        await app.snapshot("docs")
        await app.forget("docs")
        mark = await prune_tenant(app, "fin", grace=60, repack_waste=1.0)
        assert mark.condemned
        for p, data in saved.items():
            p.write_bytes(data)
        o = await app.snapshot("docs")
        assert o.result.record.stats["bytes_stored"] >= 120_000  # stored again, not referenced
    finally:
        await app.close()


async def test_a_site_that_cannot_be_listed_stops_prune_before_any_deletion(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sites = ["a", "b"]
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, sites), tenant=TENANT, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        await history(app, src)
        await app.forget("docs")
        before = {s: await listing(app, s, Kind.PACK) for s in sites}
        healthy = app.store("b")
        app._stores["b"] = FaultyStore(healthy, [Fault("list", error=TransientStoreError("down", site="b"))])
        with pytest.raises(TransientStoreError) as exc:
            await prune_tenant(app, "fin", grace=0)
        assert "b: down" in exc.value.message
        app._stores["b"] = healthy
        assert {s: await listing(app, s, Kind.PACK) for s in sites} == before
        assert await listing(app, "a", Kind.PRUNE) == set()
    finally:
        await app.close()


async def test_a_locked_pack_stays_condemned_and_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sites = ["a", "b"]
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, sites), tenant=TENANT, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        await history(app, src)
        await app.forget("docs")
        healthy = app.store("b")
        until = "2099-01-01T00:00:00Z"
        locked = ObjectLocked("object is locked", site="b", key="?", until=until)
        app._stores["b"] = FaultyStore(
            healthy, [Fault("delete", key_contains="/data/", error=locked, times=-1)]
        )
        r = await prune_tenant(app, "fin", grace=0, repack_waste=1.0)
        assert r.locked and {x.site for x in r.locked} == {"b"} and r.locked[0].until == until
        assert not r.deleted and r.waiting == len(r.condemned)
        assert len(await listing(app, "a", Kind.PRUNE)) == 1
        app._stores["b"] = healthy  # the retention has passed: the next run deletes them everywhere
        r2 = await prune_tenant(app, "fin", grace=3600, repack_waste=1.0)
        assert set(r2.deleted) == set(r.condemned) and not r2.waiting
        for s in sites:
            assert not await listing(app, s, Kind.PACK) & set(r.condemned)
            assert await listing(app, s, Kind.PRUNE) == set()
        await assert_clean(app, sites)
    finally:
        await app.close()


async def test_prune_while_a_snapshot_runs_on_two_seaweedfs_sites(
    tmp_path: Path, seaweed: WeedServer
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sites = {"a": s3_site(seaweed, seaweed.make_bucket()), "b": s3_site(seaweed, seaweed.make_bucket())}
    cfg = make_config(tmp_path, src, sites, tenant=TENANT, source={"retention": {"keep_last": 1}})
    app = await init_app(cfg)
    try:
        await history(app, src)
        await app.forget("docs")
        for i in range(30):  # a snapshot with enough to do to overlap both prune runs
            (src / "big").mkdir(exist_ok=True)
            (src / "big" / str(i)).write_bytes(os.urandom(200_000))
        # phase 1 beside one snapshot, phase 2 (after the grace period) beside another
        mark, snap1 = await asyncio.gather(prune_tenant(app, "fin", grace=1.0), app.snapshot("docs"))
        assert mark.condemned
        await asyncio.sleep(1.1)
        write_files(src, [f"later/{i}" for i in range(20)], seed=9, size=100_000)
        sweep, snap2 = await asyncio.gather(prune_tenant(app, "fin", grace=1.0), app.snapshot("docs"))
        assert sweep.deleted
        state = tree_state(src)
        for s in ("a", "b"):
            assert not await listing(app, s, Kind.PACK) & set(sweep.deleted)
        await assert_clean(app, ["a", "b"])
        for s in ("a", "b"):
            target = tmp_path / f"r-{s}"
            res = await app.restore("docs", target, None, s)
            assert res.snapshot.id == snap2.result.record.id and tree_state(target) == state
        first = tmp_path / "r-first"
        res = await app.restore("docs", first, snap1.result.record.time_ns, "b")
        assert res.snapshot.id == snap1.result.record.id
    finally:
        await app.close()


async def test_forget_reports_a_locked_record_and_deletes_it_once_the_lock_is_over(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_config(
        tmp_path,
        src,
        local_sites(tmp_path, ["a", "b"]),
        tenant=TENANT,
        source={"retention": {"keep_last": 1}},
    )
    app = await init_app(cfg)
    try:
        await history(app, src)
        healthy = app.store("b")
        locked = ObjectLocked("object is locked", site="b", key="?", until="2099-01-01T00:00:00Z")
        app._stores["b"] = FaultyStore(healthy, [Fault("delete", key_contains="/snapshots/", error=locked)])
        o = await app.forget("docs")
        assert o.complete and len(o.plan.forget) == 2
        assert o.locked == {r.id: {"b": "2099-01-01T00:00:00Z"} for r in o.plan.forget}
        assert o.deleted == {r.id: {"a"} for r in o.plan.forget}
        # the record kept at b keeps its data: prune treats every record at any site as kept
        r = await prune_tenant(app, "fin", grace=0, repack_waste=1.0)
        assert r.snapshots == 3 and not r.deleted
        app._stores["b"] = healthy
        o2 = await app.forget("docs")
        assert o2.deleted == {r.id: {"b"} for r in o.plan.forget} and not o2.locked
        r = await prune_tenant(app, "fin", grace=0, repack_waste=1.0)
        assert r.snapshots == 1 and r.deleted
        await assert_clean(app, ["a", "b"])
    finally:
        await app.close()


async def test_prune_on_a_seaweedfs_site_with_object_lock(tmp_path: Path, seaweed: WeedServer) -> None:
    """Locked packs survive prune (reported, still condemned); once their retention ends prune deletes them
    everywhere, permanently, and check is clean."""
    src = tmp_path / "src"
    src.mkdir()
    locked_site = s3_site(seaweed, seaweed.make_bucket(object_lock=True))
    locked_site["object_lock"] = "4s"
    sites = {"a": local_sites(tmp_path, ["a"])["a"], "b": locked_site}
    cfg = make_config(tmp_path, src, sites, tenant=TENANT, source={"retention": {"keep_last": 1}})
    app = await init_app(cfg)
    try:
        await history(app, src)
        o = await app.forget("docs")
        assert o.locked and o.deleted  # the records at b are locked too
        r = await prune_tenant(app, "fin", grace=0, repack_waste=1.0)
        assert r.snapshots == 3 and not r.condemned  # the records b keeps keep their data
        await asyncio.sleep(6.0)
        o = await app.forget("docs")
        assert not o.locked and all(s == {"b"} for s in o.deleted.values())
        r = await prune_tenant(app, "fin", grace=0, repack_waste=1.0)
        assert r.snapshots == 1 and r.condemned
        assert not r.locked or all(x.site == "b" for x in r.locked)
        if r.locked:  # written less than 4 s ago (the last snapshot's packs): deleted by a later run
            await asyncio.sleep(6.0)
            r2 = await prune_tenant(app, "fin", grace=3600, repack_waste=1.0)
            assert not r2.locked and not r2.waiting
        for s in ("a", "b"):
            assert not await listing(app, s, Kind.PACK) & set(r.condemned)
        await assert_clean(app, ["a", "b"])
    finally:
        await app.close()


def test_the_prune_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    text = (
        f'[state]\ndir = "{tmp_path}/state"\n[tenants.fin]\npack_size = "256KiB"\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a"]\n'
        "[sources.docs.retention]\nkeep_last = 1\n"
    )
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(text)

    async def make() -> None:
        app = App(load_config(cfg), workers=2)
        try:
            await app.init_tenant("fin", FAST_SCRYPT)
            await history(app, src)
        finally:
            await app.close()

    asyncio.run(make())
    assert main(["-c", str(cfg), "forget", "docs"]) == 0
    capsys.readouterr()
    assert main(["-c", str(cfg), "prune", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry[0]["tenant"] == "fin" and dry[0]["dry_run"] and dry[0]["condemned"] > 0
    assert main(["-c", str(cfg), "prune"]) == 0  # the default grace: condemned, nothing deleted yet
    text_out = capsys.readouterr().out
    assert "condemned" in text_out and "deleted after the grace period" in text_out
    assert main(["-c", str(cfg), "prune", "--grace", "0", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done[0]["deleted"] == dry[0]["condemned"] and done[0]["waiting"] == 0
    assert main(["-c", str(cfg), "check", "fin", "--read-data"]) == 0
    assert main(["-c", str(cfg), "prune", "--grace", "soon"]) == EXIT_USAGE
    assert "--grace" in capsys.readouterr().err
    assert main(["-c", str(cfg), "prune", "--tenant", "nobody"]) == EXIT_USAGE


def test_ids_ending_in_zero_bytes_survive_the_conversion_from_numpy() -> None:
    ids = [bytes(15) + b"\x00", b"\x01" * 15 + b"\x00", b"\x00\x01" + bytes(14), os.urandom(16)]
    arr = np.frombuffer(b"".join(ids), dtype="S16")
    assert id_set(arr) == frozenset(ids)
    assert {bytes(x) for x in arr} != set(ids)  # what numpy's own conversion does: trailing zeros dropped


def test_a_zero_grace_period_is_due_at_once_whatever_the_float_rounding() -> None:
    t = 2**60 + 255  # float(t) rounds up to 2**60 + 256
    assert float(t) + 0.0 > t
    assert due_now({"p": t}, 0.0, t) == {"p": t}
    assert due_now({"p": t}, 1.0, t + NS - 1) == {}
    assert due_now({"p": t}, 1.0, t + NS) == {"p": t}


async def test_repack_of_thousands_of_small_blobs_keeps_every_used_one(tmp_path: Path) -> None:
    """Thousands of blobs, so that ids of every byte pattern (a 16th byte of 0x00 among them) are repacked."""
    src = tmp_path / "src"
    src.mkdir()
    tenant = {"pack_size": "64KiB", "chunker": {"min_size": 64, "avg_size": 256, "max_size": 1024}}
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, ["a"]), tenant=tenant, source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        write_files(src, [f"f{i:03}" for i in range(800)], seed=5, size=3000)  # a pack holds ~20 files
        await app.snapshot("docs")
        for i in range(0, 800, 2):  # every pack is left half used
            (src / f"f{i:03}").unlink()
        o = await app.snapshot("docs")
        await app.forget("docs")
        r = await prune_tenant(app, "fin", grace=0, repack_waste=0.05)
        assert r.repack_blobs > 2000 and r.deleted
        await assert_clean(app, ["a"])
        res = await app.restore("docs", tmp_path / "r", None)
        assert res.snapshot.id == o.result.record.id and tree_state(tmp_path / "r") == tree_state(src)
    finally:
        await app.close()
