"""Scrub of the change logs: segments of log sources and WAL objects of postgres sources are verified and
repaired at every site; one intact nowhere names what it breaks; what retention deleted is not spread."""

from __future__ import annotations

import random
from pathlib import Path

from conftest import WeedServer
from helpers import PASSPHRASE, init_app, local_sites, make_config
from test_log_source import log_config, ship, streamer
from test_scrub import flip, names, read, write
from test_sites import s3_site

from drsvc.app import App
from drsvc.cli.main import EXIT_INTEGRITY, EXIT_OK
from drsvc.cli.scrub_cmd import exit_code
from drsvc.core import pgwal
from drsvc.core.config import parse_config
from drsvc.core.errors import TransientStoreError
from drsvc.core.layout import Handle, Kind
from drsvc.core.segments import SegmentName
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.core.walobject import WalSealer
from drsvc.scrub import FindingKind, ScrubProgress, scrub_tenant
from drsvc.scrub.changelog import iso, segment_breaks, wal_breaks
from restore.logplan import list_lines
from snapshot.logtail import SpooledSegment

MISSING, CORRUPT, SIZE = FindingKind.MISSING, FindingKind.CORRUPT, FindingKind.SIZE
EXTRA, STRAY = FindingKind.EXTRA, FindingKind.STRAY
SEG = 1 << 20


def label(key: str) -> str:
    """A store key as the report names a per-source object: logs/<tag>/<name>, wal/<tag>/<name>."""
    return key.split("/", 1)[1]


async def write_log(app: App, logs: Path, cuts: int) -> list[SpooledSegment]:
    s = await streamer(app)
    out: list[SpooledSegment] = []
    try:
        for i in range(cuts):
            with open(logs / "journal", "ab") as f:
                f.write(f"entry {i}\n".encode() * (50 * (i + 1)))
            out += await s.cut_once()
    finally:
        s.close()
    await ship(app)
    return out


# -- segments at three SeaweedFS sites ------------------------------------------------------------------


async def test_damaged_segments_are_repaired_and_one_lost_everywhere_names_the_gap(
    tmp_path: Path, seaweed: WeedServer
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    buckets = [seaweed.make_bucket() for _ in range(3)]
    app = await init_app(
        log_config(tmp_path, logs, {f"s{i}": s3_site(seaweed, b) for i, b in enumerate(buckets)})
    )
    c = seaweed.client()
    try:
        segs = await write_log(app, logs, 5)
        assert [x.seq for x in segs] == [0, 1, 2, 3, 4]
        keys = [x.key for x in segs]
        assert all(names(c, b, "fin/logs/") == sorted(keys) for b in buckets)

        c.remove_object(buckets[1], keys[1])
        flip(c, buckets[2], keys[3])
        damage = {("s1", MISSING, label(keys[1])), ("s2", CORRUPT, label(keys[3]))}
        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind, f.object) for f in report.findings} == damage
        assert all(f.repaired for f in report.findings) and not report.unrecoverable
        assert exit_code(report) == EXIT_OK
        assert read(c, buckets[1], keys[1]) == read(c, buckets[0], keys[1])
        assert read(c, buckets[2], keys[3]) == read(c, buckets[0], keys[3])
        again = await scrub_tenant(app, "fin", 1.0)
        assert again.findings == [] and again.clean
        assert again.copies == 3 * again.objects == again.copies_read

        # the same segment damaged at every site: intact nowhere, and the report says what it breaks
        for b in buckets:
            flip(c, b, keys[2])
        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            (f"s{i}", CORRUPT, label(keys[2])) for i in range(3)
        }
        (lost,) = report.unrecoverable
        assert lost.object == label(keys[2]) and lost.sites == ["s0", "s1", "s2"]
        assert f"restores of docs after {iso(segs[2].first_ns)} stop at this gap" in lost.detail
        assert f"segment 2 of stream {segs[2].stream}" in lost.detail
        assert f"to before {iso(segs[3].first_ns)}" in lost.detail
        assert exit_code(report) == EXIT_INTEGRITY and report.repairs == 0

        # a later run reads it again whatever its share: the alert stays while the damage does
        report = await scrub_tenant(app, "fin", 0.01)
        assert [u.object for u in report.unrecoverable] == [label(keys[2])]
    finally:
        await app.close()
        for b in buckets:
            seaweed.remove_bucket(b)


# -- WAL objects of a postgres source at two SeaweedFS sites ------------------------------------------


def wal_name(n: int) -> str:
    return pgwal.segment_name(1, n, SEG)


async def archive(app: App, wal: dict[str, bytes], source: str = "docs") -> list[str]:
    """Seal WAL files as the ingest does and put them at every site of the source: their keys."""
    repo = await app.open_repo("fin")
    sealer = WalSealer(repo.keys, 3)
    tag = repo.keys.source_tag("docs")
    keys = []
    for name, data in wal.items():
        key = repo.layout.key(Handle(Kind.WAL, name, tag))
        sysid = 0 if "." in name else 7  # history files carry none
        sealed = sealer.seal(source, name, data, 1_700_000_000_000_000_000, sysid)
        for site in app.config.source("docs").sites:
            await app.store(site).put(key, sealed)
        keys.append(key)
    return keys


async def test_damaged_wal_objects_are_repaired_and_one_lost_everywhere_names_recovery(
    tmp_path: Path, seaweed: WeedServer
) -> None:
    buckets = [seaweed.make_bucket() for _ in range(2)]
    sites = {f"s{i}": s3_site(seaweed, b) for i, b in enumerate(buckets)}
    (tmp_path / "pgdata").mkdir()
    app = await init_app(make_config(tmp_path, tmp_path / "pgdata", sites, source={"type": "postgres"}))
    c = seaweed.client()
    try:
        rng = random.Random(3)
        wal = {wal_name(n): rng.randbytes(50_000) + bytes(SEG - 50_000) for n in range(1, 5)}
        wal["00000002.history"] = b"1\t0/3000000\tno recovery target specified\n"
        keys = await archive(app, wal)
        assert names(c, buckets[0], "fin/wal/") == names(c, buckets[1], "fin/wal/") == sorted(keys)

        c.remove_object(buckets[0], keys[0])
        flip(c, buckets[1], keys[2])
        write(c, buckets[1], keys[4], read(c, buckets[1], keys[4])[:-3])  # the history file, truncated
        damage = {
            ("s0", MISSING, label(keys[0])),
            ("s1", CORRUPT, label(keys[2])),
            ("s1", SIZE, label(keys[4])),
        }
        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind, f.object) for f in report.findings} == damage
        assert all(f.repaired for f in report.findings) and not report.unrecoverable
        for k in (keys[0], keys[2], keys[4]):
            assert read(c, buckets[0], k) == read(c, buckets[1], k)
        assert (await scrub_tenant(app, "fin", 1.0)).findings == []

        # lost everywhere: a WAL segment, and one that is intact but another source's (the source is checked)
        for b in buckets:
            flip(c, b, keys[1])
        (other,) = await archive(app, {wal_name(9): wal[wal_name(1)]}, source="other")
        report = await scrub_tenant(app, "fin", 1.0)
        lost = {u.object: u.detail for u in report.unrecoverable}
        assert set(lost) == {label(keys[1]), label(other)}
        assert f"point-in-time recovery of docs cannot pass {wal_name(2)}" in lost[label(keys[1])]
        assert {f.detail for f in report.findings if f.object == label(other)} == {
            f"WAL object holds {wal_name(9)!r} of source 'other', not {wal_name(9)!r} of 'docs'"
        }
        assert exit_code(report) == EXIT_INTEGRITY
    finally:
        await app.close()
        for b in buckets:
            seaweed.remove_bucket(b)


# -- retention, rotation, removed sources, strays (local sites: the logic, not the store) -----------------


async def test_segments_retention_deleted_are_not_copied_back(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_bytes(b"start\n")
    app = await init_app(
        log_config(tmp_path, logs, local_sites(tmp_path, ["a", "b"]), retention={"keep_last": 2})
    )
    try:
        s = await streamer(app, checkpoint_stores=[app.store("a"), app.store("b")], cache_dir=app.cache_dir)
        streams: list[list[SpooledSegment]] = []
        for round_ in range(4):  # four checkpoints, each followed by its stream's segments
            await s.checkpoint()
            streams.append([])
            for i in range(3):
                with open(logs / "app.log", "ab") as f:
                    f.write(f"round {round_} line {i}\n".encode())
                streams[-1] += await s.cut_once()
        s.close()
        await ship(app)

        # forget deletes the first two streams' segments, but one deletion at b fails
        victim = streams[1][-1]
        down = TransientStoreError("disk error", site="b")
        app._stores["b"] = FaultyStore(app.store("b"), [Fault("delete", victim.name, error=down)])
        o = await app.forget("docs")
        assert "b" in o.unreachable
        app._stores["b"] = app._stores["b"].inner  # type: ignore[attr-defined]
        root = {site: tmp_path / "sites" / site for site in ("a", "b")}
        gone = streams[0] + streams[1]
        left = [x for x in gone if (root["b"] / x.key).exists()]
        assert victim in left and not [x for x in gone if (root["a"] / x.key).exists()]

        kept = streams[3][1]  # and a segment retention keeps is lost at a
        (root["a"] / kept.key).unlink()
        report = await scrub_tenant(app, "fin", 1.0)
        tag = (await app.open_repo("fin")).keys.source_tag("docs")
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            ("a", MISSING, label(kept.key)),
            ("b", EXTRA, f"logs/{tag}/"),
        }
        (extra,) = [f for f in report.findings if f.kind is EXTRA]
        assert extra.detail.startswith(f"{len(left)} change-log segments of docs that retention has deleted")
        assert report.repairs == 1 and (root["a"] / kept.key).exists()
        assert not [x for x in gone if (root["a"] / x.key).exists()]  # nothing retention deleted came back
        again = await scrub_tenant(app, "fin", 1.0)
        assert [(f.site, f.kind) for f in again.findings] == [("b", EXTRA)] and again.clean
    finally:
        await app.close()


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a file (local sites on one file system may share an inode: never write in place)."""
    tmp = path.with_name(".rewrite")
    tmp.write_bytes(data)
    tmp.replace(path)


async def test_segments_rotate_through_the_read_share_and_damage_is_always_read(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a", "b"])))
    try:
        segs = await write_log(app, logs, 8)
        runs: list[set[str]] = []
        for _ in range(2):
            seen: list[ScrubProgress] = []
            assert (await scrub_tenant(app, "fin", 0.5, progress=seen.append)).clean
            runs.append({p.object for p in seen if p.phase == "changelogs" and p.read})
        assert not runs[0] & runs[1] and runs[0] | runs[1] == {label(x.key) for x in segs}

        # a copy that is missing, or whose size is wrong, is read whatever the share
        lost, short = (tmp_path / "sites" / "b" / x.key for x in segs[:2])
        lost.unlink()
        _rewrite(short, short.read_bytes()[:-1])
        report = await scrub_tenant(app, "fin", 0.01)
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            ("b", MISSING, label(segs[0].key)),
            ("b", SIZE, label(segs[1].key)),
        }
        assert report.repairs == 2 and lost.exists()
        assert (await scrub_tenant(app, "fin", 1.0)).findings == []
    finally:
        await app.close()


async def test_segments_of_a_removed_source_stay_where_they_are_and_strays_are_named(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    sites = local_sites(tmp_path, ["a", "b"])
    app = await init_app(log_config(tmp_path, logs, sites))
    try:
        segs = await write_log(app, logs, 3)
        tag = (await app.open_repo("fin")).keys.source_tag("docs")
    finally:
        await app.close()
    (tmp_path / "sites" / "b" / segs[0].key).unlink()
    stray = tmp_path / "sites" / "a" / "fin" / "logs" / tag / ("ab" * 10)
    stray.write_bytes(b"not a segment")

    # the source is gone from the config: its segments are extra where they are, never spread
    (tmp_path / "other").mkdir()
    config = parse_config(
        {
            "state": {"dir": str(tmp_path / "state")},
            "tenants": {"fin": {"key": {"passphrase": {"value": PASSPHRASE}}}},
            "sites": sites,
            "sources": {
                "other": {
                    "tenant": "fin",
                    "type": "tree",
                    "path": str(tmp_path / "other"),
                    "sites": ["a", "b"],
                }
            },
        }
    )
    app = App(config, workers=2)
    try:
        report = await scrub_tenant(app, "fin", 1.0)
        found = {(f.site, f.kind, f.object) for f in report.findings}
        assert found == {
            ("a", EXTRA, f"logs/{tag}/"),
            ("b", EXTRA, f"logs/{tag}/"),
            ("a", STRAY, f"fin/logs/{tag}/{'ab' * 10}"),
        }
        assert report.clean and report.repairs == 0 and exit_code(report) == EXIT_OK
        assert not (tmp_path / "sites" / "b" / segs[0].key).exists() and stray.exists()
        assert [f.detail.split(" ")[0] for f in report.findings if f.kind is EXTRA] == ["3", "2"]
    finally:
        await app.close()


def test_what_a_lost_segment_or_wal_file_breaks() -> None:
    s = 10**9
    old, new = "1" * 16, "2" * 16

    def name(t: int, stream: str, seq: int, nonce: str) -> SegmentName:
        return SegmentName(t * s, stream, seq, nonce * 16)

    a0, a1, a1b, a2 = (
        name(10, old, 0, "a"),
        name(20, old, 1, "b"),
        name(21, old, 1, "c"),
        name(30, old, 2, "d"),
    )
    b0 = name(25, new, 0, "e")  # a newer stream (no checkpoint: it starts at its first segment)
    lines = list_lines([a0, a1, a1b, a2, b0], [])
    text = segment_breaks("docs", a0, lines)
    assert text == (
        f"restores of docs after {iso(10 * s)} stop at this gap (from {iso(25 * s)} on, a newer stream "
        f"serves them) (segment 0 of stream {old}, its events from {iso(10 * s)} to before {iso(20 * s)})"
    )
    assert "another segment has its seq" in segment_breaks("docs", a1, lines)
    assert segment_breaks("docs", a2, lines).startswith("no restore of docs reads it: a newer stream starts")
    text = segment_breaks("docs", b0, lines)
    assert (
        text.startswith(f"restores of docs after {iso(25 * s)} stop") and "to the end of its stream" in text
    )
    assert wal_breaks("pg", wal_name(3)) == f"point-in-time recovery of pg cannot pass {wal_name(3)}"
    assert "cannot follow timeline 2" in wal_breaks("pg", "00000002.history")
    assert "only its first WAL segment is checked" in wal_breaks("pg", f"{wal_name(3)}.00000028.backup")
