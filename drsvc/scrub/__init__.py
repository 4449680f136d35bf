"""Scrubbing a tenant repository at every site, and repairing each site from the others.

1. Inventory: list each site of the tenant: prune markers (read at once), then change-log segments, WAL
   objects, audit batches and drill reports, snapshot records, indexes and packs (the reverse of the
   shipping order, so what a listed object names was at that site before it was listed), key slots and
   config. A site that cannot be listed, or
   holds nothing at all (an NFS mount that is not mounted: never filled), is a finding and is left out; a
   key that is not of our layout is stray.
2. Expectations. A site must hold the config and every key slot; the records of every source whose copy
   policy names it (except those retention would forget) and every record it holds; the indexes it holds,
   those its records list and those naming a pack it holds; the packs those indexes name; the segments and
   WAL objects of every source whose copy policy names it and those it holds, except the segments retention
   has deleted (streams no kept checkpoint starts, older than the newest kept one: left where they are,
   unread, as extra). Packs a prune marker condemns, and indexes naming them, belong to that prune: neither
   spread nor rewritten, and an index a record lists that is present nowhere is no finding (prune replaces
   indexes). Records, segments and WAL of a source tag no configured source has stay where they are (extra).
   A pack nothing expects at a site is extra (reported, never deleted). Audit batches and drill reports
   (evidence) belong at every site of the tenant. A copy this host's outbox has still to ship to a site is
   in flight there, not missing.
3. Verification. Every copy of every record, key slot and config is read (they are small); of indexes,
   packs, segments, WAL objects and evidence, a share chosen by a stable hash of the name from a cursor kept
   under the state dir, so successive runs cover all of them. Always read: every copy of an object whose
   copies differ in size or that the last run left damaged (so an alert stays until the damage is gone), and
   one good copy of an object a site lacks. A pack verifies when its sealed header authenticates, agrees
   with the index and every blob verifies (``drsvc.check.verify_pack``); a copy whose size differs from one
   that verified is damaged unread. A segment or WAL object verifies when it opens and decodes as its name
   and source's; an audit batch or a drill report when it authenticates as what its name says
   (``drsvc.check.verify_evidence``).
4. Repair, in shipping order (config and key slots, packs, segments and WAL, evidence, indexes, records):
   write the bytes of a copy that verified (indexes and records are fetched and verified again just
   before), then stat the written copy.
5. An object no site holds intact is unrecoverable; the report names what it breaks: for a pack, the
   snapshots whose trees reach a blob that no copy holds intact, in this pack or any other; for a segment,
   the restores of its source after its first event (until a newer stream starts); for a WAL file,
   point-in-time recovery past it.
6. Findings, repairs and the result go to the log, the metrics and ``<state.dir>/scrub/<tenant>.json``,
   which ``drsvc status`` shows. CPU work on bytes runs in threads; packs, segments and WAL objects are read
   a few at a time.

Modules, in the order a run uses them: ``inventory`` (1), then by kind of object ``keys`` (config and key
slots), ``records``, ``indexes``, ``packs``, ``changelog`` (segments and WAL) and ``evidence`` (audit
batches, drill reports) (2-4), ``breaks`` (5, and the alert). ``engine`` holds a run's state and reads,
verifies and repairs one object; ``verify`` checks one copy of the small objects, segments and WAL;
``report`` holds what a run returns and ``state`` what it keeps between runs (6).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from drsvc.app import App
from drsvc.core.layout import Kind
from drsvc.core.repository import gather_limited
from drsvc.metrics import Metrics
from drsvc.scrub.breaks import alert, name_breaks
from drsvc.scrub.changelog import read_changelogs
from drsvc.scrub.engine import PACKS_AT_ONCE as PACKS_AT_ONCE
from drsvc.scrub.engine import SMALL_AT_ONCE, Scrub
from drsvc.scrub.evidence import read_evidence
from drsvc.scrub.indexes import read_indexes
from drsvc.scrub.inventory import LISTED as LISTED
from drsvc.scrub.inventory import open_repository, take_inventory
from drsvc.scrub.keys import config_and_keys
from drsvc.scrub.packs import read_packs
from drsvc.scrub.records import read_records
from drsvc.scrub.report import (
    DAMAGE,
    Finding,
    FindingKind,
    ScrubProgress,
    ScrubReport,
    SnapshotRef,
    Unrecoverable,
)
from drsvc.scrub.state import ScrubState, load_state, save_state, scrub_due, selected
from drsvc.scrub.state import position as position
from drsvc.scrub.state import state_path as state_path

log = logging.getLogger("drsvc.scrub")


async def scrub_tenant(
    app: App,
    tenant: str,
    read_share: float,
    *,
    repair: bool = True,
    metrics: Metrics | None = None,
    progress: Callable[[ScrubProgress], None] | None = None,
) -> ScrubReport:
    """Scrub `tenant` at every site its sources use; repair what a verified copy allows (unless told not
    to); save the report (and the read cursor) under the state dir for ``drsvc status`` and return it.

    Raises TransientStoreError when no site of the tenant can be listed; any one unreachable site is a
    finding of the report instead."""
    if not 0.0 < read_share <= 1.0:
        raise ValueError(f"read_share must be in (0, 1], not {read_share}")
    state_dir = app.config.state.dir
    state = await asyncio.to_thread(load_state, state_dir, tenant)
    run = Scrub(app, tenant, read_share, state.cursor, repair, metrics, progress)
    if state.last is not None:  # what the last run left damaged is read again, whatever the window
        run.recheck = {f.object for f in state.last.unrepaired} | {u.object for u in state.last.unrecoverable}
    report = await _run(run)
    report.finished = time.time()
    state = ScrubState((state.cursor + read_share) % 1.0 if read_share < 1.0 else state.cursor, report)
    await asyncio.to_thread(save_state, state_dir, tenant, state)
    if metrics is not None:
        metrics.scrub_finished(tenant, report.finished, len(report.unrecoverable))
    log.log(
        logging.ERROR if report.unrecoverable else logging.INFO,
        "scrub finished",
        extra={
            "tenant": tenant,
            "seconds": round(report.finished - report.started, 3),
            "findings": len(report.damage),
            "notices": len(report.findings) - len(report.damage),
            "repaired": report.repairs,
            "unrecoverable": len(report.unrecoverable),
            "unreachable": sorted(report.unreachable),
            "copies_read": report.copies_read,
            "bytes_verified": report.bytes_verified,
        },
    )
    return report


async def _run(s: Scrub) -> ScrubReport:
    await take_inventory(s)
    await open_repository(s)
    s.report.objects = len(s.objects)
    s.report.copies = sum(len(o.sizes) for o in s.objects.values())
    await config_and_keys(s)
    records = await read_records(s)
    packs = await read_indexes(s, records)
    await read_packs(s, packs)
    await read_changelogs(s, records)
    await read_evidence(s)
    for kind in (Kind.INDEX, Kind.SNAPSHOT):  # after the packs: a record at a site implies the rest
        objs = s.of_kind(kind)
        await gather_limited(SMALL_AT_ONCE, [functools.partial(s.repair_copies, o, None) for o in objs])
    await name_breaks(s, records, packs)
    alert(s)
    return s.report


__all__ = [
    "DAMAGE",
    "Finding",
    "FindingKind",
    "ScrubProgress",
    "ScrubReport",
    "ScrubState",
    "SnapshotRef",
    "Unrecoverable",
    "load_state",
    "save_state",
    "scrub_due",
    "scrub_tenant",
    "selected",
]
