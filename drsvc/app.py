"""Wiring: config -> stores, spool, repositories; the operations the CLI (and later the API) call.

Domain code lives in drsvc.core, snapshot, replicator and restore; this module only connects them and never
prints: it returns results and reports progress through callbacks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import replicator
import restore
import snapshot
from drsvc.core import retention
from drsvc.core.config import Config
from drsvc.core.crypto import ScryptParams, Suite
from drsvc.core.errors import ConfigError, DRError, ObjectLocked, RepositoryNotFound, StoreError
from drsvc.core.format import SnapshotRecord
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import (
    RepoParams,
    Repository,
    gather_limited,
    init_repository,
    read_config,
    unlock_repository,
)
from drsvc.core.retention import ForgetOutcome
from drsvc.core.segments import SegmentName
from drsvc.core.spool import Spool
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.compose import open_site
from drsvc.core.stores.metered import Observer
from restore.logplan import restorable_range, stream_of
from restore.logreplay import LogRestoreResult, restore_log
from restore.postgres import PostgresRestoreResult, read_backup_start
from restore.postgres import restorable_range as postgres_range
from snapshot import SnapshotResult, Stats

if TYPE_CHECKING:
    from snapshot.dedup import IndexCache
    from snapshot.tree import Changes


@dataclass
class SnapshotOutcome:
    result: snapshot.SnapshotResult
    protection: replicator.Protection
    reports: list[replicator.ShipReport]
    seconds: float


class App:
    def __init__(self, config: Config, workers: int | None = None, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer  # told of every request to a site (the daemon's metrics), see MeteredStore
        self._stores: dict[str, ObjectStore] = {}
        self._spool: Spool | None = None
        self._workers: snapshot.WorkerPool | None = None
        self._unlocked: dict[str, Repository] = {}
        self.worker_count = workers or os.cpu_count() or 2
        self.in_process_bytes = snapshot.LOCAL_LIMIT  # snapshot data read before the workers start
        self.pool = ThreadPoolExecutor(max_workers=self.worker_count, thread_name_prefix="data")

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for s in self._stores.values():
            await s.close()
        self._stores.clear()
        if self._spool is not None:
            self._spool.close()
        if self._workers is not None:
            self._workers.close()
        self.pool.shutdown(wait=True)

    # -- resources --------------------------------------------------------------------------------
    def store(self, site: str) -> ObjectStore:
        if site not in self.config.sites:
            raise ConfigError(f"no site {site!r}; configured: {', '.join(self.config.sites)}", key="sites")
        if site not in self._stores:
            self._stores[site] = open_site(site, self.config.sites[site], observer=self.observer)
        return self._stores[site]

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            spool = Spool(self.config.state.dir)  # the quota is applied by the daemon's intake
            try:
                spool.lock()
            except BaseException:
                spool.close()
                raise
            self._spool = spool
        return self._spool

    @property
    def open_spool(self) -> Spool | None:
        """The spool if this process has opened (and locked) it, else None: nothing is opened here."""
        return self._spool

    @property
    def workers(self) -> snapshot.WorkerPool:
        """The data worker processes, started on first use and kept for later snapshots."""
        if self._workers is None:
            self._workers = snapshot.WorkerPool(self.worker_count)
        return self._workers

    @property
    def cache_dir(self) -> Path:
        return self.config.state.dir / "cache"

    def key_material(self, tenant: str) -> tuple[str, bytes]:
        if tenant not in self.config.tenants:
            raise ConfigError(f"no tenant {tenant!r}", key="tenants")
        return self.config.tenants[tenant].key.material(tenant)

    async def open_repo(self, tenant: str, site: str | None = None) -> Repository:
        names = self.config.tenant_sites(tenant)
        if site is not None:
            names = [site, *[n for n in names if n != site]]
        stores = [self.store(n) for n in names]
        unlocked = self._unlocked.get(tenant)
        if unlocked is not None:  # the key slot was opened once (scrypt): reuse the keys, read afresh
            return Repository(tenant, unlocked.keys, unlocked.params, stores)
        kind, secret = self.key_material(tenant)
        repo = await Repository.open(tenant, stores, kind, secret)
        self._unlocked[tenant] = repo
        return Repository(tenant, repo.keys, repo.params, repo.stores)

    # -- operations -------------------------------------------------------------------------------
    async def init_tenant(self, tenant: str, scrypt: ScryptParams | None = None) -> list[str]:
        """Create the tenant's repository on every site its sources use; sites that have it are kept."""
        tc = self.config.tenants.get(tenant)
        if tc is None:
            raise ConfigError(f"no tenant {tenant!r}", key="tenants")
        sites = [self.store(n) for n in self.config.tenant_sites(tenant)]
        if not sites:
            raise ConfigError(f"no source of tenant {tenant!r} names a site", key="sources")
        kind, secret = self.key_material(tenant)
        existing = None
        for s in sites:
            try:
                keys, _params, body, slots = await unlock_repository(s, tenant, kind, secret)
                existing = (keys, body, slots)
                break
            except RepositoryNotFound:
                continue
        params = RepoParams(
            suite=Suite(tc.suite),
            chunk_min=tc.chunker.min_size,
            chunk_avg=tc.chunker.avg_size,
            chunk_max=tc.chunker.max_size,
            pack_size=tc.pack_size,
            compression_level=tc.compression_level,
        )
        await init_repository(
            sites, tenant, kind, secret, params, scrypt or ScryptParams(), existing=existing
        )
        return [s.name for s in sites]

    async def snapshot(
        self, source: str, progress: Callable[[snapshot.Stats], None] | None = None
    ) -> SnapshotOutcome:
        """Take a snapshot into the spool while shipping to every site; report its protection."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        sc = self.config.source(source)
        stores = [self.store(n) for n in sc.sites]
        done = asyncio.Event()
        limits = {n: self.config.sites[n].concurrency for n in sc.sites}
        shipping = asyncio.ensure_future(replicator.replicate(self.spool, stores, limits, done=done))
        try:
            result = await self.snapshot_to_spool(source, progress)
        except BaseException:
            shipping.cancel()  # the backlog stays in the spool for the next run
            await asyncio.gather(shipping, return_exceptions=True)
            raise
        finally:
            done.set()
        reports = await shipping
        prot = await asyncio.to_thread(replicator.protection, self.spool, result.key, sc.sites, sc.min_copies)
        return SnapshotOutcome(result, prot, reports, loop.time() - started)

    async def snapshot_to_spool(
        self,
        source: str,
        progress: Callable[[Stats], None] | None = None,
        *,
        changes: Callable[[], Changes | None] | None = None,
        index_cache: IndexCache | None = None,
        full: bool = False,
    ) -> SnapshotResult:
        """Take a snapshot into the spool only; the daemon's shippers move it to the sites. A tree source's
        `changes`, `index_cache` and `full`: see ``snapshot.take_snapshot`` (the daemon's watched trees)."""
        sc = self.config.source(source)
        if sc.type == "postgres":  # a base backup (drsvc.wal imports this module: imported here)
            from drsvc.wal import take_base_backup

            return await take_base_backup(self, source, progress)
        if sc.type == "log":
            raise ConfigError(
                f"source {source!r} is a log source: it is streamed, not snapshotted like a tree",
                key=f"sources.{source}.type",
                hint="the daemon (drsvc run) streams a log source and takes its checkpoints",
            )
        repo = await self.open_repo(sc.tenant)
        stores = [self.store(n) for n in sc.sites]
        return await snapshot.take_snapshot(
            source,
            sc,
            repo,
            self.spool,
            stores,
            self.cache_dir,
            self.pool,
            self.workers,
            progress,
            self.in_process_bytes,
            changes=changes,
            index_cache=index_cache,
            full=full,
        )

    async def snapshots(
        self, source: str, site: str | None = None
    ) -> tuple[list[SnapshotRecord], dict[str, set[str]]]:
        """The source's snapshots, and for each snapshot id the sites holding its record."""
        sc = self.config.source(source)
        repo = await self.open_repo(sc.tenant, site)
        records = await repo.snapshots(source)
        holders: dict[str, set[str]] = {r.id: set() for r in records}
        tag = repo.keys.source_tag(source)

        for name in sc.sites:
            try:
                for h in await repo.list_handles(Kind.SNAPSHOT, tag, store=self.store(name)):
                    holders.setdefault(h.name, set()).add(name)
            except Exception:  # an unreachable site holds nothing we can show
                continue
        return records, holders

    async def restorable_range(self, source: str, site: str | None = None) -> tuple[int, int] | None:
        """The earliest and latest points (ns) `source` can be restored to, or None: for a tree source its
        oldest and newest snapshots; for a log source its oldest checkpoint (or stream start) to its newest
        change-log event; for a postgres source its oldest base backup to the end of its contiguous WAL."""
        sc = self.config.source(source)
        repo = await self.open_repo(sc.tenant, site)
        if sc.type == "log":
            r = await restorable_range(repo, source)
            return None if r is None else (r.earliest_ns, r.latest_ns)
        if sc.type == "postgres":
            return await postgres_range(repo, source)
        records = await repo.snapshots(source)
        return (records[0].time_ns, records[-1].time_ns) if records else None

    async def forget(self, source: str, dry_run: bool = False) -> ForgetOutcome:
        """Apply the source's retention policy: delete each forgotten snapshot record at each site holding it.

        Only snapshot records are deleted; the packs and indexes they reference stay until prune. A site that
        cannot be listed (or fails a deletion) is reported in the outcome, not raised: the deletions reach it
        when forget runs again after it is back.
        """
        sc = self.config.source(source)
        if sc.retention is None:
            raise ConfigError(
                f"source {source!r} has no retention policy",
                key=f"sources.{source}.retention",
                hint=f"add a [sources.{source}.retention] table, e.g. keep_daily = 7, keep_min = 3",
            )
        repo = await self.open_repo(sc.tenant)
        tag = repo.keys.source_tag(source)
        holders: dict[str, set[str]] = {}
        unreachable: dict[str, str] = {}
        for name in sc.sites:
            try:
                for h in await repo.list_handles(Kind.SNAPSHOT, tag, store=self.store(name)):
                    holders.setdefault(h.name, set()).add(name)
            except StoreError as exc:
                unreachable[name] = exc.message

        async def read(name: str) -> SnapshotRecord:
            order = [s for s in sc.sites if s in holders[name]]
            return await repo.fetch(
                Handle(Kind.SNAPSHOT, name, tag),
                lambda b: repo.decode_snapshot(name, b, source),
                stores=[self.store(s) for s in order],
            )

        records = await gather_limited(16, [functools.partial(read, n) for n in sorted(holders)])
        result = retention.plan(records, sc.retention.policy(), time.time_ns())
        deleted: dict[str, set[str]] = {}
        locked: dict[str, dict[str, str]] = {}

        async def delete_at(site: str) -> None:
            store = self.store(site)
            for rec in result.forget:
                if site not in holders.get(rec.id, ()):
                    continue
                try:
                    await store.delete(repo.layout.key(Handle(Kind.SNAPSHOT, rec.id, tag)))
                except ObjectLocked as exc:  # retention not over: a later run deletes it
                    locked.setdefault(rec.id, {})[site] = exc.until or "?"
                    continue
                except StoreError as exc:
                    unreachable[site] = exc.message
                    return
                deleted.setdefault(rec.id, set()).add(site)

        if not dry_run:
            await asyncio.gather(*(delete_at(s) for s in sc.sites if s not in unreachable))
        outcome = ForgetOutcome(source, result, sc.sites, holders, deleted, unreachable, dry_run, locked)
        if sc.type == "log" and result.forget:
            await self._forget_segments(repo, source, [r for r, _ in result.keep], outcome)
        if sc.type == "postgres" and result.forget and result.keep:
            await self._forget_wal(repo, source, min(r.time_ns for r, _ in result.keep), result, outcome)
        return outcome

    async def _forget_wal(
        self,
        repo: Repository,
        source: str,
        oldest_ns: int,
        result: retention.RetentionPlan,
        outcome: ForgetOutcome,
    ) -> None:
        """A postgres source's archived WAL goes with the base backups that needed it: a WAL segment (or
        backup history file) before the oldest kept base backup's start is deleted at every site. Timeline
        history files stay (they are tiny, and recovery reads them)."""
        oldest = next(r for r, _ in result.keep if r.time_ns == oldest_ns)
        start = (await read_backup_start(repo, oldest)).file
        outcome.wal_forgotten += await self._delete_at_sites(
            repo,
            source,
            Kind.WAL,
            lambda name: not name.endswith(".history") and name[:24] < start,
            outcome,
        )

    async def _forget_segments(
        self, repo: Repository, source: str, kept: list[SnapshotRecord], outcome: ForgetOutcome
    ) -> None:
        """A log source's change-log segments go with the checkpoint their stream starts from: a segment whose
        stream no kept checkpoint starts, and which is older than the newest kept checkpoint (so never the
        stream being written, whose checkpoint may still be on its way), is deleted at every site."""
        kept_streams = {stream_of(r) for r in kept if "log_stream" in r.stats}
        newest = max((r.time_ns for r in kept if "log_stream" in r.stats), default=0)

        def goes(name: str) -> bool:
            try:
                parsed = SegmentName.parse(name)
            except DRError:
                return False  # not a segment name: scrub reports it
            return parsed.stream not in kept_streams and parsed.first_ns < newest

        outcome.segments_forgotten += await self._delete_at_sites(repo, source, Kind.SEGMENT, goes, outcome)

    async def _delete_at_sites(
        self,
        repo: Repository,
        source: str,
        kind: Kind,
        goes: Callable[[str], bool],
        outcome: ForgetOutcome,
    ) -> int:
        """Delete the source's objects of `kind` whose name `goes` at every site of the source (only count
        them on a dry run); how many copies. A copy object lock keeps is counted in segments_locked; a site
        that fails is added to the outcome's unreachable sites."""
        sc = self.config.source(source)
        tag = repo.keys.source_tag(source)
        n = 0
        for site in sc.sites:
            if site in outcome.unreachable:
                continue
            store = self.store(site)
            try:
                handles = await repo.list_handles(kind, tag, store=store)
            except StoreError as exc:
                outcome.unreachable[site] = exc.message
                continue
            for h in handles:
                if not goes(h.name):
                    continue
                n += 1
                if outcome.dry_run:
                    continue
                try:
                    await store.delete(repo.layout.key(h))
                except ObjectLocked:
                    outcome.segments_locked += 1
                except StoreError as exc:
                    outcome.unreachable[site] = exc.message
                    break
        return n

    async def restore(
        self,
        source: str,
        target: Path,
        at_ns: int | None,
        site: str | None = None,
        progress: Callable[[restore.Progress], None] | None = None,
        *,
        isolate: bool = False,
    ) -> restore.RestoreResult | LogRestoreResult | PostgresRestoreResult:
        """Restore `source` as it was at `at_ns` (None: latest): a tree source from its newest snapshot at or
        before that time; a log source from its newest checkpoint plus the change-log segments up to it; a
        postgres source as its newest base backup before that time, set to recover to it from the WAL.
        `site` is read first and the others only on failure; with `isolate`, `site` alone (a drill's
        simulated loss of the other sites). The target must lie inside ``[restore] roots`` when set."""
        sc = self.config.source(source)
        self.config.restore.check_target(target)
        if isolate and site is None:
            raise ConfigError("an isolated restore needs a site", key="site")
        if sc.type == "postgres":
            from drsvc.wal import restore_postgres

            return await restore_postgres(
                self, source, target, at_ns, site, progress=progress, isolate=isolate
            )
        if site is not None and site not in sc.sites:
            raise ConfigError(
                f"site {site!r} is not in the copy policy of source {source!r}", key=f"sources.{source}.sites"
            )
        repo = await self.open_repo(sc.tenant, site)
        if site is not None:
            others = [] if isolate else [self.store(n) for n in sc.sites if n != site]
            repo.stores = [self.store(site), *others]
        if sc.type == "log":
            return await restore_log(repo, source, target, at_ns, progress)
        return await restore.restore_tree(repo, source, target, at_ns, progress)

    async def repo_config(self, tenant: str, site: str) -> dict[str, object]:
        body, _ = await read_config(self.store(site), tenant)
        return body
