"""Scrubbing a tenant repository at every site, and repairing each site from the others.

1. Inventory: list each site of the tenant: prune markers (read at once), then snapshot records, indexes and
   packs (the reverse of the shipping order, so what a listed object names was at that site before it was
   listed), key slots and config. A site that cannot be listed, or holds nothing at all (an NFS mount that is
   not mounted: never filled), is a finding and is left out; a key that is not of our layout is stray.
2. Expectations. A site must hold the config and every key slot; the records of every source whose copy
   policy names it (except those retention would forget) and every record it holds; the indexes it holds,
   those its records list and those naming a pack it holds; the packs those indexes name. Packs a prune
   marker condemns, and indexes naming them, belong to that prune: neither spread nor rewritten, and an index
   a record lists that is present nowhere is no finding (prune replaces indexes). Records of a source tag no
   configured source has stay where they are. A pack nothing expects at a site is extra (reported, never
   deleted). A copy this host's outbox has still to ship to a site is in flight there, not missing.
3. Verification. Every copy of every record, key slot and config is read (they are small); of indexes and
   packs, a share chosen by a stable hash of the name from a cursor kept under the state dir, so successive
   runs cover all of them. Always read: every copy of an object whose copies differ in size or that the last
   run left damaged (so an alert stays until the damage is gone), and one good copy of an object a site lacks.
   A pack verifies when its sealed header authenticates, agrees with the index and every blob verifies
   (``drsvc.check.verify_pack``); a copy whose size differs from one that verified is damaged unread.
4. Repair, in shipping order (config and key slots, packs, indexes, records): write the bytes of a copy that
   verified (indexes and records are fetched and verified again just before), then stat the written copy.
5. An object no site holds intact is unrecoverable; the report names the snapshots it breaks (for a pack:
   those whose trees reach a blob that no copy holds intact, in this pack or any other).
6. Findings, repairs and the result go to the log, the metrics and ``<state.dir>/scrub/<tenant>.json``,
   which ``drsvc status`` shows. CPU work on bytes runs in threads; packs are read a few at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import functools
import hashlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from drsvc.app import App
from drsvc.check import verify_pack
from drsvc.core import crypto, format, retention
from drsvc.core.crypto import BlobType
from drsvc.core.durable import write_file
from drsvc.core.errors import (
    DRError,
    IntegrityError,
    ObjectNotFound,
    RepositoryError,
    StoreError,
    TransientStoreError,
)
from drsvc.core.format import BlobEntry, PackIndex, SnapshotRecord
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.outbox import Outbox
from drsvc.core.repository import BlobLocation, Repository, _canonical, gather_limited
from drsvc.core.stores import ObjectStore
from drsvc.metrics import Metrics

log = logging.getLogger("drsvc.scrub")

T = TypeVar("T")
PACKS_AT_ONCE = 4  # packs being read and verified at a time (each holds up to two copies in memory)
SMALL_AT_ONCE = 16  # records, indexes, key slots
# prune markers first, then the reverse of the shipping order
LISTED = (Kind.PRUNE, Kind.SNAPSHOT, Kind.INDEX, Kind.PACK, Kind.KEY, Kind.CONFIG)


class FindingKind(enum.StrEnum):
    MISSING = "missing"  # a site lacks an object it should hold
    CORRUPT = "corrupt"  # a copy failed verification
    SIZE = "size"  # a copy's size differs from that of a copy that verified
    EXTRA = "extra"  # ours, but nothing expects it at this site (in flight, or garbage for prune)
    STRAY = "stray"  # a key under the tenant that is not an object of our layout
    UNREACHABLE = "unreachable"  # the site could not be listed or read


DAMAGE = frozenset({FindingKind.MISSING, FindingKind.CORRUPT, FindingKind.SIZE})


@dataclass
class Finding:
    site: str
    kind: FindingKind
    object: str  # "data/<id>", "index/<id>", "snapshots/<tag>/<id>", "keys/<id>", "config"; a stray: its key
    detail: str = ""
    repaired: bool = False
    repair_error: str | None = None

    @property
    def damage(self) -> bool:
        return self.kind in DAMAGE


@dataclass(frozen=True)
class SnapshotRef:
    id: str
    source: str  # the source name, or "(tag <tag>)" when no configured source has the tag
    time_ns: int  # the recovery point; 0 when the record itself is lost


@dataclass
class Unrecoverable:
    """An object that no reachable site holds intact."""

    object: str
    detail: str
    sites: list[str]  # sites holding a copy that failed verification
    breaks: list[SnapshotRef] = field(default_factory=list)


@dataclass
class ScrubReport:
    tenant: str
    started: float
    finished: float = 0.0
    read_share: float = 1.0
    repair: bool = True
    sites: list[str] = field(default_factory=list)
    objects: int = 0
    copies: int = 0
    copies_read: int = 0
    bytes_verified: int = 0
    in_flight: int = 0  # copies missing at a site that the local outbox has still to ship there
    findings: list[Finding] = field(default_factory=list)
    unrecoverable: list[Unrecoverable] = field(default_factory=list)

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    @property
    def repairs(self) -> int:
        return sum(1 for f in self.findings if f.repaired)

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.damage if not f.repaired]

    @property
    def unreachable(self) -> dict[str, str]:
        return {f.site: f.detail for f in self.findings if f.kind is FindingKind.UNREACHABLE}

    @property
    def clean(self) -> bool:
        """Nothing damaged, lost or unreachable (extra and stray objects are notices)."""
        return not self.damage and not self.unrecoverable and not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScrubReport:
        d = dict(d)
        d["findings"] = [Finding(**{**f, "kind": FindingKind(f["kind"])}) for f in d.get("findings", [])]
        d["unrecoverable"] = [
            Unrecoverable(**{**u, "breaks": [SnapshotRef(**b) for b in u.get("breaks", [])]})
            for u in d.get("unrecoverable", [])
        ]
        return cls(**d)


@dataclass(frozen=True)
class ScrubProgress:
    phase: str  # "list", "config", "records", "indexes", "packs", "repair", "walk"
    done: int
    total: int
    object: str = ""
    read: tuple[str, ...] = ()  # the sites whose copy of `object` was downloaded and verified


# -- state: the read cursor and the last report, per tenant ----------------------------------------------


@dataclass
class ScrubState:
    cursor: float = 0.0  # where the next run's window of indexes and packs to read starts, in [0, 1)
    last: ScrubReport | None = None


def state_path(state_dir: Path, tenant: str) -> Path:
    return state_dir / "scrub" / f"{tenant}.json"


def load_state(state_dir: Path, tenant: str) -> ScrubState:
    """The tenant's scrub state; a missing or unreadable file is a fresh start."""
    try:
        d = json.loads(state_path(state_dir, tenant).read_text())
        last = d.get("last")
        return ScrubState(float(d.get("cursor", 0.0)) % 1.0, ScrubReport.from_json(last) if last else None)
    except (OSError, ValueError, TypeError, KeyError):
        return ScrubState()


def save_state(state_dir: Path, tenant: str, state: ScrubState) -> None:
    body = {"cursor": state.cursor, "last": state.last.to_json() if state.last else None}
    write_file(state_path(state_dir, tenant), json.dumps(body, indent=1).encode(), mode=0o644)


def scrub_due(state_dir: Path, tenant: str, interval: float, now: float) -> bool:
    """True when the tenant was never scrubbed, or its last scrub finished `interval` seconds ago or more."""
    last = load_state(state_dir, tenant).last
    return last is None or now - last.finished >= interval


def position(name: str) -> float:
    """A stable place in [0, 1) for an object name: which run of the rotation reads it."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def selected(name: str, cursor: float, share: float) -> bool:
    """Whether a run whose window starts at `cursor` reads `name`; windows of successive runs tile [0, 1)."""
    return share >= 1.0 or (position(name) - cursor) % 1.0 < share


# -- the scrub ---------------------------------------------------------------------------------------------


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
    run = _Scrub(app, tenant, read_share, state.cursor, repair, metrics, progress)
    if state.last is not None:  # what the last run left damaged is read again, whatever the window
        run.recheck = {f.object for f in state.last.unrepaired} | {u.object for u in state.last.unrecoverable}
    report = await run.run()
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


@dataclass
class _Obj:
    handle: Handle
    key: str
    label: str
    sizes: dict[str, int] = field(default_factory=dict)  # site -> size of its copy, as listed
    expected: set[str] = field(default_factory=set)
    good: str | None = None  # a site whose copy verified
    good_size: int = -1
    targets: dict[str, Finding] = field(default_factory=dict)  # sites to repair: missing or bad copies
    failed: set[str] = field(default_factory=set)  # sites whose copy failed verification
    read: tuple[str, ...] = ()  # sites whose copy was downloaded and verified in this run
    intact: set[bytes] = field(default_factory=set)  # packs without a good copy: blobs intact somewhere
    frozen: str = ""  # why it must not be written (a prune is replacing it)


@dataclass
class _Pack:
    salt: bytes
    entries: dict[bytes, BlobEntry] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)


class _Scrub:
    def __init__(
        self,
        app: App,
        tenant: str,
        share: float,
        cursor: float,
        repair: bool,
        metrics: Metrics | None,
        progress: Callable[[ScrubProgress], None] | None,
    ) -> None:
        self.app = app
        self.config = app.config
        self.tenant = tenant
        self.layout = Layout(tenant)
        self.share = share
        self.cursor = cursor
        self.repair = repair
        self.metrics = metrics
        self.progress = progress
        self.site_order = self.config.tenant_sites(tenant)
        self.stores: dict[str, ObjectStore] = {}  # the reachable sites
        self.objects: dict[Handle, _Obj] = {}
        self.in_flight: set[tuple[str, str]] = set()  # (key, site) the local outbox has still to ship
        self.markers: dict[str, list[bytes]] = {}  # prune marker -> its copies, as read while listing
        self.condemned: set[str] = set()  # packs a prune condemned: deleted by a later prune run
        self.recheck: set[str] = set()  # objects the last run left damaged: read in full again
        self.report = ScrubReport(
            tenant, time.time(), read_share=share, repair=repair, sites=list(self.site_order)
        )
        self.repo: Repository
        self._pack_entries: dict[str, _Pack] = {}

    async def run(self) -> ScrubReport:
        await self._inventory()
        await self._open()
        self.report.objects = len(self.objects)
        self.report.copies = sum(len(o.sizes) for o in self.objects.values())
        await self._config_and_keys()
        records = await self._records()
        packs = await self._indexes(records)
        await self._packs(packs)
        for kind in (Kind.INDEX, Kind.SNAPSHOT):  # after the packs: a record at a site implies the rest
            objs = sorted((o for o in self.objects.values() if o.handle.kind is kind), key=_by_handle)
            await gather_limited(SMALL_AT_ONCE, [functools.partial(self._repair, o, None) for o in objs])
        await self._name_breaks(records, packs)
        self._alert()
        return self.report

    # -- findings ------------------------------------------------------------------------------------

    def _find(self, site: str, kind: FindingKind, obj: str, detail: str = "") -> Finding:
        f = Finding(site, kind, obj, detail)
        self.report.findings.append(f)
        if self.metrics is not None:
            self.metrics.scrub_finding(self.tenant, site, kind.value)
        log.log(
            logging.WARNING if kind in DAMAGE or kind is FindingKind.UNREACHABLE else logging.INFO,
            "scrub finding",
            extra={"tenant": self.tenant, "site": site, "kind": kind.value, "object": obj, "detail": detail},
        )
        return f

    def _unreachable(self, site: str, exc: StoreError) -> None:
        if self.stores.pop(site, None) is not None or site not in self.report.unreachable:
            self._find(site, FindingKind.UNREACHABLE, "", exc.message)

    def _count_read(self, data: bytes) -> None:
        self.report.copies_read += 1
        self.report.bytes_verified += len(data)
        if self.metrics is not None:
            self.metrics.scrub_verified(self.tenant, len(data))

    def _tell(self, phase: str, done: int, total: int, obj: str = "", read: tuple[str, ...] = ()) -> None:
        if self.progress is not None:
            self.progress(ScrubProgress(phase, done, total, obj, read))

    def _lost(self, o: _Obj, detail: str) -> Unrecoverable | None:
        """Record `o` as unrecoverable, unless a copy went unread (its site stopped answering)."""
        if o.good is not None or any(s not in o.failed for s in o.sizes):
            return None
        if self.report.unreachable:
            detail += f"; not consulted (unreachable): {', '.join(sorted(self.report.unreachable))}"
        u = Unrecoverable(o.label, detail, sorted(o.sizes, key=self.site_order.index))
        self.report.unrecoverable.append(u)
        return u

    # -- 1. inventory ----------------------------------------------------------------------------------

    async def _inventory(self) -> None:
        state_dir = self.config.state.dir
        before = await asyncio.to_thread(_outbox_pending, state_dir, self.tenant)
        listed = await asyncio.gather(*(self._list(s) for s in self.site_order))
        after = await asyncio.to_thread(_outbox_pending, state_dir, self.tenant)
        self.in_flight = before | after
        for site, found in zip(self.site_order, listed, strict=True):
            if found is None:
                continue
            if not found:  # not even a config: an NFS mount that is not mounted must not be filled
                self.stores.pop(site)
                self._find(
                    site,
                    FindingKind.UNREACHABLE,
                    "",
                    "the site holds no repository for this tenant: is it mounted? (`drsvc init` creates it)",
                )
                continue
            for h, size in found.items():
                o = self.objects.get(h)
                if o is None:
                    o = self.objects[h] = _Obj(h, self.layout.key(h), _label(self.layout, h))
                o.sizes[site] = size
        self._tell("list", len(self.site_order), len(self.site_order))
        if not self.stores:
            raise TransientStoreError(
                "no site of the tenant could be listed: "
                + "; ".join(f"{s}: {d}" for s, d in self.report.unreachable.items()),
                tenant=self.tenant,
            )

    async def _list(self, site: str) -> dict[Handle, int] | None:
        store = self.app.store(site)
        found: dict[Handle, int] = {}
        try:
            for kind in LISTED:
                async for info in store.list(self.layout.prefix(kind)):
                    if info.key.rsplit("/", 1)[-1].startswith("."):
                        continue  # a local site's temporary file
                    try:
                        h = self.layout.parse(info.key)
                    except RepositoryError:
                        self._find(site, FindingKind.STRAY, info.key, "not an object of this repository")
                        continue
                    if h.kind is not Kind.PRUNE:
                        found[h] = info.size
                        continue
                    # read now: a prune deletes its markers after its deletions, so a marker read before the
                    # packs are listed names every pack that prune may be deleting while we look
                    with contextlib.suppress(ObjectNotFound):
                        self.markers.setdefault(h.name, []).append(await store.get(info.key))
        except StoreError as exc:
            self._unreachable(site, exc)
            return None
        self.stores[site] = store
        return found

    async def _open(self) -> None:
        errors: list[str] = []
        for site in list(self.stores):  # a site whose config is damaged must not stop the scrub
            try:
                repo = await self.app.open_repo(self.tenant, site)
                break
            except (RepositoryError, StoreError) as exc:
                errors.append(f"{site}: {exc.message}")
        else:
            raise RepositoryError(
                "no reachable site could open the repository: " + "; ".join(errors), tenant=self.tenant
            )
        self.repo = Repository(self.tenant, repo.keys, repo.params, list(self.stores.values()))
        for name, copies in self.markers.items():
            for data in copies:  # a marker that no copy decodes is ignored, by writers and prune alike
                try:
                    marker = await asyncio.to_thread(self.repo.decode_prune_marker, name, data)
                except DRError:
                    continue
                self.condemned.update(marker.packs)
                break

    # -- reading and repairing one object ---------------------------------------------------------------

    def _every(self, o: _Obj) -> bool:
        """Read every copy: the object is in this run's window, its copies differ in size, or the last run
        left it damaged."""
        return (
            selected(o.handle.name, self.cursor, self.share)
            or len(set(o.sizes.values())) > 1
            or o.label in self.recheck
        )

    def _expect(self, o: _Obj, sites: set[str]) -> None:
        """Set where `o` belongs; a reachable site lacking it is missing, unless it is on its way there."""
        o.expected = sites
        for site in self.site_order:
            if site not in sites or site not in self.stores or site in o.sizes or site in o.targets:
                continue
            if (o.key, site) in self.in_flight:
                self.report.in_flight += 1
                continue
            o.targets[site] = self._find(site, FindingKind.MISSING, o.label)

    async def _read(
        self,
        o: _Obj,
        verify: Callable[[bytes], T],
        every_copy: bool,
        on_bad: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> tuple[T, bytes] | None:
        """Download copies of `o` (every one, or until one verifies) and verify them; classify bad copies
        as findings. The decoded value and bytes of the first copy that verified, or None."""
        common = Counter(o.sizes.values())
        order = sorted(o.sizes, key=lambda s: (-common[o.sizes[s]], self.site_order.index(s)))
        found: tuple[T, bytes] | None = None
        failed: dict[str, tuple[int, str]] = {}
        read: list[str] = []
        for site in order:
            if found is not None and not every_copy:
                break
            store = self.stores.get(site)
            if store is None:
                continue
            try:
                data = await store.get(o.key)
            except ObjectNotFound:  # gone since it was listed
                del o.sizes[site]
                if site in o.expected:
                    o.targets[site] = self._find(site, FindingKind.MISSING, o.label, "gone since listed")
                continue
            except StoreError as exc:
                self._unreachable(site, exc)
                continue
            read.append(site)
            self._count_read(data)
            try:
                value = await asyncio.to_thread(verify, data)
            except DRError as exc:
                blob = exc.fields.get("blob")
                failed[site] = (len(data), exc.message + (f" (blob {blob[:16]})" if blob else ""))
                if on_bad is not None:
                    await on_bad(data)
                continue
            if found is None:
                found = (value, data)
                o.good, o.good_size = site, len(data)
        for site in order:
            if site in failed:
                size, why = failed[site]
                if o.good is not None and size != o.good_size:
                    why = f"{size} bytes, an intact copy has {o.good_size}; {why}"
                    o.targets[site] = self._find(site, FindingKind.SIZE, o.label, why)
                else:
                    o.targets[site] = self._find(site, FindingKind.CORRUPT, o.label, why)
            elif o.good is not None and site in o.sizes and o.sizes[site] != o.good_size:
                why = f"{o.sizes[site]} bytes, an intact copy has {o.good_size}"
                o.targets[site] = self._find(site, FindingKind.SIZE, o.label, why)
        o.failed.update(failed)
        o.read = tuple(read)
        return found

    async def _repair(self, o: _Obj, data: bytes | None) -> None:
        """Write a verified copy to every reachable site that lacks `o` or holds a bad copy."""
        targets = [s for s in o.targets if s in self.stores]
        if not self.repair or not targets or o.good is None:
            return
        if o.frozen:
            for s in targets:
                o.targets[s].repair_error = o.frozen
            return
        source = o.good
        if data is None:  # fetched again, and verified again, right before it is written
            try:
                if source not in self.stores:
                    raise TransientStoreError("the site stopped answering", site=source)
                data = await self.stores[source].get(o.key)
                await asyncio.to_thread(self._verifier(o), data)
            except DRError as exc:
                for s in targets:
                    o.targets[s].repair_error = f"the copy at {source} could not be read again: {exc.message}"
                return
        for site in targets:
            f = o.targets[site]
            store = self.stores[site]
            try:
                await store.put(o.key, data)
                info = await store.stat(o.key)
                if info is None or info.size != len(data):
                    raise StoreError(
                        f"the written copy stats as {info.size if info else 'absent'}, not {len(data)} bytes"
                    )
            except StoreError as exc:
                f.repair_error = exc.message
                log.error(
                    "scrub repair failed",
                    extra={"tenant": self.tenant, "site": site, "object": o.label, "error": exc.message},
                )
                continue
            f.repaired = True
            if self.metrics is not None:
                self.metrics.scrub_repair(self.tenant, site)
            log.info(
                "scrub repaired",
                extra={
                    "tenant": self.tenant,
                    "site": site,
                    "object": o.label,
                    "kind": f.kind.value,
                    "source_site": source,
                    "bytes": len(data),
                },
            )

    def _verifier(self, o: _Obj) -> Callable[[bytes], object]:
        kind, name = o.handle.kind, o.handle.name
        if kind is Kind.CONFIG:
            return self._verify_config
        if kind is Kind.KEY:
            return lambda b: _parse_slot(name, self.repo.keys.suite, b)
        if kind is Kind.SNAPSHOT:
            return lambda b: self._decode_record(o.handle, b)
        if kind is Kind.INDEX:
            return lambda b: self.repo.decode_index(name, b)
        entries = list(self._pack_entries[name].entries.values())
        return lambda b: verify_pack(self.repo, name, b, entries)

    # -- 2. config and key slots ------------------------------------------------------------------------

    async def _config_and_keys(self) -> None:
        h = Handle(Kind.CONFIG)
        cfg = self.objects.setdefault(h, _Obj(h, self.layout.key(h), "config"))
        self._expect(cfg, set(self.stores))
        if await self._read(cfg, self._verify_config, every_copy=True) is None:
            self._lost(cfg, "no copy of the repository config verifies")
        await self._repair(cfg, None)  # first: a local site takes data only where the config is
        slots = sorted((o for o in self.objects.values() if o.handle.kind is Kind.KEY), key=_by_handle)
        await gather_limited(SMALL_AT_ONCE, [functools.partial(self._slot, o) for o in slots])
        self._tell("config", 1 + len(slots), 1 + len(slots))

    def _verify_config(self, data: bytes) -> None:
        try:
            body = json.loads(data)
            unsigned = {k: v for k, v in body.items() if k != "mac"}
        except (ValueError, AttributeError):
            raise IntegrityError("the config is not JSON") from None
        keys = self.repo.keys
        if body.get("id") != keys.repo_id.hex() or body.get("tenant") != self.tenant:
            raise IntegrityError("the config is of another repository")
        if keys.config_mac(_canonical(unsigned)) != body.get("mac"):
            raise IntegrityError("the config's MAC does not verify")

    async def _slot(self, o: _Obj) -> None:
        """A key slot is plaintext: a copy is intact if it parses; if intact copies differ, the one this
        tenant's key material opens is right, and if it opens none of them, nothing is repaired."""
        self._expect(o, set(self.stores))
        copies: dict[str, bytes] = {}
        for site in list(o.sizes):
            try:
                copies[site] = await self.stores[site].get(o.key)
                self._count_read(copies[site])
            except StoreError as exc:
                if not isinstance(exc, ObjectNotFound):
                    self._unreachable(site, exc)
                continue
        variants: dict[bytes, list[str]] = {}
        for site, data in copies.items():
            try:
                _parse_slot(o.handle.name, self.repo.keys.suite, data)
            except IntegrityError as exc:
                o.failed.add(site)
                o.targets[site] = self._find(site, FindingKind.CORRUPT, o.label, exc.message)
                continue
            variants.setdefault(data, []).append(site)
        good: bytes | None = next(iter(variants)) if len(variants) == 1 else None
        if len(variants) > 1:
            kind, secret = self.app.key_material(self.tenant)
            opens = [v for v in variants if await asyncio.to_thread(self._opens, v, kind, secret)]
            if len(opens) == 1:
                good = opens[0]
            else:
                for sites in variants.values():
                    o.failed.update(sites)
                    for s in sites:
                        o.targets[s] = self._find(s, FindingKind.CORRUPT, o.label, "copies differ")
                self._lost(o, "copies differ and this tenant's key opens none: cannot tell which is intact")
                return
        if good is None:
            if copies:
                self._lost(o, "no copy of the key slot parses")
            return
        o.good, o.good_size = variants[good][0], len(good)
        for data, sites in variants.items():
            for s in sites if data != good else ():
                o.targets[s] = self._find(s, FindingKind.CORRUPT, o.label, "differs from the copy that opens")
        await self._repair(o, good)

    def _opens(self, data: bytes, kind: str, secret: bytes) -> bool:
        try:
            return crypto.open_key_slot(json.loads(data), kind, secret) == self.repo.keys.master
        except DRError:
            return False

    # -- 3. snapshot records -------------------------------------------------------------------------

    def _decode_record(self, h: Handle, data: bytes) -> SnapshotRecord:
        rec = self.repo.decode_snapshot(h.name, data)
        if self.repo.keys.source_tag(rec.source) != h.source_tag:
            raise IntegrityError("snapshot record is filed under another source's tag", object=h.name)
        return rec

    async def _records(self) -> dict[Handle, SnapshotRecord]:
        objs = sorted((o for o in self.objects.values() if o.handle.kind is Kind.SNAPSHOT), key=_by_handle)
        records: dict[Handle, SnapshotRecord] = {}
        done = 0

        async def one(o: _Obj) -> None:
            nonlocal done
            got = await self._read(o, lambda b: self._decode_record(o.handle, b), every_copy=True)
            if got is not None:
                records[o.handle] = got[0]
            done += 1
            self._tell("records", done, len(objs), o.label, o.read)

        await gather_limited(SMALL_AT_ONCE, [functools.partial(one, o) for o in objs])

        sources = {n: sc for n, sc in self.config.sources.items() if sc.tenant == self.tenant}
        tags = {self.repo.keys.source_tag(n): n for n in sources}
        forgotten: set[str] = set()  # records retention would forget now: never spread them again
        for name, sc in sources.items():
            if sc.retention is not None:
                mine = [r for r in records.values() if r.source == name]
                plan = retention.plan(mine, sc.retention.policy(), time.time_ns())
                forgotten.update(r.id for r in plan.forget)
        unknown: Counter[tuple[str, str]] = Counter()
        for o in objs:
            source = tags.get(o.handle.source_tag)
            if source is None:
                unknown.update((s, o.handle.source_tag) for s in o.sizes)
            where = set(o.sizes)
            if source is not None and o.handle.name not in forgotten:
                where |= set(sources[source].sites)
            self._expect(o, where)
            if o.good is None and o.sizes:
                lost = self._lost(o, "no copy of the snapshot record decodes")
                if lost is not None:
                    lost.breaks.append(
                        SnapshotRef(o.handle.name, source or f"(tag {o.handle.source_tag})", 0)
                    )
        for (site, tag), n in sorted(unknown.items()):
            self._find(
                site,
                FindingKind.EXTRA,
                f"snapshots/{tag}/",
                f"{n} snapshot records of a source tag that no configured source of the tenant has "
                "(a removed source?): kept where they are, not copied",
            )
        return records

    # -- 4. indexes ------------------------------------------------------------------------------------

    async def _indexes(self, records: dict[Handle, SnapshotRecord]) -> dict[str, _Pack]:
        """Read the indexes present anywhere. An index belongs where it is, where a record that lists it
        belongs, and where a pack it names is; one that names a pack a prune condemned is being replaced
        by that prune: it is neither spread nor rewritten. An index listed by records but present nowhere
        is no finding either (prune replaces indexes; `drsvc check` finds blobs that no index names)."""
        named_by: dict[str, list[Handle]] = {}
        for h, rec in records.items():
            for name in rec.index:
                named_by.setdefault(name, []).append(h)
        objs = sorted((o for o in self.objects.values() if o.handle.kind is Kind.INDEX), key=_by_handle)
        contents: dict[str, list[PackIndex]] = {}
        done = 0

        async def one(o: _Obj) -> None:
            nonlocal done
            every = self._every(o)
            got = await self._read(o, lambda b: self.repo.decode_index(o.handle.name, b), every)
            done += 1
            self._tell("indexes", done, len(objs), o.label, o.read)
            if got is not None:
                contents[o.handle.name] = got[0]
            elif lost := self._lost(
                o, "no copy of the index decodes; its packs can be indexed again from their sealed headers"
            ):
                lost.breaks.extend(_ref(records[rh]) for rh in named_by.get(o.handle.name, ()))

        await gather_limited(SMALL_AT_ONCE, [functools.partial(one, o) for o in objs])

        pack_sites: dict[str, set[str]] = {}
        for o in self.objects.values():
            if o.handle.kind is Kind.PACK:
                pack_sites[o.handle.name] = set(o.sizes)
        packs: dict[str, _Pack] = {}
        for o in objs:
            content = contents.get(o.handle.name)
            if content is None:
                continue
            where = set(o.sizes)
            if any(p.pack in self.condemned for p in content):
                o.frozen = "it names packs that a prune condemned: the prune replaces it"
            else:
                for rh in named_by.get(o.handle.name, ()):
                    where |= self.objects[rh].expected
                for p in content:
                    where |= pack_sites.get(p.pack, set())
            self._expect(o, where)
            for p in content:
                pk = packs.setdefault(p.pack, _Pack(p.salt))
                pk.expected |= o.expected
                for e in p.blobs:
                    pk.entries.setdefault(e.blob_id, e)
        self._pack_entries = packs
        return packs

    # -- 5. packs --------------------------------------------------------------------------------------

    async def _packs(self, packs: dict[str, _Pack]) -> None:
        for name in packs:
            h = Handle(Kind.PACK, name)
            if h not in self.objects:
                self.objects[h] = _Obj(h, self.layout.key(h), _label(self.layout, h))
        objs = sorted((o for o in self.objects.values() if o.handle.kind is Kind.PACK), key=_by_handle)
        done = 0

        async def one(o: _Obj) -> None:
            nonlocal done
            pk = packs.get(o.handle.name)
            if o.handle.name in self.condemned:
                pass  # a prune deletes it after its grace period (or takes it back): nothing to keep
            elif pk is None:
                self._extra(o, "in no index: on its way (its index not yet shipped) or garbage for prune")
            else:
                await self._pack(o, pk)
            done += 1
            self._tell("packs", done, len(objs), o.label, o.read)

        await gather_limited(PACKS_AT_ONCE, [functools.partial(one, o) for o in objs])

    def _extra(self, o: _Obj, detail: str) -> None:
        for site in o.sizes:
            if (o.key, site) in self.in_flight:
                self.report.in_flight += 1
            else:
                self._find(site, FindingKind.EXTRA, o.label, detail)

    async def _pack(self, o: _Obj, pk: _Pack) -> None:
        for site in set(o.sizes) - pk.expected:
            self._find(site, FindingKind.EXTRA, o.label, "no index at this site names it")
        self._expect(o, pk.expected)
        every = self._every(o)
        if not (every or o.targets) or not (o.sizes or o.targets):
            return
        entries = list(pk.entries.values())
        name = o.handle.name

        async def on_bad(data: bytes) -> None:
            o.intact |= await asyncio.to_thread(_intact_blobs, self.repo, name, pk.salt, data, entries)

        got = await self._read(o, lambda b: verify_pack(self.repo, name, b, entries), every, on_bad)
        if got is None:
            lost = len(entries) - len(o.intact & pk.entries.keys())
            self._lost(
                o,
                ("no copy of the pack verifies" if o.sizes else "the pack is missing at every site")
                + f"; {lost} of its {len(entries)} blobs are intact at no site",
            )
            return
        await self._repair(o, got[1])

    # -- 6. what the unrecoverable objects break ---------------------------------------------------------

    async def _name_breaks(self, records: dict[Handle, SnapshotRecord], packs: dict[str, _Pack]) -> None:
        """For every unrecoverable pack: the snapshots whose trees reach a blob no copy holds intact."""
        by_label = {u.object: u for u in self.report.unrecoverable}
        lost: dict[bytes, str] = {}
        where: dict[bytes, BlobLocation] = {}
        for name, pk in packs.items():
            o = self.objects[Handle(Kind.PACK, name)]
            if o.label in by_label:
                lost.update((b, o.label) for b in pk.entries.keys() - o.intact)
            else:
                where.update((b, BlobLocation(name, pk.salt, e)) for b, e in pk.entries.items())
        for b in where.keys() & lost.keys():  # stored twice (two workers wrote it): the other copy serves
            del lost[b]
        if not lost:
            return
        for name, pk in packs.items():
            where.update((b, BlobLocation(name, pk.salt, e)) for b, e in pk.entries.items() if b not in where)
        kids: dict[bytes, tuple[list[bytes], set[str]]] = {}  # tree -> (subtrees, lost objects it names)
        stack = [r.tree for r in records.values()]
        while stack:
            tid = stack.pop()
            if tid in kids:
                continue
            loc = where.get(tid)
            if tid in lost or loc is None:
                kids[tid] = ([], {lost[tid]} if tid in lost else set())
                continue
            try:
                nodes = await self._tree(tid, loc)
            except DRError as exc:
                log.warning("scrub: tree unreadable", extra={"tenant": self.tenant, "error": exc.message})
                kids[tid] = ([], set())
                continue
            subs = [n.subtree for n in nodes if n.kind == format.DIR]
            kids[tid] = (subs, {lost[c] for n in nodes for c in n.content if c in lost})
            stack.extend(subs)
            self._tell("walk", len(kids), len(kids) + len(stack))
        reach: dict[bytes, set[str]] = {}
        for rec in sorted(records.values(), key=lambda r: (r.time_ns, r.id)):
            for label in sorted(_reach(rec.tree, kids, reach)):
                by_label[label].breaks.append(_ref(rec))

    def _alert(self) -> None:
        for u in self.report.unrecoverable:
            log.error(
                "scrub: no site holds an intact copy",
                extra={
                    "tenant": self.tenant,
                    "object": u.object,
                    "sites": u.sites,
                    "detail": u.detail,
                    "breaks": [f"snapshot {b.id} of {b.source} at {_iso(b.time_ns)}" for b in u.breaks],
                },
            )

    async def _tree(self, tid: bytes, loc: BlobLocation) -> list[format.Node]:
        if loc.entry.btype is not BlobType.TREE:
            raise IntegrityError("blob referenced as a tree is not one", blob=tid.hex())
        raw = await self.repo.fetch(
            Handle(Kind.PACK, loc.pack),
            lambda b: self.repo.open_blob(loc, b, tid),
            loc.entry.offset,
            loc.entry.length,
        )
        return await asyncio.to_thread(format.decode_tree, raw, f"tree {tid.hex()}")


def _reach(
    root: bytes, kids: dict[bytes, tuple[list[bytes], set[str]]], memo: dict[bytes, set[str]]
) -> set[str]:
    """The lost objects a tree reaches, computed bottom-up without recursion (trees can be deep)."""
    stack: list[tuple[bytes, bool]] = [(root, False)]
    entered: set[bytes] = set()
    while stack:
        tid, expanded = stack.pop()
        subs, direct = kids.get(tid, ([], set()))
        if expanded:
            memo[tid] = direct.union(*(memo.get(s, set()) for s in subs))
        elif tid not in memo and tid not in entered:  # `entered`: a cycle cannot loop
            entered.add(tid)
            stack.append((tid, True))
            stack.extend((s, False) for s in subs)
    return memo.get(root, set())


def _iso(time_ns: int) -> str:
    if not time_ns:
        return "an unknown time"
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC).isoformat(timespec="seconds")


def _ref(rec: SnapshotRecord) -> SnapshotRef:
    return SnapshotRef(rec.id, rec.source, rec.time_ns)


def _label(layout: Layout, h: Handle) -> str:
    return layout.key(h)[len(layout.root) :] if h.kind is Kind.SNAPSHOT else str(h)


def _by_handle(o: _Obj) -> Handle:
    return o.handle


def _parse_slot(name: str, suite: crypto.Suite, data: bytes) -> dict[str, Any]:
    """A key slot's JSON, if it is well formed (its wrapped key can be checked only by opening it)."""
    import base64
    import binascii

    try:
        slot = json.loads(data)
        ok = (
            isinstance(slot, dict)
            and slot.get("id") == name
            and slot.get("kind") in ("passphrase", "keyfile")
            and slot.get("suite") == suite.value
            and len(base64.b64decode(slot["salt"], validate=True)) == 16
            and len(base64.b64decode(slot["wrapped"], validate=True))
            == crypto.NONCE_LEN + crypto.MASTER_KEY_LEN + crypto.TAG_LEN
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        ok = False
    if not ok:
        raise IntegrityError("the key slot is malformed", object=f"keys/{name}")
    return dict(slot)


def _intact_blobs(
    repo: Repository, pack: str, salt: bytes, data: bytes, entries: list[BlobEntry]
) -> set[bytes]:
    """The blobs of a damaged pack copy that still verify, located by the index (not the pack's header)."""
    out: set[bytes] = set()
    mv = memoryview(data)
    for e in entries:
        if e.offset + e.length > len(data):
            continue
        try:
            repo.open_blob(BlobLocation(pack, salt, e), mv[e.offset : e.offset + e.length], e.blob_id)
        except DRError:
            continue
        out.add(e.blob_id)
    return out


def _outbox_pending(state_dir: Path, tenant: str) -> set[tuple[str, str]]:
    """(key, site) pairs the local outbox has still to ship: missing there now is expected, not damage."""
    path = state_dir / "outbox.db"
    if not path.exists():
        return set()
    try:
        outbox = Outbox.open_readonly(path)
        try:
            out: set[tuple[str, str]] = set()
            for key, _sites in outbox.keys(tenant):
                got = outbox.acked_sites(key)
                if got is not None:
                    out.update((key, site) for site in got[1])
            return out
        finally:
            outbox.close()
    except sqlite3.Error:
        return set()


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
