"""Scrub: damage at one of three SeaweedFS sites is found and repaired; damage at all three is named."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedServer
from helpers import init_app, local_sites, make_config, tree_state
from minio import Minio
from test_sites import s3_site

import replicator
from drsvc.app import App
from drsvc.check import check_site
from drsvc.cli.main import EXIT_FAILURE, EXIT_INTEGRITY, EXIT_OK, EXIT_TEMPFAIL, main
from drsvc.cli.scrub_cmd import exit_code
from drsvc.core.config import load_config
from drsvc.core.errors import TransientStoreError
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.metrics import Metrics
from drsvc.prune import prune_tenant
from drsvc.scrub import FindingKind, ScrubProgress, load_state, scrub_tenant

MISSING, CORRUPT, SIZE = FindingKind.MISSING, FindingKind.CORRUPT, FindingKind.SIZE
EXTRA, STRAY, UNREACHABLE = FindingKind.EXTRA, FindingKind.STRAY, FindingKind.UNREACHABLE
SMALL_PACKS = {"pack_size": "256KiB"}


def corpus(src: Path, seed: int = 5) -> None:
    rng = random.Random(seed)
    (src / "d").mkdir(parents=True)
    for i in range(20):
        (src / "d" / f"{i}.txt").write_bytes(f"line {i}\n".encode() * rng.randint(1, 3000))
    (src / "blob.bin").write_bytes(rng.randbytes(900_000))


# -- objects at a site, through the S3 API (not drsvc) -------------------------------------------------


def names(c: Minio, bucket: str, prefix: str) -> list[str]:
    return sorted(str(o.object_name) for o in c.list_objects(bucket, prefix=prefix, recursive=True))


def read(c: Minio, bucket: str, key: str) -> bytes:
    resp = c.get_object(bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def write(c: Minio, bucket: str, key: str, data: bytes) -> None:
    c.put_object(bucket, key, io.BytesIO(data), len(data))


def flip(c: Minio, bucket: str, key: str) -> None:
    data = bytearray(read(c, bucket, key))
    data[len(data) // 2] ^= 0x5A
    write(c, bucket, key, bytes(data))


def label(key: str) -> str:
    """A store key as the report names it: data/<id>, index/<id>, snapshots/<tag>/<id>, keys/<id>."""
    parts = key.split("/")
    return f"data/{parts[-1]}" if parts[1] == "data" else "/".join(parts[1:])


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


# -- damage at one site ------------------------------------------------------------------------------


async def test_damage_at_one_site_is_found_repaired_and_the_next_scrub_is_clean(
    tmp_path: Path, seaweed: WeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    buckets = [seaweed.make_bucket() for _ in range(3)]
    sites = {f"s{i}": s3_site(seaweed, b) for i, b in enumerate(buckets)}
    src = tmp_path / "src"
    corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=3, tenant=SMALL_PACKS))
    c = seaweed.client()
    try:
        await app.snapshot("docs")
        (src / "d" / "new.txt").write_text("a later file\n" * 5000)
        await app.snapshot("docs")

        s1, s2 = buckets[1], buckets[2]
        packs = names(c, s1, "fin/data/")
        indexes = names(c, s1, "fin/index/")
        records = names(c, s1, "fin/snapshots/")
        slots = names(c, s2, "fin/keys/")
        assert len(packs) >= 3 and len(indexes) >= 2 and len(records) == 2
        flip(c, s1, packs[0])
        write(c, s1, packs[1], read(c, s1, packs[1])[:-100])  # truncated
        c.remove_object(s1, packs[2])
        c.remove_object(s1, indexes[0])
        c.remove_object(s1, records[0])
        flip(c, s2, indexes[1])
        config = json.loads(read(c, s2, "fin/config"))
        config["pack_size"] += 1  # same length, and the MAC no longer matches
        write(c, s2, "fin/config", json.dumps(config, indent=1, sort_keys=True).encode())
        c.remove_object(s2, slots[0])
        damage = {
            ("s1", CORRUPT, label(packs[0])),
            ("s1", SIZE, label(packs[1])),
            ("s1", MISSING, label(packs[2])),
            ("s1", MISSING, label(indexes[0])),
            ("s1", MISSING, label(records[0])),
            ("s2", CORRUPT, label(indexes[1])),
            ("s2", CORRUPT, "config"),
            ("s2", MISSING, label(slots[0])),
        }

        # report only: found, nothing written
        dry = await scrub_tenant(app, "fin", 1.0, repair=False)
        assert {(f.site, f.kind, f.object) for f in dry.findings} == damage
        assert dry.repairs == 0 and not dry.unrecoverable and exit_code(dry) == EXIT_INTEGRITY
        assert packs[2] not in names(c, s1, "fin/data/")

        metrics = Metrics()
        caplog.set_level(logging.INFO, logger="drsvc.scrub")
        report = await scrub_tenant(app, "fin", 1.0, metrics=metrics)
        assert {(f.site, f.kind, f.object) for f in report.findings} == damage
        assert all(f.repaired for f in report.findings), report.findings
        assert not report.unrecoverable and exit_code(report) == EXIT_OK
        repaired = [r for r in caplog.records if r.getMessage() == "scrub repaired"]
        assert {(r.__dict__["site"], r.__dict__["object"]) for r in repaired} == {
            (s, o) for s, _, o in damage
        }

        # metrics of the run
        assert sample(metrics, "drsvc_scrub_findings_total", tenant="fin", site="s1", kind="missing") == 3
        assert sample(metrics, "drsvc_scrub_findings_total", tenant="fin", site="s1", kind="size") == 1
        assert sample(metrics, "drsvc_scrub_findings_total", tenant="fin", site="s2", kind="corrupt") == 2
        assert sample(metrics, "drsvc_scrub_repairs_total", tenant="fin", site="s1") == 5
        assert sample(metrics, "drsvc_scrub_repairs_total", tenant="fin", site="s2") == 3
        assert sample(metrics, "drsvc_scrub_unrecoverable_objects", tenant="fin") == 0
        assert sample(metrics, "drsvc_scrub_last_run_timestamp_seconds", tenant="fin") == report.finished
        verified = sample(metrics, "drsvc_scrub_bytes_verified_total", tenant="fin")
        assert verified == report.bytes_verified and verified > 2 * 900_000

        again = await scrub_tenant(app, "fin", 1.0)
        assert again.findings == [] and again.clean and exit_code(again) == EXIT_OK
        assert again.copies == 3 * again.objects == again.copies_read  # read_share 1: every copy
        repo = await app.open_repo("fin")
        for name in sites:
            checked = await check_site(repo, app.store(name), read_data=True)
            assert checked.ok, checked.problems
    finally:
        await app.close()

    # the damaged site alone serves a restore
    only = App(make_config(tmp_path, src, {"s1": sites["s1"]}))
    try:
        result = await only.restore("docs", tmp_path / "out", None)
        assert not result.fallbacks
    finally:
        await only.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


# -- damage everywhere ----------------------------------------------------------------------------


def _toml(tmp: Path, server: WeedServer, buckets: list[str], src: Path) -> Path:
    text = f'[state]\ndir = "{tmp}/state"\n[tenants.fin]\npack_size = "256KiB"\n'
    text += '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
    for i, b in enumerate(buckets):
        text += (
            f'[sites.s{i}]\ntype = "s3"\nendpoint = "{server.endpoint}"\nbucket = "{b}"\nsecure = false\n'
            f'timeout = 5\naccess_key = {{ value = "{server.access_key}" }}\n'
            f'secret_key = {{ value = "{server.secret_key}" }}\n'
        )
    sites = json.dumps([f"s{i}" for i in range(len(buckets))])
    text += f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = {sites}\n'
    cfg = tmp / "drsvc.toml"
    cfg.write_text(text)
    return cfg


def test_a_pack_damaged_at_every_site_names_the_snapshots_it_breaks(
    tmp_path: Path, seaweed: WeedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    buckets = [seaweed.make_bucket() for _ in range(3)]
    src = tmp_path / "src"
    corpus(src)
    cfg = _toml(tmp_path, seaweed, buckets, src)
    c = seaweed.client()

    async def two_snapshots() -> tuple[Any, Any, list[str]]:
        app = await init_app(load_config(cfg))
        try:
            first = await app.snapshot("docs")
            before = set(names(c, buckets[0], "fin/data/"))
            (src / "fresh.bin").write_bytes(random.Random(9).randbytes(200_000))
            second = await app.snapshot("docs")
            return (
                first.result.record,
                second.result.record,
                sorted(set(names(c, buckets[0], "fin/data/")) - before),
            )
        finally:
            await app.close()

    first, second, new_packs = asyncio.run(two_snapshots())
    # the biggest pack the second snapshot wrote holds data of fresh.bin only: it breaks the second snapshot
    victim = max(new_packs, key=lambda k: len(read(c, buckets[0], k)))
    for b in buckets:
        flip(c, b, victim)

    capsys.readouterr()
    assert main(["-c", str(cfg), "scrub", "--read-share", "1", "--json"]) == EXIT_INTEGRITY
    (report,) = json.loads(capsys.readouterr().out)
    assert {(f["site"], f["kind"], f["object"]) for f in report["findings"]} == {
        (f"s{i}", "corrupt", label(victim)) for i in range(3)
    }
    (lost,) = report["unrecoverable"]
    assert lost["object"] == label(victim) and lost["sites"] == ["s0", "s1", "s2"]
    assert "1 of its" in lost["detail"]  # one blob is intact nowhere; the others still restore
    assert lost["breaks"] == [{"id": second.id, "source": "docs", "time_ns": second.time_ns}]
    assert first.id not in json.dumps(report["unrecoverable"])

    # a later run reads the pack again whatever its share: the alert stays while the damage does
    assert main(["-c", str(cfg), "scrub", "--read-share=0.01"]) == EXIT_INTEGRITY
    text = capsys.readouterr().out
    assert f"UNRECOVERABLE {label(victim)}" in text and f"breaks snapshot {second.id[:16]} of docs" in text

    assert main(["-c", str(cfg), "status", "--json"]) == EXIT_FAILURE
    (scrub,) = json.loads(capsys.readouterr().out)["scrub"]
    assert scrub["unrecoverable"] == 1 and scrub["findings"] == 3 and scrub["repaired"] == 0
    assert scrub["lost"][0]["breaks"][0]["id"] == second.id
    assert main(["-c", str(cfg), "status"]) == EXIT_FAILURE
    assert f"intact at no site: {label(victim)}; breaks docs" in capsys.readouterr().out


# -- read share, extras, in-flight objects, unreachable sites (local sites: the logic, not the store) ----


async def _local_app(tmp: Path, names_: list[str], **kw: Any) -> tuple[App, Path]:
    src = tmp / "src"
    corpus(src)
    app = await init_app(make_config(tmp, src, local_sites(tmp, names_), tenant=SMALL_PACKS, **kw))
    return app, src


def _pack_files(tmp: Path, site: str) -> list[Path]:
    return sorted((tmp / "sites" / site / "fin" / "data").glob("*/*"))


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a file (local sites on one file system may share a pack's inode: never write in place)."""
    tmp = path.with_name(".rewrite")
    tmp.write_bytes(data)
    tmp.replace(path)


async def test_read_share_rotation_covers_every_pack_and_damage_is_always_read(tmp_path: Path) -> None:
    app, _ = await _local_app(tmp_path, ["a", "b"])
    try:
        await app.snapshot("docs")
        every = {f"data/{p.name}" for p in _pack_files(tmp_path, "a")}
        runs: list[set[str]] = []
        for _ in range(2):
            seen: list[ScrubProgress] = []
            report = await scrub_tenant(app, "fin", 0.5, progress=seen.append)
            assert report.clean
            runs.append({p.object for p in seen if p.phase == "packs" and p.read})
        assert not runs[0] & runs[1] and runs[0] | runs[1] == every
        assert load_state(app.config.state.dir, "fin").cursor == 0.0  # two halves: back at the start

        # a copy that is missing, or whose size is wrong, is read whatever the share
        lost, short = _pack_files(tmp_path, "b")[:2]
        lost.unlink()
        _rewrite(short, short.read_bytes()[:-1])
        report = await scrub_tenant(app, "fin", 0.01)
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            ("b", MISSING, f"data/{lost.name}"),
            ("b", SIZE, f"data/{short.name}"),
        }
        assert report.repairs == 2 and lost.exists()
        assert (await scrub_tenant(app, "fin", 1.0)).findings == []
    finally:
        await app.close()


async def test_extra_and_stray_objects_are_reported_and_left_alone(tmp_path: Path) -> None:
    app, _ = await _local_app(tmp_path, ["a", "b"])
    try:
        await app.snapshot("docs")
        pack = _pack_files(tmp_path, "a")[0]
        extra_id = "e" * 48
        extra = tmp_path / "sites" / "a" / "fin" / "data" / "ee" / extra_id
        extra.parent.mkdir(exist_ok=True)
        shutil.copy(pack, extra)  # a pack no index names: in flight, or garbage for prune
        stray = tmp_path / "sites" / "b" / "fin" / "index" / "README"
        stray.write_text("not ours")
        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            ("a", EXTRA, f"data/{extra_id}"),
            ("b", STRAY, "fin/index/README"),
        }
        assert report.clean and report.repairs == 0 and exit_code(report) == EXIT_OK
        assert extra.exists() and stray.exists()
    finally:
        await app.close()


async def test_objects_still_in_the_outbox_are_in_flight_not_missing(tmp_path: Path) -> None:
    app, _ = await _local_app(tmp_path, ["a", "b"])
    try:
        await app.snapshot_to_spool("docs")
        await replicator.replicate(app.spool, [app.store("a")])  # b has not had its copies yet
        report = await scrub_tenant(app, "fin", 1.0, repair=False)
        assert report.findings == [] and report.in_flight > 0
    finally:
        await app.close()


async def test_an_unreachable_site_is_named_and_the_others_are_scrubbed(tmp_path: Path) -> None:
    app, _ = await _local_app(tmp_path, ["a", "b", "c"])
    try:
        await app.snapshot("docs")
        _pack_files(tmp_path, "a")[0].unlink()
        down = TransientStoreError("connection refused", site="c")
        app._stores["c"] = FaultyStore(app.store("c"), [Fault("list", error=down)])
        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind) for f in report.findings} == {("a", MISSING), ("c", UNREACHABLE)}
        assert report.repairs == 1 and exit_code(report) == EXIT_TEMPFAIL
        assert "connection refused" in report.unreachable["c"]

        # an NFS site that is not mounted (an empty directory) is not filled with a repository
        app._stores["c"] = app._stores["c"].inner  # type: ignore[attr-defined]
        shutil.rmtree(tmp_path / "sites" / "c")
        (tmp_path / "sites" / "c").mkdir()
        report = await scrub_tenant(app, "fin", 1.0)
        assert [(f.site, f.kind) for f in report.findings] == [("c", UNREACHABLE)]
        assert "is it mounted" in report.unreachable["c"] and not any((tmp_path / "sites" / "c").iterdir())
    finally:
        await app.close()


async def test_scrub_neither_resurrects_nor_reports_what_a_prune_deletes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    corpus(src)
    cfg = make_config(
        tmp_path,
        src,
        local_sites(tmp_path, ["a", "b"]),
        tenant=SMALL_PACKS,
        source={"retention": {"keep_last": 1}},
    )
    app = await init_app(cfg)
    try:
        await app.snapshot("docs")
        (src / "blob.bin").unlink()  # its packs become unused once the first snapshot is forgotten
        await app.snapshot("docs")
        await app.forget("docs")
        first = await prune_tenant(app, "fin", grace=3600, repack_waste=0.1)
        assert first.condemned
        # the sweep of a later prune has begun: one condemned pack is gone from site a already
        victim = sorted(first.condemned)[0]
        (tmp_path / "sites" / "a" / "fin" / "data" / victim[:2] / victim).unlink()
        report = await scrub_tenant(app, "fin", 1.0)
        assert report.findings == [] and report.repairs == 0
        assert not (tmp_path / "sites" / "a" / "fin" / "data" / victim[:2] / victim).exists()

        swept = await prune_tenant(app, "fin", grace=0, repack_waste=0.1)
        assert swept.deleted and swept.indexes_rewritten
        # the records still list the indexes the prune replaced: that is no finding
        report = await scrub_tenant(app, "fin", 1.0)
        assert report.findings == [] and report.clean
    finally:
        await app.close()


async def test_an_index_and_a_record_intact_at_no_site_are_named(tmp_path: Path) -> None:
    app, _ = await _local_app(tmp_path, ["a", "b"])
    try:
        o = await app.snapshot("docs")
        rec = o.result.record
        tag = (await app.open_repo("fin")).keys.source_tag("docs")
        for site in ("a", "b"):
            root = tmp_path / "sites" / site / "fin"
            for path in (root / "index" / rec.index[0], root / "snapshots" / tag / rec.id):
                data = bytearray(path.read_bytes())
                data[-1] ^= 1
                _rewrite(path, bytes(data))
        report = await scrub_tenant(app, "fin", 1.0)
        lost = {u.object: u for u in report.unrecoverable}
        assert set(lost) == {f"index/{rec.index[0]}", f"snapshots/{tag}/{rec.id}"}
        assert [b.id for b in lost[f"snapshots/{tag}/{rec.id}"].breaks] == [rec.id]
        assert lost[f"index/{rec.index[0]}"].sites == ["a", "b"]
        assert exit_code(report) == EXIT_INTEGRITY and report.repairs == 0
    finally:
        await app.close()
