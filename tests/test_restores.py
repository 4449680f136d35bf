"""Restore jobs on local-directory sites: requests, dry runs, RPO/RTO verdicts, verification, cancellation."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import PASSPHRASE, init_app, local_sites, tree_state

from drsvc.app import App
from drsvc.core.config import Config, parse_config
from drsvc.core.errors import ConfigError
from drsvc.core.stores.faults import FaultyStore
from drsvc.jobs import JobRunner, JobStore, ProgressSink
from drsvc.restores import (
    RequestError,
    RestoreRequest,
    parse_point,
    parse_restore_request,
    plan_restore,
    run_restore,
)
from replicator import replicate
from restore.logreplay import restore_log
from restore.verify import verify_log, verify_tree
from snapshot.logtail import LogStreamer


def make(tmp: Path, src: Path, sites: list[str], *, roots: bool = True, **source: Any) -> Config:
    return parse_config(
        {
            "state": {"dir": str(tmp / "state")},
            "restore": {"roots": [str(tmp / "restores")]} if roots else {},
            "tenants": {"fin": {"key": {"passphrase": {"value": PASSPHRASE}}, "pack_size": "1MiB"}},
            "sites": local_sites(tmp, sites),
            "sources": {
                "docs": {
                    "tenant": "fin",
                    "type": "tree",
                    "path": str(src),
                    "sites": sites,
                    "min_copies": len(sites),
                    **source,
                }
            },
        }
    )


def build_tree(src: Path, big: int = 0) -> None:
    rng = random.Random(3)
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(rng.randbytes(300_000))
    (src / "sub" / "deeper" / "c").write_bytes(b"")
    (src / "ro").write_bytes(b"read only")
    os.chmod(src / "ro", 0o400)
    os.symlink("sub/b.bin", src / "link")
    for i in range(big):
        (src / f"big{i}.bin").write_bytes(rng.randbytes(2_000_000))


def listing(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


async def tree_app(tmp: Path, sites: list[str] | None = None, big: int = 0, **source: Any) -> App:
    src = tmp / "src"
    build_tree(src, big)
    (tmp / "restores").mkdir()
    app = await init_app(make(tmp, src, sites or ["a", "b"], **source))
    outcome = await app.snapshot("docs")
    assert outcome.protection.protected
    return app


def req(app: App, **body: Any) -> RestoreRequest:
    return parse_restore_request({"source": "docs", **body}, app.config)


def test_parse_point() -> None:
    assert parse_point("latest") is None
    assert parse_point("@1.5") == 1_500_000_000
    assert parse_point("2026-11-25T08:00:00+08:00") == 1_795_564_800 * 10**9
    for bad in ("yesterday", "@", "@nan", "@-1", "@1e300"):
        with pytest.raises(ValueError):
            parse_point(bad)


def test_parse_restore_request(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "restores").mkdir()
    cfg = make(tmp_path, src, ["a", "b"])
    inside = str(tmp_path / "restores" / "x")
    r = parse_restore_request(
        {"source": "docs", "at": "@1700000000", "site": "b", "target": inside, "dry_run": True}, cfg
    )
    assert r == RestoreRequest("docs", "@1700000000", "b", Path(inside), True, True)
    assert r.at_ns == 1_700_000_000 * 10**9 and r.to_dict()["target"] == inside
    assert parse_restore_request({"source": "docs", "target": inside}, cfg).at == "latest"

    def refused(body: dict[str, Any], code: str, field: str, config: Config = cfg) -> None:
        with pytest.raises(RequestError) as e:
            parse_restore_request(body, config)
        assert (e.value.code, e.value.field) == (code, field), e.value
        assert e.value.to_dict()["code"] == code

    refused({"source": "nope", "target": inside}, "unknown_source", "source")
    refused({"target": inside}, "bad_request", "source")
    refused({"source": "docs"}, "bad_request", "target")
    refused({"source": "docs", "target": inside, "at": "soon"}, "bad_request", "at")
    refused({"source": "docs", "target": inside, "site": "c"}, "unknown_site", "site")
    refused({"source": "docs", "target": "restores/x"}, "bad_request", "target")
    refused({"source": "docs", "target": str(tmp_path / "elsewhere")}, "target_outside_roots", "target")
    refused({"source": "docs", "target": inside + "/../../escape"}, "target_outside_roots", "target")
    os.symlink(tmp_path, tmp_path / "restores" / "sneaky")
    refused({"source": "docs", "target": inside.replace("/x", "/sneaky/x")}, "target_outside_roots", "target")
    refused({"source": "docs", "target": inside, "verify": "yes"}, "bad_request", "verify")
    refused({"source": "docs", "target": inside, "force": True}, "bad_request", "force")
    refused(
        {"source": "docs", "target": inside},
        "no_restore_roots",
        "target",
        make(tmp_path, src, ["a"], roots=False),
    )


async def test_dry_run_plans_and_writes_nothing(tmp_path: Path) -> None:
    app = await tree_app(tmp_path)
    try:
        before = listing(tmp_path)
        target = tmp_path / "restores" / "out"
        plan = await plan_restore(app, req(app, target=str(target), dry_run=True, site="b"))
        records, _ = await app.snapshots("docs")
        assert plan["dry_run"] and plan["kind"] == "tree" and plan["site"] == "b"
        assert plan["snapshot"]["id"] == records[0].id
        assert (plan["files"], plan["dirs"], plan["symlinks"]) == (4, 2, 1)
        assert plan["bytes"] == 6000 + 300_000 + 9
        assert plan["fetch"]["blobs"] >= 4 and plan["fetch"]["packs"] >= 1
        assert [s["site"] for s in plan["sites"]] == ["b", "a"] and all(s["complete"] for s in plan["sites"])
        assert plan["recovery_point_ns"] == records[0].time_ns and plan["warnings"] == []
        # a job with dry_run returns the plan too
        result = await run_restore(
            app, req(app, target=str(target), dry_run=True), lambda _p: None, time.time()
        )
        assert result["dry_run"] and result["snapshot"] == plan["snapshot"]
        assert listing(tmp_path) == before  # no target, no staging, no cache file, no state
        assert not target.exists()
        # a site that lost a pack shows as incomplete
        packs = sorted((tmp_path / "sites" / "a").rglob("data/*/*"))
        packs[0].unlink()
        plan = await plan_restore(app, req(app, target=str(target), dry_run=True))
        assert {s["site"]: s["complete"] for s in plan["sites"]} == {"a": False, "b": True}
    finally:
        await app.close()


async def test_run_restore_reports_rpo_and_rto_verdicts(tmp_path: Path) -> None:
    app = await tree_app(tmp_path, rpo_target=1e-6, rto_target="1h")
    try:
        target = tmp_path / "restores" / "out"
        seen: list[dict[str, Any]] = []
        requested = time.time()
        r = await run_restore(app, req(app, target=str(target)), lambda p: seen.append(dict(p)), requested)
        assert tree_state(target) == tree_state(tmp_path / "src")
        records, _ = await app.snapshots("docs")
        assert r["snapshot"] == records[0].id and r["kind"] == "tree" and r["site"] == "a"
        assert r["files"] == 4 and r["bytes"] == 306_009 and r["fallbacks"] == []
        assert r["verified"] and r["verify"]["ok"] and r["verify"]["files"] == 4
        assert r["verify"]["bytes"] == 306_009
        # "latest": the request's time is the requested point
        assert r["rpo_achieved_s"] == pytest.approx(requested - records[0].time_ns / 1e9, abs=1e-3)
        assert 0 < r["rto_achieved_s"] < 60
        assert r["targets"] == {"rpo_s": 1e-6, "rto_s": 3600.0}
        assert r["verdict"] == {"rpo": "missed", "rto": "met", "overall": "missed"}
        assert seen[0]["phase"] == "restoring" and seen[-1]["phase"] == "done"
        last = [p for p in seen if "bytes_total" in p][-1]
        assert last["bytes_done"] == last["bytes_total"] == 306_009 and last["files_done"] == 4
        assert any(p.get("phase") == "verifying" for p in seen)

        # a point in time: the requested point minus the snapshot's
        at = records[0].time_ns + 5 * 10**9
        r = await run_restore(
            app, req(app, target=str(target) + "2", at=f"@{at / 1e9}", site="b"), lambda p: None, time.time()
        )
        assert r["site"] == "b" and r["rpo_achieved_s"] == pytest.approx(5, abs=1e-3)
        assert r["restored_point"].endswith("Z")
    finally:
        await app.close()


async def test_unverified_restore_does_not_meet_its_rto(tmp_path: Path) -> None:
    """The RTO runs to verified data: a restore with verify=false reports its time but never "met"."""
    app = await tree_app(tmp_path, rpo_target="1h", rto_target="1h")
    try:
        target = tmp_path / "restores" / "fast"
        r = await run_restore(app, req(app, target=str(target), verify=False), lambda p: None, time.time())
        assert tree_state(target) == tree_state(tmp_path / "src")
        assert not r["verified"] and r["verify"] is None and 0 < r["rto_achieved_s"] < 60
        assert r["verdict"] == {"rpo": "met", "rto": "unverified", "overall": "unverified"}
        # a missed target stays missed: verifying could only have taken longer
        requested = time.time() - 7200
        r = await run_restore(
            app, req(app, target=str(target) + "2", verify=False), lambda p: None, requested
        )
        assert r["rto_achieved_s"] > 3600
        assert r["verdict"]["rto"] == "missed" and r["verdict"]["overall"] == "missed"
    finally:
        await app.close()


async def test_no_targets_and_target_outside_roots(tmp_path: Path) -> None:
    app = await tree_app(tmp_path, sites=["a"])
    try:
        r = await run_restore(
            app, req(app, target=str(tmp_path / "restores" / "t"), verify=False), lambda p: None, time.time()
        )
        assert r["verdict"] == {"rpo": "no target", "rto": "no target", "overall": "no target"}
        assert not r["verified"] and r["verify"] is None
        outside = RestoreRequest("docs", "latest", None, tmp_path / "outside")
        with pytest.raises(ConfigError) as e:  # App.restore checks the roots whatever the caller checked
            await run_restore(app, outside, lambda p: None, time.time())
        assert e.value.fields["key"] == "restore.roots"
        assert not (tmp_path / "outside").exists()
    finally:
        await app.close()


async def test_verify_detects_files_altered_after_the_restore(tmp_path: Path) -> None:
    app = await tree_app(tmp_path)
    try:
        target = tmp_path / "restores" / "out"
        await run_restore(app, req(app, target=str(target)), lambda p: None, time.time())
        records, _ = await app.snapshots("docs")
        repo = await app.open_repo("fin")
        assert (await verify_tree(repo, records[0], target)).ok

        data = bytearray((target / "sub" / "b.bin").read_bytes())
        data[150_000] ^= 1  # same size, same mtime: only the content ids tell
        st = (target / "sub" / "b.bin").stat()
        (target / "sub" / "b.bin").write_bytes(bytes(data))
        os.utime(target / "sub" / "b.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(target / "a.txt", 0o666)
        (target / "link").unlink()
        os.symlink("a.txt", target / "link")
        (target / "sub" / "deeper" / "c").write_bytes(b"x")
        (target / "extra").write_bytes(b"not restored")
        report = await verify_tree(repo, records[0], target)
        assert not report.ok and report.mismatch_count == 5
        problems = {m.path: m.problem for m in report.mismatches}
        assert set(problems) == {"sub/b.bin", "a.txt", "link", "sub/deeper/c", "extra"}
        assert "chunk" in problems["sub/b.bin"] and "mode 666" in problems["a.txt"]
        assert problems["link"] == "symlink points elsewhere" and problems["extra"] == "not in the snapshot"
        assert report.to_dict()["mismatch_count"] == 5
        (target / "a.txt").unlink()
        assert "a.txt" in {m.path for m in (await verify_tree(repo, records[0], target)).mismatches}
    finally:
        await app.close()


async def test_verify_allows_what_a_postgres_restore_appends(tmp_path: Path) -> None:
    app = await tree_app(tmp_path, sites=["a"])
    try:
        target = tmp_path / "restores" / "out"
        await run_restore(app, req(app, target=str(target)), lambda p: None, time.time())
        records, _ = await app.snapshots("docs")
        repo = await app.open_repo("fin")
        with open(target / "a.txt", "ab") as f:  # as postgresql.auto.conf gets the recovery settings
            f.write(b"restore_command = '...'\n")
        (target / "recovery.signal").write_bytes(b"")
        assert (await verify_tree(repo, records[0], target, appended=("a.txt", "recovery.signal"))).ok
        report = await verify_tree(repo, records[0], target)
        assert {m.path for m in report.mismatches} == {"a.txt", "recovery.signal"}
        (target / "a.txt").write_bytes(b"hello\n" * 999)  # shorter than the snapshot's: never allowed
        os.chmod(target / "a.txt", 0o644)
        report = await verify_tree(repo, records[0], target, appended=("a.txt", "recovery.signal"))
        assert [m.path for m in report.mismatches] == ["a.txt"]
    finally:
        await app.close()


class SlowStore(FaultyStore):
    """A site that takes its time over every read (a far, busy site)."""

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await asyncio.sleep(0.05)
        return await super().get(key, offset, length)


@pytest.mark.parametrize("existing", [False, True])
async def test_cancel_mid_restore_leaves_no_half_written_target(tmp_path: Path, existing: bool) -> None:
    app = await tree_app(tmp_path, sites=["a"], big=12)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    runner = JobRunner(store, max_running=1)
    try:
        app._stores["a"] = SlowStore(app.store("a"))
        root = tmp_path / "restores"
        target = root / "out"
        if existing:
            target.mkdir()
        request = req(app, target=str(target))
        moving = asyncio.Event()
        loop = asyncio.get_running_loop()

        def work(sink: ProgressSink) -> Any:
            def hooked(values: Any) -> None:
                sink(values)
                if values.get("bytes_done"):
                    loop.call_soon_threadsafe(moving.set)

            return run_restore(app, request, hooked, time.time())

        job = await runner.submit("restore", ["fin"], "tester", request.to_dict(), work)
        await asyncio.wait_for(moving.wait(), 60)
        got = await runner.cancel(job.id)
        assert got.state == "cancelled"
        assert 0 < got.progress["bytes_done"] < got.progress["bytes_total"]
        assert sorted(os.listdir(root)) == (["out"] if existing else [])
        if existing:
            assert list(target.iterdir()) == []
        await asyncio.sleep(0.5)  # whatever the writer's threads were doing has ended: still nothing
        assert sorted(os.listdir(root)) == (["out"] if existing else [])
        # and the same request runs to the end afterwards
        again = RestoreRequest("docs", "latest", None, target)
        r = await run_restore(app, again, lambda p: None, time.time())
        assert r["verify"]["ok"] and tree_state(target) == tree_state(tmp_path / "src")
    finally:
        await runner.close()
        store.close()
        await app.close()


async def test_log_source_restore_verified_and_planned(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "binlog.1").write_bytes(os.urandom(200_000))
    (logs / "app.log").write_bytes(b"before\n")
    (tmp_path / "restores").mkdir()
    cfg = make(tmp_path, logs, ["a", "b"], type="log", sync_interval=0.1, rpo_target="1h")
    app = await init_app(cfg)
    try:
        repo = await app.open_repo("fin")
        s = LogStreamer(
            "docs",
            cfg.source("docs"),
            repo,
            app.spool,
            cfg.state.dir,
            checkpoint_stores=[app.store("a")],
            cache_dir=app.cache_dir,
        )
        await s.checkpoint()
        with open(logs / "binlog.1", "ab") as f:
            f.write(b"tx\n" * 5000)
        (logs / "new.log").write_bytes(b"created after the checkpoint\n")
        assert await s.cut_once()
        os.rename(logs / "app.log", logs / "app.log.1")
        assert await s.cut_once()
        s.close()
        reports = await replicate(app.spool, [app.store(n) for n in cfg.source("docs").sites])
        assert all(r.error is None for r in reports)
        expected = {p.name: p.read_bytes() for p in logs.iterdir()}

        target = tmp_path / "restores" / "out"
        plan = await plan_restore(app, req(app, target=str(target), dry_run=True))
        assert plan["kind"] == "log" and plan["checkpoint"]["files"] == 2
        assert plan["segments"]["count"] == 2 and plan["segments"]["missing"] == []
        assert all(x["complete"] for x in plan["sites"]) and not target.exists()

        r = await run_restore(app, req(app, target=str(target)), lambda p: None, time.time())
        assert {p.name: p.read_bytes() for p in target.iterdir()} == expected
        assert r["kind"] == "log" and r["segments"] == 2 and r["verify"]["ok"] and r["verify"]["files"] == 3
        assert r["verdict"]["rpo"] == "met" and r["gap"] is None

        with open(target / "binlog.1", "r+b") as f:  # a byte of the appended part
            f.seek(200_000 + 7)
            f.write(b"X")
        (target / "app.log.1").unlink()
        result = await restore_log(repo, "docs", tmp_path / "restores" / "again", None)
        assert (await verify_log(repo, result)).ok
        result.target = str(target)
        report = await verify_log(repo, result)
        assert {m.path: m.problem for m in report.mismatches} == {
            "app.log.1": "missing",
            "binlog.1": "content appended by the change log differs",
        }
    finally:
        await app.close()
