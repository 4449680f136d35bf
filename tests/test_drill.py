"""DR drills (drsvc/drill): plans, the runner against three SeaweedFS sites, `drsvc drill` and its exit code,
fallbacks shown in the report, and verification against the live tree, log and PostgreSQL sources."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedFactory, WeedServer, _weed_starts, free_ports
from helpers import FAST_SCRYPT, PASSPHRASE, init_app, local_sites, make_config
from test_log_source import log_config, ship, streamer
from test_postgres import Cluster, drsvc_for_postgres, pg_bindir, write_config
from test_postgres import pg_home as pg_home  # a fixture, used by name
from test_sites import _flip_byte_in_every_pack, s3_site

from drsvc import wal
from drsvc.app import App
from drsvc.cli.main import EXIT_DRILL_FAILED
from drsvc.core.config import load_config
from drsvc.core.errors import ConfigError
from drsvc.drill import load_plan, parse_plan, run_drill
from replicator import replicate

DRSVC = str(Path(sys.executable).with_name("drsvc"))
SCENARIO_KEYS = {
    "source", "tenant", "kind", "site", "point", "requested", "restored_point", "rpo_s", "rto_s",
    "rpo_target_s", "rto_target_s", "verdict", "failures", "fallbacks", "bytes", "files", "verified",
}  # fmt: skip


@pytest.fixture(scope="module")
def weeds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WeedServer]]:
    """Three SeaweedFS servers for this module's drills (each test takes fresh buckets on them)."""
    factory = WeedFactory(lambda: tmp_path_factory.mktemp("weed-drill"), _weed_starts(request.config))
    try:
        yield factory.many(3)
    finally:
        factory.close()


def toml_text(values: dict[str, Any], table: str = "") -> str:
    """Enough TOML for configs and plans: scalars and lists as JSON, tables nested, arrays of tables."""
    lines = [f"[{table}]"] if table else []
    nested = ""
    for k, v in values.items():
        if isinstance(v, dict):
            nested += toml_text(v, f"{table}.{k}" if table else k)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                nested += f"[[{k}]]\n" + toml_text(item).lstrip()
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n" + nested


class ThreeSites:
    """A tree source on three SeaweedFS sites (a fresh bucket on each server) with two snapshots."""

    def __init__(self, tmp: Path, weeds: list[WeedServer]) -> None:
        self.tmp, self.weeds = tmp, weeds
        self.buckets = [w.make_bucket() for w in weeds]
        self.sites = {
            f"s{i}": s3_site(w, b) for i, (w, b) in enumerate(zip(weeds, self.buckets, strict=True))
        }
        self.src = tmp / "src"
        self.config = tmp / "drsvc.toml"
        self.config.write_text(
            toml_text(
                {
                    "state": {"dir": str(tmp / "state")},
                    "tenants": {"fin": {"key": {"passphrase": {"value": PASSPHRASE}}}},
                    "sites": self.sites,
                    "sources": {
                        "docs": {
                            "tenant": "fin",
                            "type": "tree",
                            "path": str(self.src),
                            "sites": list(self.sites),
                            "min_copies": 3,
                            "rpo_target": "1h",
                            "rto_target": "10m",
                        }
                    },
                }
            )
        )

    async def __aenter__(self) -> App:
        (self.src / "d").mkdir(parents=True)
        for i in range(12):
            (self.src / "d" / f"{i}.txt").write_bytes(f"line {i}\n".encode() * (50 * (i + 1)))
        (self.src / "blob.bin").write_bytes(os.urandom(300_000))
        self.app = App(load_config(self.config), workers=2)
        await self.app.init_tenant("fin", FAST_SCRYPT)
        assert (await self.app.snapshot("docs")).protection.protected
        time.sleep(0.05)
        (self.src / "d" / "new.txt").write_bytes(b"added after the first snapshot\n")
        assert (await self.app.snapshot("docs")).protection.protected
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        await self.app.close()
        for w, b in zip(self.weeds, self.buckets, strict=True):
            w.remove_bucket(b)


def check_shape(report: dict[str, Any]) -> None:
    assert len(report["id"]) == 32 and int(report["id"], 16) >= 0
    assert {"plan", "started", "finished", "verdict", "misses", "level", "scenarios"} <= set(report)
    assert set(report["level"]) >= {"gbt20988", "name", "reason"}
    for sc in report["scenarios"]:
        assert SCENARIO_KEYS <= set(sc), SCENARIO_KEYS - set(sc)
        assert set(sc["verified"]) == {"repository", "source", "probes"}


async def test_drill_on_three_sites_passes(tmp_path: Path, weeds: list[WeedServer]) -> None:
    async with ThreeSites(tmp_path, weeds) as app:
        events: list[dict[str, Any]] = []
        plan = {"name": "weekly", "seed": 7, "sources": [{"source": "docs"}]}
        outcome = await run_drill(app, plan, events.append, report_dir=tmp_path / "reports")
    report = outcome.report
    check_shape(report)
    assert report["verdict"] == "pass" and outcome.passed and not report["misses"], report["misses"]
    scenarios = report["scenarios"]
    assert [(s["site"], s["point"]) for s in scenarios] == [
        (site, point) for site in ("s0", "s1", "s2") for point in ("latest", "earlier")
    ]
    for sc in scenarios:
        assert sc["verdict"] == "pass" and sc["isolated"] and not sc["fallbacks"]
        assert sc["verified"]["repository"] and sc["verified"]["source"]
        assert sc["verify"]["files"] == sc["files"] and sc["verify"]["mismatches"] == 0
        assert sc["rto_s"] is not None and 0 < sc["rto_s"] < 600 and sc["rto_target_s"] == 600
        assert sc["rpo_s"] is not None and sc["rpo_s"] <= 3600 and sc["rpo_target_s"] == 3600
        assert sc["files"] >= 13 and sc["bytes"] > 300_000
    latest = [s for s in scenarios if s["point"] == "latest"]
    assert all(s["rpo_s"] == 0 and s["restored_point"] == s["requested"] for s in latest)
    earlier = {s["requested"] for s in scenarios if s["point"] == "earlier"}
    assert len(earlier) == 1  # one random point per source, the same at every site
    assert all(s["source_compare"]["identical"] >= 12 for s in latest)
    assert report["level"]["gbt20988"] >= 1
    # the report on disk, the evidence at the sites, and nothing left in the scratch directory
    on_disk = json.loads(Path(outcome.files["json"]).read_text())
    assert on_disk["id"] == report["id"] and on_disk["verdict"] == "pass"
    assert "<svg" in Path(outcome.files["html"]).read_text()
    assert outcome.evidence and all(v == "ok" for v in outcome.evidence.values()), outcome.evidence
    scratch = tmp_path / "state" / "drills" / "scratch"
    assert scratch.is_dir() and not any(scratch.iterdir())
    done = [e for e in events if e["phase"] == "done"]
    assert [(e["scenario"], e["of"]) for e in done] == [(n, 6) for n in range(1, 7)]
    assert any(e["phase"] == "restore" and e.get("bytes", 0) > 0 for e in events)


async def test_impossible_rto_exits_non_zero_naming_the_missed_target(
    tmp_path: Path, weeds: list[WeedServer]
) -> None:
    async with ThreeSites(tmp_path, weeds):  # two snapshots at three sites; the drills run as `drsvc drill`
        await drill_cli_fails_naming_the_rto(tmp_path)


async def drill_cli_fails_naming_the_rto(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(toml_text({"name": "rto", "sources": [{"source": "docs", "rto_target": "1ms"}]}))
    r = await asyncio.to_thread(
        subprocess.run,
        [DRSVC, "-c", str(tmp_path / "drsvc.toml"), "drill", "--plan", str(plan), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == EXIT_DRILL_FAILED, r.stderr
    report = json.loads(r.stdout)
    check_shape(report)
    assert report["verdict"] == "fail" and len(report["misses"]) == 6
    for site in ("s0", "s1", "s2"):
        assert any(f"source docs, site {site}, latest: RTO " in m for m in report["misses"]), report["misses"]
    assert all(m.endswith("> target 0.001 s") for m in report["misses"]), report["misses"]
    for sc in report["scenarios"]:
        assert sc["verdict"] == "fail" and sc["rto_target_s"] == 0.001 and sc["rpo_target_s"] == 3600
        assert sc["verified"]["repository"] and sc["verified"]["source"] and not sc["fallbacks"]
    assert Path(report["files"]["html"]).is_file()

    # the plain output names the miss too
    r = await asyncio.to_thread(
        subprocess.run,
        [DRSVC, "-c", str(tmp_path / "drsvc.toml"), "drill", "--plan", str(plan), "--no-evidence"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == EXIT_DRILL_FAILED
    assert "FAIL" in r.stdout and "miss: source docs, site s1, earlier: RTO" in r.stderr


async def test_corrupt_site_fails_alone_and_the_report_shows_the_fallback(
    tmp_path: Path, weeds: list[WeedServer]
) -> None:
    env = ThreeSites(tmp_path, weeds)
    async with env as app:
        assert _flip_byte_in_every_pack(weeds[0], env.buckets[0])
        plan = {"name": "corrupt", "seed": 1, "sources": [{"source": "docs", "points": ["latest"]}]}
        outcome = await run_drill(app, plan, report_dir=tmp_path / "reports", store_evidence=False)
    report = outcome.report
    check_shape(report)
    assert report["verdict"] == "fail" and not outcome.evidence
    bad, *good = report["scenarios"]
    assert bad["site"] == "s0" and bad["verdict"] == "fail" and not bad["isolated"]
    assert any(f.startswith("site s0 cannot restore alone:") for f in bad["failures"]), bad["failures"]
    assert bad["fallbacks"] and {f["site"] for f in bad["fallbacks"]} == {"s0"}
    assert all("/data/" in f["key"] for f in bad["fallbacks"])
    assert bad["verified"]["repository"] and bad["verified"]["source"]  # the others supplied intact data
    assert bad["rto_s"] is None and bad["rpo_s"] is None  # s0 alone did not recover
    assert bad["fallback_rto_s"] > 0 and bad["fallback_rpo_s"] == 0
    assert [m for m in report["misses"] if "site s0" in m] == report["misses"]
    assert all(s["verdict"] == "pass" and s["isolated"] and not s["fallbacks"] for s in good)
    assert report["level"]["gbt20988"] == 0  # one site cannot recover alone
    html = Path(outcome.files["html"]).read_text()
    assert "cannot restore alone" in html


async def test_live_tree_mismatch_fails_verification(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(f"content {i}\n".encode() * 100)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=2))
    try:
        await app.snapshot("docs")
        plan = {"sources": [{"source": "docs", "points": ["latest"], "sites": ["b"]}]}
        first = await run_drill(app, plan, store_evidence=False)
        assert first.passed, first.report["misses"]
        assert first.report["scenarios"][0]["source_compare"] == counts(compared=5, identical=5)

        # a file that changed since the snapshot is not compared; one that differs with the same size and
        # mtime (the restore, or the source, is wrong) fails the drill
        (src / "f0").write_bytes(b"rewritten since")
        st = (src / "f1").stat()
        (src / "f1").write_bytes(b"X" + (src / "f1").read_bytes()[1:])
        os.utime(src / "f1", ns=(st.st_atime_ns, st.st_mtime_ns))
        second = await run_drill(app, plan, store_evidence=False)

        # every file changed since: nothing could be compared, so the source is not verified (None, not True)
        for i in range(5):
            (src / f"f{i}").write_bytes(b"all rewritten since")
        third = await run_drill(app, plan, store_evidence=False)
    finally:
        await app.close()
    sc = second.report["scenarios"][0]
    assert sc["verdict"] == "fail" and sc["verified"] == {"repository": True, "source": False, "probes": []}
    assert sc["source_compare"] == counts(compared=4, identical=3, changed_since=1)
    assert second.report["misses"] == [
        "source docs, site b, latest: f1: the restored file differs from the live source, which has the same "
        "size and mtime"
    ]
    sc = third.report["scenarios"][0]
    assert sc["verified"] == {"repository": True, "source": None, "probes": []}
    assert sc["source_compare"] == counts(changed_since=5)
    assert sc["notes"] == [
        "not verified against the live source: no restored file could be compared (5 changed since the "
        "restored point, 0 gone since)"
    ]
    assert third.passed  # not a failure: the drill proved the restore, not the comparison


def counts(**kw: int) -> dict[str, int]:
    keys = ("compared", "identical", "changed_since", "missing_from_restore", "gone_since", "new_since")
    return {k: kw.get(k, 0) for k in keys}


async def test_live_tree_files_missing_from_the_restore_fail(tmp_path: Path) -> None:
    """A file the source held, unchanged, at the snapshot's time must be in the restore. Simulated by a
    snapshot that skipped files (its exclude patterns) compared with a live source that does not skip them;
    files deleted, renamed or created since the snapshot are counted, not failed."""
    src = tmp_path / "src"
    for rel in ("a.txt", "d/b.txt", "d/lost.txt", "hidden/x.txt", "hidden/y.txt", "skip.tmp", "moved/m.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(f"{rel}\n".encode() * 10)
    (src / "gone.txt").write_bytes(b"deleted after the snapshot\n")
    time.sleep(1.1)  # older than the snapshot by more than compare.CLOCK_SLACK_NS
    sites = local_sites(tmp_path, ["a", "b"])
    snapped = make_config(tmp_path, src, sites, source={"exclude": ["*.tmp", "lost.txt", "hidden"]})
    plan = {"sources": [{"source": "docs", "points": ["latest"], "sites": ["b"]}]}
    app = await init_app(snapped)
    try:
        assert (await app.snapshot("docs")).protection.protected
        (src / "gone.txt").unlink()
        (src / "moved").rename(src / "moved2")  # its files keep their ctime; the directory's is new
        (src / "new.txt").write_bytes(b"created after the snapshot\n")
        same_rules = await run_drill(app, plan, store_evidence=False)
    finally:
        await app.close()
    sc = same_rules.report["scenarios"][0]
    assert same_rules.passed, same_rules.report["misses"]
    assert sc["verified"]["source"] is True
    assert sc["source_compare"] == counts(compared=2, identical=2, gone_since=2, new_since=2)

    app = App(make_config(tmp_path, src, sites, source={"exclude": ["*.tmp"]}), workers=2)
    try:
        other_rules = await run_drill(app, plan, store_evidence=False)
    finally:
        await app.close()
    sc = other_rules.report["scenarios"][0]
    assert sc["verdict"] == "fail" and sc["verified"]["source"] is False
    assert sc["source_compare"] == counts(
        compared=2, identical=2, missing_from_restore=3, gone_since=2, new_since=2
    )
    lacks = "the live file has not changed since the restored point, but the restore lacks it"
    assert sc["failures"] == [f"{rel}: {lacks}" for rel in ("d/lost.txt", "hidden/x.txt", "hidden/y.txt")]


async def test_log_source_drill_verifies_prefixes_of_the_live_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a", "b"])))
    try:
        s = await streamer(app)
        (logs / "other").write_bytes(b"another log\n")
        for i in range(4):
            with open(logs / "journal", "ab") as f:
                f.write(f"entry {i}\n".encode() * 20)
            await s.cut_once()
            time.sleep(0.02)
        s.close()
        await ship(app)
        with open(logs / "journal", "ab") as f:  # appended after the last cut: still a prefix
            f.write(b"not yet shipped\n")
        plan = {"seed": 3, "sources": [{"source": "docs"}]}
        first = await run_drill(app, plan, store_evidence=False)
        assert first.passed, first.report["misses"]
        for sc in first.report["scenarios"]:
            assert sc["kind"] == "log" and sc["verified"]["source"] and sc["files"] == 2
        assert all(s["source_compare"]["identical"] >= 1 for s in first.report["scenarios"])

        data = bytearray((logs / "journal").read_bytes())
        data[3] ^= 0x20  # rewritten in place: the restored journal is no longer a prefix of it
        (logs / "journal").write_bytes(bytes(data))
        second = await run_drill(
            app, {"sources": [{"source": "docs", "points": ["latest"]}]}, store_evidence=False
        )
    finally:
        await app.close()
    assert not second.passed
    assert second.report["misses"] == [
        f"source docs, site {site}, latest: journal: the restored log is not a prefix of the live file of "
        "that name"
        for site in ("a", "b")
    ]


async def test_live_log_missing_from_the_restore_fails(tmp_path: Path) -> None:
    """A live log file that was there, unchanged, well before the restored point must be in the restore
    (simulated: tailed with an exclude pattern that the drill's config no longer has)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "old.log").write_bytes(b"written once, long before the restored point\n")
    sites = local_sites(tmp_path, ["a", "b"])
    app = await init_app(log_config(tmp_path, logs, sites, exclude=["*.log"]))
    plan = {"sources": [{"source": "docs", "points": ["latest"]}]}
    try:
        # the events are stamped a minute ahead: old.log's last change is then older than the restored point
        # by more than the tailer's longest delay to notice a file (compare.log_delay_ns), without waiting
        s = await streamer(app, clock=lambda: time.time_ns() + 60 * 10**9)
        (logs / "journal").write_bytes(b"entry\n" * 20)
        await s.cut_once()
        s.close()
        await ship(app)
        tailed_rules = await run_drill(app, plan, store_evidence=False)
    finally:
        await app.close()
    assert tailed_rules.passed, tailed_rules.report["misses"]
    for sc in tailed_rules.report["scenarios"]:
        assert sc["verified"]["source"] is True and sc["source_compare"] == counts(compared=1, identical=1)

    app = App(log_config(tmp_path, logs, sites), workers=2)
    try:
        other_rules = await run_drill(app, plan, store_evidence=False)
    finally:
        await app.close()
    assert other_rules.report["misses"] == [
        f"source docs, site {site}, latest: old.log: the live log was there, unchanged, before the restored "
        "point, but the restore lacks it"
        for site in ("a", "b")
    ]
    for sc in other_rules.report["scenarios"]:
        assert sc["verified"]["source"] is False
        assert sc["source_compare"] == counts(compared=1, identical=1, missing_from_restore=1)


async def test_a_drill_removes_what_killed_drills_left_in_the_scratch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only directories a drill makes (12 lowercase hex digits holding scenario directories) that no running
    drill holds are removed, and each removal is logged."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    scratch = tmp_path / "state" / "drills" / "scratch"
    elsewhere = tmp_path / "elsewhere"
    for d in (
        scratch / "0123456789ab" / "001" / "data" / "ro",  # killed mid-scenario (a read-only restored dir)
        scratch / "0123456789ac",  # killed before its first scenario
        scratch / "111111111111" / "001",  # a drill still running (locked below)
        scratch / "abcdefabcdef",  # not only scenario directories: not ours
        scratch / "keep-me" / "001",
        scratch / "0123456789AB" / "001",
        scratch / "0123456789abc" / "001",
        elsewhere / "001",
    ):
        d.mkdir(parents=True)
    (scratch / "0123456789ab" / "001" / "data" / "ro" / "file").write_bytes(b"restored")
    os.chmod(scratch / "0123456789ab" / "001" / "data" / "ro", 0o500)
    (scratch / "abcdefabcdef" / "notes.txt").write_bytes(b"an operator's")
    (scratch / "fedcba987654").symlink_to(elsewhere)
    (scratch / "0123456789cd").write_bytes(b"a file")
    running = os.open(scratch / "111111111111", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
    caplog.set_level(logging.INFO, logger="drsvc.drill")
    try:
        await app.snapshot("docs")
        outcome = await run_drill(app, {"sources": [{"source": "docs", "points": ["latest"]}]})
    finally:
        os.close(running)
        await app.close()
    assert outcome.passed, outcome.report["misses"]
    assert sorted(p.name for p in scratch.iterdir()) == [
        "0123456789AB", "0123456789abc", "0123456789cd", "111111111111", "abcdefabcdef", "fedcba987654",
        "keep-me",
    ]  # fmt: skip
    assert (elsewhere / "001").is_dir() and (scratch / "111111111111" / "001").is_dir()
    removed = [r for r in caplog.records if r.getMessage().startswith("removed the scratch directory")]
    assert [(getattr(r, "path", None), getattr(r, "removed", None)) for r in removed] == [
        (str(scratch / "0123456789ab"), True),
        (str(scratch / "0123456789ac"), True),
    ]


def test_plan_errors_name_the_key(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "src", local_sites(tmp_path, ["a", "b"]))
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "plan.sources"),
        ({"sources": [{"source": "nope"}]}, "plan.sources[0].source"),
        ({"sources": [{"source": "docs", "sites": ["c"]}]}, "plan.sources[0].sites"),
        ({"sources": [{"source": "docs", "points": ["yesterday"]}]}, "plan.sources[0].points[0]"),
        ({"sources": [{"source": "docs", "rto_target": "soon"}]}, "plan.sources[0].rto_target"),
        (
            {"sources": [{"source": "docs", "probes": [{"sql": "SELECT 1", "expect": 1}]}]},
            "plan.sources[0].probes",
        ),
        ({"sources": [{"source": "docs", "sitez": ["a"]}]}, "plan.sources[0].sitez"),
        ({"sources": [{"source": "docs"}, {"source": "docs"}]}, "plan.sources[1].source"),
        ({"scratch": "relative", "sources": [{"source": "docs"}]}, "plan.scratch"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as ei:
            parse_plan(data, config)
        assert ei.value.fields["key"] == key, (data, ei.value)

    plan = parse_plan({"sources": [{"source": "docs", "rpo_target": "5m"}]}, config)
    (sp,) = plan.sources
    assert sp.sites == ("a", "b") and sp.points == ("latest", "earlier") and sp.verify_source
    assert sp.rpo_target_s == 300 and sp.rto_target_s is None and plan.scenario_count == 4
    assert plan.scratch == tmp_path / "state" / "drills" / "scratch"

    f = tmp_path / "nightly.toml"
    f.write_text('scratch = "scr"\n[[sources]]\nsource = "docs"\nsites = ["b"]\npoints = ["earlier"]\n')
    plan = load_plan(f, config)
    assert plan.name == "nightly" and plan.scratch == tmp_path / "scr" and plan.scenario_count == 1

    # the shipped example plan, against the shipped example config
    deploy = Path(__file__).parents[1] / "deploy"
    example = load_plan(deploy / "drill-plan.example.toml", load_config(deploy / "drsvc.toml.example"))
    kinds = {s.source: s.kind for s in example.sources}
    assert kinds["hr-db"] == "postgres" and kinds["audit-log"] == "log" and kinds["hr-docs"] == "tree"
    assert all(s.probes for s in example.sources if s.kind == "postgres")


async def test_postgres_drill_starts_the_restored_server_and_runs_the_probes(
    pg_home: Path, seaweed: WeedServer
) -> None:
    bindir = pg_bindir()
    drsvc_cmd = drsvc_for_postgres(pg_home)
    (port,) = free_ports(1)
    buckets = [seaweed.make_bucket(), seaweed.make_bucket()]
    datadir = pg_home / "main"
    config = write_config(
        pg_home,
        {"s1": s3_site(seaweed, buckets[0]), "s2": s3_site(seaweed, buckets[1])},
        {
            "path": str(datadir),
            "min_copies": 2,
            "conninfo": f"host={pg_home} port={port} user=postgres dbname=postgres",
            "pg_bindir": str(bindir),
        },
    )
    archive = shlex.join([*drsvc_cmd, "-c", str(config), "wal-push", "pg"]) + " %p"
    main = Cluster(bindir, pg_home, datadir, port)
    app = App(load_config(config), workers=2)
    try:
        main.initdb(
            {
                "wal_level": "replica",
                "archive_mode": "on",
                "archive_command": "'" + archive.replace("'", "''") + "'",
            }
        )
        main.start()
        main.sql("CREATE TABLE t (id int PRIMARY KEY)")
        await app.init_tenant("fin", FAST_SCRYPT)
        await wal.take_base_backup(app, "pg")
        main.sql("INSERT INTO t SELECT generate_series(1, 3)")
        last = main.sql("SELECT pg_walfile_name(pg_switch_wal())")
        main.wait_for(f"SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver", "t")
        await wal.ingest_wal(app, "pg")
        reports = await replicate(app.spool, [app.store("s1"), app.store("s2")])
        assert not [r.error for r in reports if r.error]

        plan = {
            "name": "pg",
            "scratch": str(pg_home / "drills"),
            "sources": [
                {
                    "source": "pg",
                    "sites": ["s2"],
                    "points": ["latest"],
                    "probes": [
                        {"sql": "SELECT count(*) FROM t", "expect": 3},
                        {"sql": "SELECT pg_is_in_recovery()", "expect": False},
                        {"sql": "SELECT max(id) FROM t", "expect": 4},  # wrong on purpose
                    ],
                }
            ],
        }
        outcome = await run_drill(app, plan, drsvc_command=drsvc_cmd, report_dir=pg_home / "reports")
    finally:
        main.stop()
        await app.close()
        for b in buckets:
            seaweed.remove_bucket(b)
    (sc,) = outcome.report["scenarios"]
    assert sc["kind"] == "postgres" and sc["isolated"] and not sc["fallbacks"]
    assert sc["verified"]["repository"] and sc["verified"]["source"] is None
    assert sc["verify"]["files"] == sc["files"] > 100
    assert [p["ok"] for p in sc["verified"]["probes"]] == [True, True, False]
    assert sc["verified"]["probes"][2] == {
        "sql": "SELECT max(id) FROM t",
        "expect": "4",
        "got": "3",
        "ok": False,
    }
    assert sc["rto_s"] > 0 and sc["rpo_s"] == 0 and sc["restored_point"] is not None
    assert outcome.report["misses"] == [
        "source pg, site s2, latest: probe 'SELECT max(id) FROM t' gave '3', expected '4'"
    ]
    # no server is left running on a scratch copy, and the scratch copies are gone
    assert not list((pg_home / "drills").rglob("postmaster.pid"))
    assert not [p for p in (pg_home / "drills").iterdir() if any(p.iterdir())]
