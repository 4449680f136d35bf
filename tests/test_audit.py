"""The audit log: the chain finds a modified, removed or reordered record; the sites' sealed copies find what
someone who rewrote the files and the anchors removed or edited; scrub repairs a damaged batch."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedServer
from cryptography.hazmat.primitives import hashes
from helpers import FAST_SCRYPT, PASSPHRASE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sites import s3_site

from drsvc.app import App
from drsvc.audit import (
    EXPIRED,
    HEAD,
    AuditLog,
    AuditVerdict,
    Issue,
    Watermark,
    canonical,
    digest,
    log_files,
    open_batch,
    open_log,
    replicate,
    verify_with_sites,
)
from drsvc.check import check_site
from drsvc.cli.main import EXIT_INTEGRITY, EXIT_OK, main
from drsvc.core import crypto
from drsvc.core.config import Config, parse_config
from drsvc.core.crypto import ObjectType
from drsvc.daemon_api import AUDIT_EXPIRE_EVERY, DaemonApi
from drsvc.metrics import Metrics
from drsvc.scrub import FindingKind, scrub_tenant

DAY = 86400.0
T0 = 1_790_000_000.0  # 2026-09-21


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fill(log: AuditLog, n: int, clock: Clock | None = None, step: float = 60.0) -> None:
    for i in range(n):
        log.append(
            who=f"token:{'ops' if i % 2 else 'admin'}",
            action="POST /v1/sources/{source}/snapshots",
            target={"source": "docs", "i": i},
            result="accepted",
            status=202,
            tenant="fin",
            remote="10.0.0.7",
            request_id=f"req-{i}",
        )
        if clock is not None:
            clock.t += step


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def the_file(d: Path) -> Path:
    (name,) = log_files(d)
    return d / name


def kinds(v: AuditVerdict) -> set[tuple[Issue, int]]:
    return {(f.kind, f.seq) for f in v.problems}


def rehash(record: dict[str, Any], prev: str) -> dict[str, Any]:
    """What someone who knows the format does after editing a record: chain it and hash it again."""
    body = {k: v for k, v in record.items() if k != "hash"}
    body["prev"] = prev
    return {**body, "hash": digest("sha256", canonical(body))}


def forge(d: Path, edit: dict[int, dict[str, Any]], drop_tail: int = 0) -> None:
    """Rewrite the (single) file with records edited and the newest `drop_tail` dropped, re-chained, and
    head.json to match: the chain and the anchors alone can no longer tell."""
    path = the_file(d)
    recs = [json.loads(x) for x in path.read_bytes().splitlines()]
    recs = recs[: len(recs) - drop_tail]
    prev = "sha256:" + "0" * 64
    out = []
    for r in recs:
        r = rehash({**r, **edit.get(r["seq"], {})}, prev)
        prev = r["hash"]
        out.append(canonical(r) + b"\n")
    path.write_bytes(b"".join(out))
    top = recs and json.loads(out[-1])
    (d / HEAD).write_bytes(canonical({"seq": top["seq"], "hash": top["hash"], "time_ns": top["time_ns"]}))


# -- the chain, locally ----------------------------------------------------------------------------------


def test_append_and_verify_roundtrip_across_days_and_reopening(tmp_path: Path) -> None:
    clock = Clock()
    d = tmp_path / "audit"
    with AuditLog(d, clock=clock) as log:
        fill(log, 3, clock, step=DAY / 2)
        rec = log.append(who="token:x", action="DELETE /v1/restores/7", target={}, result="ok", status=200)
    assert rec.seq == 4 and rec.time.endswith("Z") and rec.hash.startswith("sha256:")
    assert log_files(d) == ["audit-20260921.jsonl", "audit-20260922.jsonl", "audit-20260923.jsonl"]
    v = AuditLog(d, clock=clock).verify()
    assert v.intact and v.findings == [] and (v.records, v.first_seq, v.last_seq, v.files) == (4, 1, 4, 3)

    # a new writer continues the chain where the last one stopped
    with AuditLog(d, clock=clock) as log:
        fill(log, 2)
        got = list(log.records())
    assert [r.seq for r in got] == [1, 2, 3, 4, 5, 6]
    assert all(b.prev == a.hash for a, b in itertools.pairwise(got))
    assert got[0].who == "token:admin" and got[0].target == {"source": "docs", "i": 0}
    assert got[0].remote == "10.0.0.7" and got[0].request_id == "req-0" and got[0].status == 202
    assert json.loads((d / HEAD).read_bytes())["seq"] == 6
    assert AuditLog(d, clock=clock).verify().intact

    # one writing process at a time
    with AuditLog(d, clock=clock) as a, AuditLog(d, clock=clock) as b:
        fill(a, 1)
        with pytest.raises(Exception, match="another process"):
            fill(b, 1)


def test_a_modified_record_is_found(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    with AuditLog(d, clock=Clock()) as log:
        fill(log, 5)
    path = the_file(d)
    ls = lines(path)
    r = json.loads(ls[2])
    r["who"] = "token:nobody"  # still canonical JSON, hash kept
    ls[2] = canonical(r) + b"\n"
    path.write_bytes(b"".join(ls))
    v = AuditLog(d).verify()
    assert not v.intact
    (f,) = v.problems
    assert (f.kind, f.file, f.line, f.seq) == (Issue.MODIFIED, path.name, 3, 3)
    assert f"{path.name}:3 seq 3" in f.where()

    # hashed again to match: the next record's prev no longer does
    ls[2] = canonical(rehash(r, r["prev"])) + b"\n"
    path.write_bytes(b"".join(ls))
    v = AuditLog(d).verify()
    assert kinds(v) == {(Issue.BROKEN_LINK, 4)}
    assert "seq 3" in v.problems[0].detail


def test_a_removed_middle_record_is_found(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    with AuditLog(d, clock=Clock()) as log:
        fill(log, 6)
    path = the_file(d)
    ls = lines(path)
    del ls[2:4]
    path.write_bytes(b"".join(ls))
    v = AuditLog(d).verify()
    (f,) = v.problems
    assert (f.kind, f.seq, f.file, f.line) == (Issue.REMOVED, 3, path.name, 3)
    assert "seqs 3..4 missing" in f.detail


def test_removed_newest_records_are_found_by_the_head_anchor(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    with AuditLog(d, clock=Clock()) as log:
        fill(log, 6)
    path = the_file(d)
    path.write_bytes(b"".join(lines(path)[:4]))
    v = AuditLog(d).verify()
    (f,) = v.problems
    assert (f.kind, f.seq) == (Issue.REMOVED, 5) and "seqs 5..6" in f.detail and HEAD in f.detail

    # and a writer that starts now does not reuse their seqs (that would hide the removal)
    with AuditLog(d, clock=Clock()) as log:
        fill(log, 1)
    assert [r.seq for r in AuditLog(d).records()] == [1, 2, 3, 4, 7]
    assert kinds(AuditLog(d).verify()) == {(Issue.REMOVED, 5)}


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    with AuditLog(d, clock=Clock()) as log:
        fill(log, 5)
    path = the_file(d)
    ls = lines(path)
    ls[1], ls[3] = ls[3], ls[1]
    path.write_bytes(b"".join(ls))
    v = AuditLog(d).verify()
    assert {(f.kind, f.seq, f.line) for f in v.problems} == {
        (Issue.REORDERED, 3, 3),
        (Issue.REORDERED, 2, 4),
    }


def test_a_torn_last_line_is_a_warning_and_the_next_writer_ends_it(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    clock = Clock()
    with AuditLog(d, clock=clock) as log:
        fill(log, 3)
    path = the_file(d)
    with path.open("ab") as f:  # a crash in the middle of the fourth write: it was never acknowledged
        f.write(b'{"action":"POST /v1/restores","hash":"sha256:12')
    v = AuditLog(d).verify()
    assert v.intact and v.records == 3
    (w,) = v.warnings
    assert (w.kind, w.file, w.line) == (Issue.TORN, path.name, 4) and "crash" in w.detail

    with AuditLog(d, clock=clock) as log:
        fill(log, 2)
    v = AuditLog(d).verify()
    assert v.intact and v.records == 5 and [(w.kind, w.line) for w in v.warnings] == [(Issue.TORN, 4)]
    assert [r.seq for r in AuditLog(d).records()] == [1, 2, 3, 4, 5]


def test_an_sm3_chain(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    with AuditLog(d, hash="sm3", clock=Clock()) as log:
        fill(log, 4)
    recs = list(AuditLog(d).records())
    assert recs[0].prev == "sm3:" + "0" * 64
    body = {k: v for k, v in recs[2].to_json().items() if k != "hash"}
    h = hashes.Hash(hashes.SM3())
    h.update(canonical(body))
    assert recs[2].hash == "sm3:" + h.finalize().hex()
    assert AuditLog(d, hash="sm3").verify().intact

    path = the_file(d)
    path.write_bytes(path.read_bytes().replace(b'"status":202', b'"status":200', 1))
    assert kinds(AuditLog(d, hash="sm3").verify()) == {(Issue.MODIFIED, 1)}


def test_expiry_deletes_old_files_and_verify_stays_clean(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    clock = Clock()
    with AuditLog(d, clock=clock, keep_s=180 * DAY) as log:
        fill(log, 10, clock, step=30 * DAY)  # ten records 30 days apart: ten files
        clock.t += 5 * DAY  # the fifth record is 185 days old, the sixth 155
        files = log_files(d)
        assert len(files) == 10
        assert log.expire() == files[:5]
    assert log_files(d) == files[5:]
    v = AuditLog(d, clock=clock).verify()
    assert v.intact and v.findings == [] and (v.first_seq, v.last_seq) == (6, 10)
    assert json.loads((d / EXPIRED).read_bytes())["seq"] == 5

    # the chain goes on, and expiring again changes nothing
    with AuditLog(d, clock=clock, keep_s=180 * DAY) as log:
        fill(log, 1)
        assert log.expire() == []
    assert AuditLog(d, clock=clock).verify().intact

    # deleting a young file and claiming it expired does not pass
    first = d / log_files(d)[0]
    (rec,) = [json.loads(x) for x in first.read_bytes().splitlines()]
    first.unlink()
    (d / EXPIRED).write_bytes(canonical({"seq": rec["seq"], "hash": rec["hash"], "time_ns": rec["time_ns"]}))
    v = AuditLog(d, clock=clock).verify()
    assert kinds(v) == {(Issue.REMOVED, 6)} and "retention" in v.problems[0].detail


async def test_the_daemon_expires_old_audit_files_at_start_and_daily(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DaemonApi (the daemon's side of the API) expires at start, then once AUDIT_EXPIRE_EVERY has passed,
    and logs the files it deleted."""
    clock = Clock()
    api = DaemonApi(audit_config(tmp_path, local(tmp_path, "a"), tenant=None), Metrics(), clock=clock)
    try:
        fill(api.audit, 10, clock, step=30 * DAY)  # ten files, 30 days apart
        clock.t += 5 * DAY  # five are past keep (180 days)
        files = log_files(api.audit.dir)
        with caplog.at_level(logging.INFO, logger="drsvc.supervisor"):
            await api.start()
        assert log_files(api.audit.dir) == files[5:]
        (expired,) = [r for r in caplog.records if r.getMessage() == "audit files expired"]
        assert expired.__dict__["files"] == files[:5]

        # the sixth file passes keep 25 days later: an expiry an hour before that deletes nothing ...
        clock.t += 25 * DAY - 3600
        await api.audit_once()
        assert log_files(api.audit.dir) == files[5:]
        clock.t += 2 * 3600  # ... two hours later it is past keep, but the next expiry is a day away ...
        await api.audit_once()
        assert log_files(api.audit.dir) == files[5:]
        clock.t += AUDIT_EXPIRE_EVERY  # ... which comes
        await api.audit_once()
        assert log_files(api.audit.dir) == files[6:]
        assert api.audit.verify().intact

        # SIGHUP with a longer keep: the next expiry keeps what the old keep would have deleted
        api.reload(audit_config(tmp_path, local(tmp_path, "a"), tenant=None, keep="1095d"))
        clock.t += 60 * DAY
        await api.audit_once()
        assert log_files(api.audit.dir) == files[6:]
    finally:
        await api.close()


def test_concurrent_appends_from_threads_keep_one_chain(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    log = AuditLog(d)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(40):
            log.append(who=f"t{n}", action="POST /v1/x", target={"i": i}, result="ok", status=200)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    v = AuditLog(d).verify()
    assert v.intact and v.findings == [] and v.records == 320 and v.last_seq == 320


_TEMPLATE: dict[str, bytes] = {}


def _template() -> dict[str, bytes]:
    """Files of a small log: two days, a unicode target, head.json (built once)."""
    if not _TEMPLATE:
        with tempfile.TemporaryDirectory() as tmp:
            clock = Clock()
            with AuditLog(tmp, clock=clock) as log:
                fill(log, 3, clock, step=DAY / 2)
                log.append(who="token:ü", action="PUT /v1/x", target={"p": '/a"b'}, result="ok", status=200)
            _TEMPLATE.update({n: (Path(tmp) / n).read_bytes() for n in [*log_files(Path(tmp)), HEAD]})
    return _TEMPLATE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_detected(tmp_path: Path, data: st.DataObject) -> None:
    files = _template()
    name = data.draw(st.sampled_from(sorted(files)))
    pos = data.draw(st.integers(0, len(files[name]) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != files[name][pos]))
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        for n, content in files.items():
            b = bytearray(content)
            if n == name:
                b[pos] = new
            (Path(tmp) / n).write_bytes(bytes(b))
        v = AuditLog(tmp).verify()
        assert not v.intact, (name, pos, new, v.findings)


# -- the sites' copies --------------------------------------------------------------------------------------


def audit_config(
    tmp: Path, sites: dict[str, dict[str, Any]], tenant: str | None = "fin", **audit: Any
) -> Config:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    return parse_config(
        {
            "state": {"dir": str(tmp / "state")},
            "audit": ({"tenant": tenant} if tenant else {}) | audit,
            "tenants": {"fin": {"key": {"passphrase": {"value": PASSPHRASE}}}},
            "sites": sites,
            "sources": {"docs": {"tenant": "fin", "type": "tree", "path": str(src), "sites": list(sites)}},
        }
    )


def local(tmp: Path, *names: str) -> dict[str, dict[str, Any]]:
    return {n: {"type": "local", "path": str(tmp / "sites" / n)} for n in names}


async def started(config: Config) -> App:
    app = App(config, workers=1)
    await app.init_tenant("fin", FAST_SCRYPT)
    return app


def batches(tmp: Path, site: str) -> list[Path]:
    return sorted((tmp / "sites" / site / "fin" / "audit").glob("*"))


async def test_replication_to_two_sites_finds_tail_removal_and_rewritten_records(tmp_path: Path) -> None:
    app = await started(audit_config(tmp_path, local(tmp_path, "a", "b")))
    log = open_log(app.config)
    try:
        fill(log, 10)
        shipped = await replicate(app, log)
        assert [(s.site, s.records, s.watermark, s.error) for s in shipped] == [
            ("a", 10, 10, None),
            ("b", 10, 10, None),
        ]
        fill(log, 5)
        shipped = await replicate(app, log)
        assert [(s.records, len(s.batches)) for s in shipped] == [(5, 1), (5, 1)]
        assert await replicate(app, log) == [replicate_nothing("a", 15), replicate_nothing("b", 15)]
        assert [p.name for p in batches(tmp_path, "a")] == [p.name for p in batches(tmp_path, "b")]
        assert len(batches(tmp_path, "a")) == 2
        v = await verify_with_sites(app, log)
        assert v.intact and v.findings == [] and v.replicated and v.sites == {"a": 15, "b": 15}

        # a batch opens with the tenant's keys only, and holds the records' lines verbatim
        repo = await app.open_repo("fin")
        first = batches(tmp_path, "a")[0]
        batch = open_batch(repo.keys, first.name, first.read_bytes())
        local_lines = {json.loads(x)["seq"]: x for x in the_file(log.dir).read_bytes().splitlines()}
        assert all(local_lines[json.loads(x)["seq"]] == x for x in batch.lines)
        with pytest.raises(crypto.IntegrityError):
            open_batch(repo.keys, "0" * 64, first.read_bytes())

        # re-shipping after a lost watermark writes the same names and bytes
        before = {p.name: p.read_bytes() for p in batches(tmp_path, "a")}
        (log.dir / "replicated.json").unlink()
        await replicate(app, log)
        after = {p.name: p.read_bytes() for p in batches(tmp_path, "a")}
        assert set(after) >= set(before) and all(after[n] == b for n, b in before.items())

        # the newest records removed with head.json rewritten: the chain is fine, the sites are not
        forge(log.dir, {}, drop_tail=3)
        assert AuditLog(log.dir).verify().intact
        v = await verify_with_sites(app, log)
        assert {(f.kind, f.seq, f.site) for f in v.problems} == {
            (Issue.REMOVED, 13, "a"),
            (Issue.REMOVED, 13, "b"),
        }
        assert "seqs 13..15" in v.problems[0].detail and "end of the log" in v.problems[0].detail

        # a record edited and the chain hashed again from it on
        forge(log.dir, {7: {"who": "token:nobody"}})
        v = await verify_with_sites(app, log, sites=["b"])
        assert (Issue.MODIFIED, 7, "b") in {(f.kind, f.seq, f.site) for f in v.problems}
        (mod,) = [f for f in v.problems if f.kind is Issue.MODIFIED]
        assert (
            mod.file == the_file(log.dir).name
            and mod.line == 7
            and "differs from the copy at b" in mod.detail
        )
    finally:
        log.close()
        await app.close()


def replicate_nothing(site: str, seq: int) -> Any:
    from drsvc.audit import Shipment

    return Shipment(site, watermark=seq)


async def test_a_batch_missing_at_a_site_is_named(tmp_path: Path) -> None:
    app = await started(audit_config(tmp_path, local(tmp_path, "a", "b")))
    log = open_log(app.config)
    try:
        fill(log, 4)
        await replicate(app, log)
        fill(log, 2)
        await replicate(app, log)
        fill(log, 1)  # not shipped yet: a warning
        keys = (await app.open_repo("fin")).keys
        second = [p for p in batches(tmp_path, "b") if open_batch(keys, p.name, p.read_bytes()).first == 5]
        second[0].unlink()
        v = await verify_with_sites(app, log)
        assert {(f.kind, f.seq, f.site) for f in v.problems} == {(Issue.SITE_MISSING, 5, "b")}
        assert {(f.kind, f.site) for f in v.warnings} == {
            (Issue.NOT_REPLICATED, "a"),
            (Issue.NOT_REPLICATED, "b"),
        }
    finally:
        log.close()
        await app.close()


async def test_without_an_audit_tenant_nothing_is_replicated_and_verify_says_so(tmp_path: Path) -> None:
    app = await started(audit_config(tmp_path, local(tmp_path, "a"), tenant=None))
    log = open_log(app.config)
    try:
        fill(log, 2)
        assert await replicate(app, log) == []
        v = await verify_with_sites(app, log)
        assert v.intact and v.replicated is False
        assert [w.kind for w in v.warnings] == [Issue.NOT_REPLICATED]
    finally:
        log.close()
        await app.close()


async def test_replication_to_a_seaweedfs_site(tmp_path: Path, seaweed: WeedServer) -> None:
    bucket = seaweed.make_bucket()
    sites = {"s3": s3_site(seaweed, bucket), **local(tmp_path, "a")}
    app = await started(audit_config(tmp_path, sites))
    log = open_log(app.config)
    try:
        fill(log, 6)
        shipped = await replicate(app, log)
        assert [(s.site, s.records, s.error) for s in shipped] == [("s3", 6, None), ("a", 6, None)]
        c = seaweed.client()
        keys = [str(o.object_name) for o in c.list_objects(bucket, prefix="fin/audit/", recursive=True)]
        assert [k.rsplit("/", 1)[1] for k in keys] == [p.name for p in batches(tmp_path, "a")]
        forge(log.dir, {2: {"result": "denied"}}, drop_tail=1)
        v = await verify_with_sites(app, log, sites=["s3"])
        assert {(f.kind, f.seq, f.site) for f in v.problems} == {
            (Issue.MODIFIED, 2, "s3"),
            (Issue.BROKEN_LINK, 3, "s3"),  # 3..5: re-chained
            (Issue.REMOVED, 6, "s3"),
        }
    finally:
        log.close()
        await app.close()


# -- scrub and check ----------------------------------------------------------------------------------------


async def test_scrub_repairs_a_damaged_audit_batch_and_spreads_a_drill_report(tmp_path: Path) -> None:
    app = await started(audit_config(tmp_path, local(tmp_path, "a", "b")))
    log = open_log(app.config)
    try:
        fill(log, 5)
        await replicate(app, log)
        fill(log, 2)
        await replicate(app, log)
        repo = await app.open_repo("fin")
        drill_name = "d" * 48
        drill = crypto.seal_object(repo.keys, ObjectType.DRILL, drill_name, b'{"drill": "report"}')
        await app.store("a").put(f"fin/drills/{drill_name}", drill)
        damaged, gone = batches(tmp_path, "b")
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x20
        damaged.write_bytes(bytes(data))
        gone.unlink()

        bad = await check_site(repo, app.store("b"), read_data=True)
        assert bad.evidence == 1 and bad.problems == [f"audit/{damaged.name}: object failed authentication"]
        assert not (await verify_with_sites(app, log)).intact

        report = await scrub_tenant(app, "fin", 1.0)
        assert {(f.site, f.kind, f.object) for f in report.findings} == {
            ("b", FindingKind.CORRUPT, f"audit/{damaged.name}"),
            ("b", FindingKind.MISSING, f"audit/{gone.name}"),
            ("b", FindingKind.MISSING, f"drills/{drill_name}"),
        }
        assert all(f.repaired for f in report.findings) and not report.unrecoverable
        again = await scrub_tenant(app, "fin", 1.0)
        assert again.findings == [] and again.clean
        for site in ("a", "b"):
            checked = await check_site(repo, app.store(site), read_data=True)
            assert checked.ok and checked.evidence == 3, checked.problems
        v = await verify_with_sites(app, log)
        assert v.intact and v.findings == []
    finally:
        log.close()
        await app.close()


# -- the CLI ------------------------------------------------------------------------------------------------


def test_cli_verify_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sites = local(tmp_path, "a", "b")
    src = tmp_path / "src"
    src.mkdir()
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(
        f'[state]\ndir = "{tmp_path}/state"\n[audit]\ntenant = "fin"\n'
        f'[tenants.fin.key.passphrase]\nvalue = "{PASSPHRASE}"\n'
        + "".join(f'[sites.{n}]\ntype = "local"\npath = "{s["path"]}"\n' for n, s in sites.items())
        + f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a", "b"]\n'
    )

    async def setup() -> None:
        app = await started(audit_config(tmp_path, sites))
        log = open_log(app.config)
        try:
            fill(log, 4)
            await replicate(app, log)
        finally:
            log.close()
            await app.close()

    asyncio.run(setup())
    capsys.readouterr()
    # drsvc check counts the audit batch at each site (evidence), and authenticates it with --read-data
    assert main(["-c", str(cfg), "check", "fin", "--read-data"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "site a: ok:" in text and "1 evidence objects" in text
    assert main(["-c", str(cfg), "check", "fin", "--json"]) == EXIT_OK
    assert [s["evidence"] for s in json.loads(capsys.readouterr().out)] == [1, 1]
    assert main(["-c", str(cfg), "audit", "verify"]) == EXIT_OK
    assert "intact" in capsys.readouterr().out
    assert main(["-c", str(cfg), "audit", "show", "--json"]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in shown] == [1, 2, 3, 4] and shown[0]["who"] == "token:admin"
    assert main(["-c", str(cfg), "audit", "show", "--since", "2000-01-01T00:00:00+00:00"]) == EXIT_OK
    assert "token:ops" in capsys.readouterr().out

    d = tmp_path / "state" / "audit"
    path = the_file(d)
    path.write_bytes(path.read_bytes().replace(b"token:ops", b"token:opz", 1))
    assert main(["-c", str(cfg), "audit", "verify", "--site", "a"]) == EXIT_INTEGRITY
    text = capsys.readouterr().out
    assert f"{path.name}:2 seq 2" in text and "modified" in text
    assert main(["-c", str(cfg), "audit", "verify", "--json"]) == EXIT_INTEGRITY
    out = json.loads(capsys.readouterr().out)
    assert out["intact"] is False and {(f["kind"], f["seq"]) for f in out["findings"]} >= {("modified", 2)}


def test_expiry_waits_for_records_no_site_holds(tmp_path: Path) -> None:
    """Past `keep`, a file still goes only once every audit site holds its records: a site down for longer
    than keep delays expiry instead of losing records kept nowhere else."""
    d = tmp_path / "audit"
    clock = Clock()
    with AuditLog(d, clock=clock, keep_s=180 * DAY) as log:
        fill(log, 10, clock, step=30 * DAY)  # ten files, 30 days apart; five are past keep below
        clock.t += 5 * DAY
        files = log_files(d)
        log.set_watermark("a", Watermark(3, "h", "b", 0))  # site a holds up to seq 3, site b nothing
        assert log.expire(["a", "b"]) == []
        log.set_watermark("b", Watermark(10, "h", "b", 0))
        assert log.expire(["a", "b"]) == files[:3]  # both hold 1..3; a lacks 4 and 5
        log.set_watermark("a", Watermark(10, "h", "b", 0))
        assert log.expire(["a", "b"]) == files[3:5]
    assert AuditLog(d, clock=clock).verify().intact
