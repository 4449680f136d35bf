"""One scrub run's state, and the reading, verifying and repairing of one object at every site.

The phases (``inventory``, ``keys``, ``records``, ``indexes``, ``packs``, ``changelog``, ``evidence``,
``breaks``) are functions of a `Scrub`: they fill its objects, set where each belongs (`Scrub.expect`), read
copies (`Scrub.read`) and write verified bytes where a copy is missing or bad (`Scrub.repair_copies`);
findings go to its report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from drsvc.app import App
from drsvc.check import verify_evidence, verify_pack
from drsvc.core.errors import DRError, ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.format import BlobEntry
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.repository import Repository
from drsvc.core.retention import RetentionPlan
from drsvc.core.stores import ObjectStore
from drsvc.metrics import Metrics
from drsvc.scrub.report import DAMAGE, Finding, FindingKind, ScrubProgress, ScrubReport, Unrecoverable
from drsvc.scrub.state import selected
from drsvc.scrub.verify import decode_record, parse_slot, verify_config, verify_segment, verify_wal

log = logging.getLogger("drsvc.scrub")

T = TypeVar("T")
PACKS_AT_ONCE = 4  # packs being read and verified at a time (each holds up to two copies in memory)
SMALL_AT_ONCE = 16  # records, indexes, key slots


@dataclass
class ScrubObject:
    """One object of the tenant, and its copies at the sites."""

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
class IndexedPack:
    """A pack as the indexes present anywhere describe it, and the sites those indexes belong to."""

    salt: bytes
    entries: dict[bytes, BlobEntry] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)


def label(layout: Layout, h: Handle) -> str:
    """How the report names an object: per-source objects with their tag (``logs/<tag>/<name>``)."""
    return layout.key(h)[len(layout.root) :] if h.source_tag else str(h)


def _by_handle(o: ScrubObject) -> Handle:
    return o.handle


class Scrub:
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
        self.objects: dict[Handle, ScrubObject] = {}
        self.in_flight: set[tuple[str, str]] = set()  # (key, site) the local outbox has still to ship
        self.markers: dict[str, list[bytes]] = {}  # prune marker -> its copies, as read while listing
        self.condemned: set[str] = set()  # packs a prune condemned: deleted by a later prune run
        self.recheck: set[str] = set()  # objects the last run left damaged: read in full again
        self.report = ScrubReport(
            tenant, time.time(), read_share=share, repair=repair, sites=list(self.site_order)
        )
        self.repo: Repository
        self.tags: dict[str, str] = {}  # source tag -> name, of the tenant's configured sources
        self.plans: dict[str, RetentionPlan] = {}  # source -> what its retention policy keeps now
        self.pack_entries: dict[str, IndexedPack] = {}

    def of_kind(self, kind: Kind) -> list[ScrubObject]:
        """The objects of one kind, in the order of their handles."""
        return sorted((o for o in self.objects.values() if o.handle.kind is kind), key=_by_handle)

    # -- findings ------------------------------------------------------------------------------------

    def find(self, site: str, kind: FindingKind, obj: str, detail: str = "") -> Finding:
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

    def unreachable(self, site: str, exc: StoreError) -> None:
        if self.stores.pop(site, None) is not None or site not in self.report.unreachable:
            self.find(site, FindingKind.UNREACHABLE, "", exc.message)

    def count_read(self, data: bytes) -> None:
        self.report.copies_read += 1
        self.report.bytes_verified += len(data)
        if self.metrics is not None:
            self.metrics.scrub_verified(self.tenant, len(data))

    def tell(self, phase: str, done: int, total: int, obj: str = "", read: tuple[str, ...] = ()) -> None:
        if self.progress is not None:
            self.progress(ScrubProgress(phase, done, total, obj, read))

    def lost(self, o: ScrubObject, detail: str) -> Unrecoverable | None:
        """Record `o` as unrecoverable, unless a copy went unread (its site stopped answering)."""
        if o.good is not None or any(s not in o.failed for s in o.sizes):
            return None
        if self.report.unreachable:
            detail += f"; not consulted (unreachable): {', '.join(sorted(self.report.unreachable))}"
        u = Unrecoverable(o.label, detail, sorted(o.sizes, key=self.site_order.index))
        self.report.unrecoverable.append(u)
        return u

    # -- reading and repairing one object ---------------------------------------------------------------

    def every(self, o: ScrubObject) -> bool:
        """Read every copy: the object is in this run's window, its copies differ in size, or the last run
        left it damaged."""
        return (
            selected(o.handle.name, self.cursor, self.share)
            or len(set(o.sizes.values())) > 1
            or o.label in self.recheck
        )

    def expect(self, o: ScrubObject, sites: set[str]) -> None:
        """Set where `o` belongs; a reachable site lacking it is missing, unless it is on its way there."""
        o.expected = sites
        for site in self.site_order:
            if site not in sites or site not in self.stores or site in o.sizes or site in o.targets:
                continue
            if (o.key, site) in self.in_flight:
                self.report.in_flight += 1
                continue
            o.targets[site] = self.find(site, FindingKind.MISSING, o.label)

    async def read(
        self,
        o: ScrubObject,
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
                    o.targets[site] = self.find(site, FindingKind.MISSING, o.label, "gone since listed")
                continue
            except StoreError as exc:
                self.unreachable(site, exc)
                continue
            read.append(site)
            self.count_read(data)
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
                    o.targets[site] = self.find(site, FindingKind.SIZE, o.label, why)
                else:
                    o.targets[site] = self.find(site, FindingKind.CORRUPT, o.label, why)
            elif o.good is not None and site in o.sizes and o.sizes[site] != o.good_size:
                why = f"{o.sizes[site]} bytes, an intact copy has {o.good_size}"
                o.targets[site] = self.find(site, FindingKind.SIZE, o.label, why)
        o.failed.update(failed)
        o.read = tuple(read)
        return found

    async def repair_copies(self, o: ScrubObject, data: bytes | None) -> None:
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
                await asyncio.to_thread(self.verifier(o), data)
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

    def verifier(self, o: ScrubObject) -> Callable[[bytes], object]:
        kind, name = o.handle.kind, o.handle.name
        if kind is Kind.CONFIG:
            return self.verify_config
        if kind is Kind.KEY:
            return lambda b: parse_slot(name, self.repo.keys.suite, b)
        if kind is Kind.SNAPSHOT:
            return lambda b: decode_record(self.repo, o.handle, b)
        if kind is Kind.INDEX:
            return lambda b: self.repo.decode_index(name, b)
        if kind is Kind.SEGMENT:
            return lambda b: verify_segment(self.repo, o.handle, b)
        if kind is Kind.WAL:
            return lambda b: verify_wal(self.repo, o.handle, b, self.tags.get(o.handle.source_tag))
        if kind in (Kind.AUDIT, Kind.DRILL):
            return lambda b: verify_evidence(self.repo.keys, o.handle, b)
        entries = list(self.pack_entries[name].entries.values())
        return lambda b: verify_pack(self.repo, name, b, entries)

    def verify_config(self, data: bytes) -> None:
        verify_config(self.repo, self.tenant, data)
