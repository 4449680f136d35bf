"""The sites' copies: shipping sealed batches to every site of the audit tenant, and comparing the local
log with what the sites hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drsvc.audit.batch import BatchSealer, open_batch
from drsvc.audit.log import AuditLog, Watermark
from drsvc.audit.record import AuditRecord, Line, parse_record, record_intact
from drsvc.audit.verdict import AuditVerdict, Issue, ranges, span
from drsvc.core.crypto import Keys
from drsvc.core.errors import DRError, IntegrityError, StoreError
from drsvc.core.layout import Handle, Kind, Layout

if TYPE_CHECKING:
    from drsvc.app import App

BATCH_RECORDS = 5000  # records per sealed batch at most


@dataclass
class Shipment:
    """What one `replicate` call sent to one site."""

    site: str
    batches: list[str] = field(default_factory=list)
    records: int = 0
    watermark: int = 0  # the newest seq the site holds now (as far as this host shipped)
    error: str | None = None
    note: str | None = None


async def replicate(app: App, log: AuditLog, *, batch_records: int = BATCH_RECORDS) -> list[Shipment]:
    """Ship every record each site of the audit tenant has not received yet, in sealed batches, and advance
    the sites' watermarks. Nothing (an empty list) when ``[audit] tenant`` is unset. A site that fails is
    reported in its Shipment and tried again next time; call it every minute and at shutdown."""
    tenant = app.config.audit.tenant
    if tenant is None:
        return []
    repo = await app.open_repo(tenant)
    sealer = BatchSealer(repo.keys)
    layout = Layout(tenant)
    marks = await asyncio.to_thread(log.watermarks)
    sealed: dict[tuple[int, int], tuple[str, bytes]] = {}  # sites at the same watermark share batches
    seal_lock = asyncio.Lock()

    async def batch(lines: list[Line]) -> tuple[str, bytes]:
        r0, r1 = lines[0].record, lines[-1].record
        assert r0 is not None and r1 is not None
        async with seal_lock:
            got = sealed.get((r0.seq, r1.seq))
            if got is None:
                got = sealed[(r0.seq, r1.seq)] = await asyncio.to_thread(
                    sealer.seal, [ln.raw for ln in lines]
                )
            return got

    async def one(site: str) -> Shipment:
        out = Shipment(site)
        mark = marks.get(site)
        seq = mark.seq if mark is not None else 0
        out.watermark = seq
        try:
            store = app.store(site)
            while True:
                lines = await asyncio.to_thread(log.after, seq, batch_records)
                if not lines:
                    return out
                r0 = lines[0].record
                assert r0 is not None
                if mark is not None and seq == mark.seq and r0.seq == seq + 1 and r0.prev != mark.hash:
                    out.error = (
                        f"the local log disagrees with what was shipped to {site}: seq {r0.seq}'s prev is "
                        f"not the hash of seq {seq} sent there; run `drsvc audit verify`"
                    )
                    return out
                if r0.seq != seq + 1:
                    out.note = f"{span(seq + 1, r0.seq - 1)} are not in the local log (expired or removed)"
                run = _consecutive(lines)
                name, data = await batch(run)
                await store.put(layout.key(Handle(Kind.AUDIT, name)), data)
                last = run[-1].record
                assert last is not None
                await asyncio.to_thread(
                    log.set_watermark, site, Watermark(last.seq, last.hash, name, time.time_ns())
                )
                out.batches.append(name)
                out.records += len(run)
                seq = out.watermark = last.seq
        except DRError as exc:  # a StoreError, or a site not configured
            out.error = exc.message
        return out

    return list(await asyncio.gather(*(one(s) for s in app.config.tenant_sites(tenant))))


def _consecutive(lines: list[Line]) -> list[Line]:
    """The leading run of lines whose seqs increase (a reordered or duplicated line starts the next batch)."""
    out = lines[:1]
    for ln in lines[1:]:
        assert ln.record is not None and out[-1].record is not None
        if ln.record.seq <= out[-1].record.seq:
            break
        out.append(ln)
    return out


# -- verification against the sites ------------------------------------------------------------------


@dataclass
class _SiteCopy:
    line: bytes
    record: AuditRecord | None
    batch: str


async def _read_site(
    app: App, keys: Keys, layout: Layout, site: str, verdict: AuditVerdict
) -> dict[int, _SiteCopy] | None:
    store = app.store(site)
    held: dict[int, _SiteCopy] = {}
    try:
        names = [
            info.key.rsplit("/", 1)[-1]
            async for info in store.list(layout.prefix(Kind.AUDIT))
            if not info.key.rsplit("/", 1)[-1].startswith(".")
        ]
        for name in sorted(names):
            key = f"{layout.prefix(Kind.AUDIT)}{name}"
            try:
                b = await asyncio.to_thread(open_batch, keys, name, await store.get(key))
            except IntegrityError as exc:
                verdict.add(
                    Issue.SITE_CORRUPT,
                    f"audit batch {name} does not open: {exc.message} (`drsvc scrub` repairs it from "
                    "another site)",
                    site=site,
                )
                continue
            for raw in b.lines:
                try:
                    rec: AuditRecord | None = parse_record(raw)
                except ValueError:
                    rec = None
                if rec is None or not record_intact(rec):
                    verdict.add(
                        Issue.MODIFIED,
                        f"a record in batch {name} does not match its hash: it was modified before it was "
                        "shipped",
                        site=site,
                        seq=rec.seq if rec else 0,
                    )
                    continue
                other = held.get(rec.seq)
                if other is not None and other.line != raw:
                    verdict.add(
                        Issue.SITE_DIFFERS,
                        f"batches {other.batch} and {name} hold different records with this seq",
                        site=site,
                        seq=rec.seq,
                    )
                held.setdefault(rec.seq, _SiteCopy(raw, rec, name))
    except StoreError as exc:
        verdict.add(Issue.UNREACHABLE, f"could not read the site: {exc.message}", site=site, warning=True)
        return None
    return held


def content_of(r: AuditRecord) -> dict[str, Any]:
    d = r.to_json()
    del d["prev"], d["hash"]
    return d


async def verify_with_sites(app: App, log: AuditLog, sites: Sequence[str] | None = None) -> AuditVerdict:
    """``log.verify()``, then the sealed copies at each site of the audit tenant (or those named): records a
    site holds that are missing or different here, and records shipped to a site that it does not hold."""
    scan, verdict = await asyncio.to_thread(log.verify_scan)
    tenant = app.config.audit.tenant
    if tenant is None:
        verdict.replicated = False
        verdict.add(
            Issue.NOT_REPLICATED,
            "[audit] tenant is not set: the log is not replicated, so removing its newest records together "
            "with head.json cannot be detected",
            warning=True,
        )
        return verdict
    verdict.replicated = True
    names = list(sites) if sites else app.config.tenant_sites(tenant)
    repo = await app.open_repo(tenant)
    layout = Layout(tenant)
    local = scan.records
    last_local = max(local, default=scan.base.seq if scan.base else 0)
    cutoff = log.now_ns() - int(log.keep_s * 1e9)
    marks = await asyncio.to_thread(log.watermarks)
    copies: dict[int, tuple[str, _SiteCopy]] = {}
    for site in names:
        held = await _read_site(app, repo.keys, layout, site, verdict)
        if held is None:
            continue
        verdict.sites[site] = max(held, default=0)
        newest_gone: list[int] = []
        gone: list[int] = []
        expired_early: list[int] = []
        rechained: list[int] = []
        for seq, c in sorted(held.items()):
            assert c.record is not None
            first = copies.setdefault(seq, (site, c))
            if first[1].line != c.line:
                verdict.add(Issue.SITE_DIFFERS, f"differs from the copy at {first[0]}", site=site, seq=seq)
            mine = local.get(seq)
            if mine is None:
                if seq > last_local:
                    newest_gone.append(seq)
                elif scan.base is not None and seq <= scan.base.seq:
                    if c.record.time_ns >= cutoff:
                        expired_early.append(seq)
                else:
                    gone.append(seq)
            elif mine.raw != c.line:
                assert mine.record is not None
                if content_of(mine.record) == content_of(c.record):
                    rechained.append(seq)
                else:
                    verdict.add(
                        Issue.MODIFIED,
                        f"differs from the copy at {site} (batch {c.batch})",
                        file=mine.file,
                        line=mine.line,
                        seq=seq,
                        site=site,
                    )
        for a, b in ranges(rechained):
            verdict.add(
                Issue.BROKEN_LINK,
                f"{span(a, b)}: the content is as at {site} but prev and hash differ: an earlier record was "
                "edited or removed and the chain hashed again",
                file=local[a].file,
                line=local[a].line,
                seq=a,
                site=site,
            )
        for a, b in ranges(newest_gone):
            verdict.add(
                Issue.REMOVED,
                f"the newest records {span(a, b)} are at {site} but not here: removed from the end of "
                "the log",
                seq=a,
                site=site,
            )
        for a, b in ranges(gone):
            verdict.add(Issue.REMOVED, f"{span(a, b)} are at {site} but not here", seq=a, site=site)
        for a, b in ranges(expired_early):
            verdict.add(
                Issue.REMOVED,
                f"{span(a, b)} are at {site} but not here: deleted before the retention ends",
                seq=a,
                site=site,
            )
        mark = marks.get(site)
        shipped = mark.seq if mark is not None else 0
        lacking = [s for s in local if s <= shipped and s not in held]
        for a, b in ranges(lacking):
            verdict.add(
                Issue.SITE_MISSING,
                f"{span(a, b)} were shipped to {site} and are not there",
                seq=a,
                site=site,
            )
        pending = [s for s in local if s > max(shipped, max(held, default=0))]
        if pending:
            verdict.add(
                Issue.NOT_REPLICATED,
                f"{len(pending)} records ({span(min(pending), max(pending))}) are not at {site} yet",
                site=site,
                warning=True,
            )
    return verdict
