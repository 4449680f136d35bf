"""The daemon's supervisor: per source a scheduler, per site a shipper loop; protection and live RPO.

1. ``start()``: one ``SiteLoop`` per site that any source uses. It ships that site's backlog from the spool
   (``replicator.Shipper``), wakes on every spooled object, and after a failure backs off (1 s doubling to
   60 s) and tries again, so a site that comes back catches up from the spool.
2. One scheduler per source takes a snapshot when ``interval`` has passed since its last one (one snapshot
   at a time per daemon: they share the worker processes). The snapshot goes into the spool; its record is
   tracked until ``min_copies`` sites hold it.
3. ``tick()`` (every ``daemon.tick`` seconds; ``run_once()`` for tests): tracked records that reached
   ``min_copies`` advance the source's ``protected_until`` (persisted in the outbox's meta table), then the
   metrics (RPO, backlog, spool) and the status line are refreshed and watchdog progress is reported.
4. ``stop(timeout)``: stop intake (schedulers), let the site loops finish their uploads until the deadline,
   cancel what is left. Everything unshipped stays in the spool for the next start.
5. Maintenance (its own task, so a long scrub never delays a snapshot): per tenant, retention at most
   hourly (in the scheduler), prune every ``prune.interval`` and scrub every ``scrub.interval`` when set, one
   run at a time, so a tenant is never pruned and scrubbed at once. A failed run is logged and counted, and
   retried at the next interval; cancelling one at stop loses nothing (both are safe to interrupt).
6. ``request_snapshot(source)`` (the API's "snapshot now") makes the source due at once, after the snapshot
   running (if any), whatever its schedule or a recent failure's back-off.
7. ``source_status(source)`` and ``sites`` are what the API (``drsvc.daemon_api.DaemonApi``, which outlives
   config reloads) reads of the Supervisor running now.

Modules: ``site_loop`` (one site's shipper loop, request metrics), ``daemon_api`` (the API's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import replicator
from drsvc import scrub
from drsvc.api.view import SourceStatus
from drsvc.app import App
from drsvc.core.errors import DRError
from drsvc.core.layout import Kind
from drsvc.core.stores.metered import Observer
from drsvc.daemon_api import DaemonApi, tls_context
from drsvc.metrics import Metrics, Outcome
from drsvc.prune import prune_tenant
from drsvc.site_loop import IDLE_POLL, SiteLoop, observe, request_observer
from drsvc.watch import TreeWatcher
from snapshot.dedup import MAX_AGE, IndexCache
from snapshot.logtail import LogStreamer, SpooledSegment
from snapshot.tree import Changes
from snapshot.wal import sweep_markers

# DaemonApi and tls_context live in drsvc.daemon_api; still importable from here (tests/test_api_schema.py)
__all__ = ["WATCH_FALLBACK", "DaemonApi", "SiteLoop", "SourceState", "Supervisor", "Tracked", "tls_context"]

log = logging.getLogger("drsvc.supervisor")

FAILED_RETRY = 300.0
RETENTION_EVERY = 3600.0  # sources with a retention policy: apply it at most this often
MAINTENANCE_POLL = 30.0  # how often the maintenance task looks whether a prune or scrub is due
DEBOUNCE = 0.5  # watched trees: snapshot once changes have been quiet this long ...
WATCH_MAX_DELAY = 3.0  # ... or this long after the first change, whichever comes first
WATCH_FALLBACK = 60.0  # a watched tree that inotify cannot cover is scanned this often
WAL_POLL = 0.5  # postgres sources: how often the incoming directory is looked at
PROTECT_COALESCE = 0.005  # after acknowledgements: protection is looked at again at most this often


def _mtimes(where: Path) -> dict[str, int]:
    """WAL files waiting in an incoming directory, by name: their mtimes (ns)."""
    out = {}
    try:
        entries = list(os.scandir(where))
    except FileNotFoundError:
        return {}
    for e in entries:
        if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            out[e.name] = e.stat(follow_symlinks=False).st_mtime_ns
    return out


@dataclass
class Tracked:
    """A snapshot record waiting for min_copies sites."""

    source: str
    key: str
    time_ns: int
    sites: tuple[str, ...] = ()  # the sites it was spooled for (a reload may change the policy since)


@dataclass
class SourceState:
    tenant: str
    last_snapshot: float = 0.0  # wall-clock seconds of the last finished snapshot (its scan start)
    protected_until: float = 0.0  # wall-clock seconds: every change up to here is at >= min_copies sites
    last_error: str | None = None
    running: bool = False
    not_before: float = 0.0  # after a failed snapshot: no new attempt before this
    last_retention: float = 0.0
    # watched tree sources: the first and the latest change not yet covered by a snapshot (0: none)
    changed_first: float = 0.0
    changed_last: float = 0.0
    snapshot_ended: float = 0.0  # wall-clock seconds the last snapshot attempt ended
    watch_failed: str | None = None  # why inotify could not cover the tree: it is scanned instead
    requested: bool = False  # "snapshot now" (the API): due at once, whatever the schedule


@dataclass
class Supervisor:
    app: App
    metrics: Metrics
    on_progress: Callable[[], None] | None = None
    on_status: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.time
    sources: dict[str, SourceState] = field(default_factory=dict)
    sites: dict[str, SiteLoop] = field(default_factory=dict)
    tracked: list[Tracked] = field(default_factory=list)
    paused: bool = False  # intake paused: the spool is over its quota
    spool_used: int = 0  # bytes in the spool at the last tick

    def __post_init__(self) -> None:
        cfg = self.app.config
        outbox = self.app.spool.outbox
        for name, sc in cfg.sources.items():
            st = SourceState(sc.tenant)
            st.last_snapshot = float(outbox.get_meta(f"last_snapshot:{name}") or 0)
            st.protected_until = float(outbox.get_meta(f"protected_until:{name}") or 0)
            self.sources[name] = st
            if st.protected_until:
                self.metrics.source_protected(sc.tenant, name, st.protected_until)
        self.tracked = [
            Tracked(t["source"], t["key"], t["time_ns"], tuple(t.get("sites", ())))
            for t in json.loads(outbox.get_meta("tracked") or "[]")
            if t["source"] in cfg.sources
        ]
        names = list(dict.fromkeys(s for sc in cfg.sources.values() for s in sc.sites))
        stores = {n: self.app.store(n) for n in names}
        self._acked = asyncio.Event()  # a site acknowledged an object: protection may have advanced
        self._protect_task: asyncio.Task[None] | None = None
        self._protecting = asyncio.Lock()
        for n in names:
            self.sites[n] = SiteLoop(stores[n], self.app, [stores[p] for p in names if p != n], self.metrics)
            self.sites[n].shipper.on_ack = self._acked.set
        self.spool_used = self.app.spool.used_bytes()
        self.metrics.spool(self.spool_used, cfg.state.spool_quota)
        self._stop = asyncio.Event()
        self._intake = asyncio.Event()  # set: schedulers stop taking snapshots
        self._snapshot_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._site_tasks: list[asyncio.Task[None]] = []
        self._maintenance: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a watcher saw a change: the scheduler looks again
        self._watchers: list[TreeWatcher] = []
        self._watcher_of: dict[str, TreeWatcher] = {}  # watched tree sources: their watcher
        # watched tree sources: the tenant's dedup index between snapshots (listed again by the periodic
        # rescans, and when prune markers appear; checked more often than prune's grace period)
        self._index_cache = IndexCache(max_age=min(MAX_AGE, cfg.prune.grace / 2))
        self.streamers: dict[str, LogStreamer] = {}  # log sources: the tailer of each
        self._stream_tasks: list[asyncio.Task[None]] = []
        self._stop_streams = asyncio.Event()
        self._newest_change: dict[str, float] = {}  # log sources: the newest change spooled (wall seconds)

    # -- requests to the sites (MeteredStore under each site's retries) ------------------------------
    def observe(self, site: str, op: str, seconds: float, error: str | None) -> None:
        """One request (one attempt) to a site: its latency, and its failure kind if it failed."""
        observe(self.metrics, site, op, seconds, error)

    @staticmethod
    def request_observer(metrics: Metrics) -> Observer:
        """``observe`` for an App built before its Supervisor: ``App(config, observer=...)``."""
        return request_observer(metrics)

    # -- one step, for tests and for the loop -----------------------------------------------------
    def due(self, now: float) -> list[str]:
        """Sources whose interval has passed, unless the spool is over its quota: then intake pauses (the
        backlog stays; nothing is dropped) until the shippers have freed space."""
        if self.spool_full():
            if not self.paused:
                log.warning(
                    "spool over quota: intake paused until the sites take the backlog",
                    extra={"used": self.spool_used, "quota": self.app.config.state.spool_quota},
                )
            self.paused = True
            return []
        if self.paused:
            log.info("spool below quota: intake resumed")
        self.paused = False
        return [
            n
            for n, st in self.sources.items()
            if not st.running and (st.requested or (now >= st.not_before and now >= self.next_due(n, st)))
        ]

    def source_status(self, source: str) -> SourceStatus | None:
        """What the API shows of a source (None: not one this supervisor runs)."""
        st = self.sources.get(source)
        if st is None:
            return None
        return SourceStatus(
            st.last_snapshot or None, st.protected_until or None, st.last_error, st.running, st.requested
        )

    def request_snapshot(self, source: str) -> SourceState:
        """Make `source` due now (taken after the snapshot running, if any); the scheduler wakes up."""
        st = self.sources[source]
        st.requested = True
        self._wake.set()
        return st

    def next_due(self, name: str, st: SourceState) -> float:
        """When the source's next snapshot is due: its schedule, or for a watched tree a change settled
        (DEBOUNCE quiet, at most WATCH_MAX_DELAY after the first change; at once if the tree had been quiet
        for DEBOUNCE since the last snapshot: a burst then goes into the next one), or WATCH_FALLBACK
        scanning when inotify cannot cover it."""
        sc = self.app.config.sources[name]
        if sc.type == "log":
            return math.inf  # streamed by its LogStreamer, which also takes its checkpoints
        due = sc.next_due(st.last_snapshot)
        if sc.watch:
            if st.watch_failed is not None:
                due = min(due, st.last_snapshot + WATCH_FALLBACK)
            if st.changed_last and st.changed_first - st.snapshot_ended >= DEBOUNCE:
                due = min(due, st.changed_first)
            elif st.changed_last:
                due = min(due, st.changed_last + DEBOUNCE, st.changed_first + WATCH_MAX_DELAY)
        return due

    def changed(self, source: str) -> None:
        """A watcher saw a change under the source (called on the event loop)."""
        st = self.sources.get(source)
        if st is None:
            return
        now = self.clock()
        st.changed_first = st.changed_first or now
        st.changed_last = now
        self._wake.set()

    def spool_full(self) -> bool:
        """From the use measured by the last tick (no SQLite on the event loop)."""
        quota = self.app.config.state.spool_quota
        return quota > 0 and self.spool_used >= quota

    async def snapshot(self, source: str) -> None:
        """Take one snapshot of `source` into the spool and track its record. A watched tree's snapshot
        lists only what its watcher saw change, unless it is the periodic full rescan (its ``interval``),
        asked for ("snapshot now"), or the watcher cannot vouch for the changes."""
        st = self.sources[source]
        async with self._snapshot_lock:
            watcher = self._watcher_of.get(source)
            kw: dict[str, object] = {}
            taken: list[Changes | None] = []
            if watcher is not None:
                full = (
                    st.requested
                    or watcher.failed is not None
                    or self.clock() >= self.app.config.sources[source].next_due(st.last_snapshot)
                )

                def changes() -> Changes | None:
                    taken.append(watcher.take())
                    return taken[-1]

                kw = {"changes": changes, "index_cache": self._index_cache, "full": full}
            st.running, st.requested = True, False
            began = time.monotonic()
            started = self.clock()  # changes seen before this are in the snapshot; later ones are not
            try:
                result = await self.app.snapshot_to_spool(source, **kw)  # type: ignore[arg-type]
            except Exception as exc:  # one source failing never stops the daemon; the next interval retries
                if watcher is not None and taken:
                    watcher.put_back(taken[0])  # the next snapshot covers them
                st.last_error = str(exc)
                self.metrics.source_snapshot(st.tenant, source, "failed", time.monotonic() - began, 0)
                log.error(
                    "snapshot failed",
                    extra={"source": source, "error": str(exc)},
                    exc_info=not isinstance(exc, DRError),
                )
                st.not_before = self.clock() + FAILED_RETRY  # retry soon, not a whole interval (or day) later
                return
            finally:
                st.running, st.snapshot_ended = False, self.clock()
        rec = result.record
        st.last_snapshot, st.last_error = rec.time_ns / 1e9, None
        if st.changed_last and st.changed_last < started:
            st.changed_first = st.changed_last = 0.0
        elif st.changed_last:
            st.changed_first = started
        outcome: Outcome = "partial" if rec.partial else "ok"
        self.metrics.source_snapshot(st.tenant, source, outcome, time.monotonic() - began, rec.time_ns / 1e9)
        self.tracked.append(
            Tracked(source, result.key, rec.time_ns, tuple(self.app.config.sources[source].sites))
        )
        outbox = self.app.spool.outbox
        await asyncio.to_thread(outbox.set_meta, f"last_snapshot:{source}", repr(st.last_snapshot))
        await asyncio.to_thread(self._save_tracked)
        log.info(
            "snapshot taken",
            extra={
                "source": source,
                "snapshot": rec.id,
                "files": result.stats.files,
                "stored_bytes": result.stats.bytes_stored,
                "partial": rec.partial,
            },
        )

    def _save_tracked(self) -> None:
        self.app.spool.outbox.set_meta("tracked", json.dumps([t.__dict__ for t in self.tracked]))

    async def tick(self) -> None:
        """Protection, metrics, status line, watchdog progress."""
        cfg = self.app.config
        spool = self.app.spool
        await self.update_protection()
        now = self.clock()
        self.metrics.update_rpo(now)
        for name in self.sites:
            b = await asyncio.to_thread(spool.outbox.backlog, name)
            self.metrics.site_backlog(name, b.objects, b.bytes, (now - b.oldest) if b.oldest else 0.0)
        self.spool_used = await asyncio.to_thread(spool.used_bytes)
        self.metrics.spool(self.spool_used, cfg.state.spool_quota)
        if self.on_status:
            self.on_status(self.status_line(now) + ("; SPOOL FULL, intake paused" if self.paused else ""))
        tasks = self._tasks + self._site_tasks + self._stream_tasks
        tasks += [self._maintenance] if self._maintenance else []
        dead = [t.get_name() for t in tasks if t.done()]
        if dead and not self._intake.is_set():  # a loop died: stop proving liveness, so systemd restarts us
            log.error("supervisor task ended unexpectedly; watchdog pings stop", extra={"tasks": dead})
        elif self.on_progress:
            self.on_progress()

    async def update_protection(self) -> None:
        """Advance protected_until for what reached min_copies sites: tracked entries in order per source
        (a later one waits behind an earlier one still short of copies), and an idle log up to its tailer's
        caught-up time once nothing of it is left to ship. Run by every tick and after acknowledgements."""
        async with self._protecting:
            cfg = self.app.config
            caught_up = {name: s.caught_up_ns / 1e9 for name, s in self.streamers.items()}  # read first
            done: set[int] = set()
            waiting: set[str] = set()  # sources with an unprotected entry: later ones wait behind it
            for t in list(self.tracked):
                sc = cfg.sources.get(t.source)
                if sc is None or t.source in waiting:
                    continue
                p = await asyncio.to_thread(
                    replicator.protection, self.app.spool, t.key, sc.sites, sc.min_copies, t.sites or sc.sites
                )
                if not p.protected:
                    waiting.add(t.source)
                    continue
                done.add(id(t))
                await self._protected(t.source, t.time_ns / 1e9)
            for name, until in caught_up.items():
                if (
                    name not in waiting
                    and until
                    and not await asyncio.to_thread(self._segments_pending, name)
                ):
                    await self._protected(name, until)
            if done:  # entries tracked meanwhile (a streamer's thread) stay: filter, do not replace
                self.tracked = [t for t in self.tracked if id(t) not in done]
                await asyncio.to_thread(self._save_tracked)
            for name in self.streamers:
                st = self.sources[name]
                newest = self._newest_change.get(name, 0.0)
                self.metrics.log_lag(
                    st.tenant, name, max(0.0, newest - st.protected_until) if newest else 0.0
                )

    async def _protect_on_ack(self) -> None:
        """Protection as soon as a site acknowledges something, not only at the next tick: the lag of a
        change log is then the shipping time, not the tick."""
        while not self._stop.is_set():
            waiter = asyncio.ensure_future(self._acked.wait())
            stopper = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({waiter, stopper}, return_when="FIRST_COMPLETED")
            for f in (waiter, stopper):
                f.cancel()
            self._acked.clear()
            if self.tracked or self.streamers:
                try:
                    await self.update_protection()
                except Exception:
                    log.exception("protection update failed")
            await asyncio.sleep(PROTECT_COALESCE)  # acks in a burst: one update

    async def _protected(self, source: str, until: float) -> None:
        """Every change of `source` up to `until` (wall seconds) is at min_copies sites."""
        st = self.sources[source]
        if until > st.protected_until:
            st.protected_until = until
            self.metrics.source_protected(st.tenant, source, until)
            await asyncio.to_thread(self.app.spool.outbox.set_meta, f"protected_until:{source}", repr(until))

    def _segments_pending(self, source: str) -> bool:
        """Whether this host's outbox still holds change-log segments of `source` for some site."""
        s = self.streamers[source]
        return bool(self.app.spool.outbox.keys(s.repo.tenant, s.repo.layout.prefix(Kind.SEGMENT, s.tag)))

    def _segment_spooled(self, seg: SpooledSegment) -> None:
        """From a LogStreamer's cutting thread: track the segment until min_copies sites hold it."""
        self._loop.call_soon_threadsafe(self._track_segment, seg)

    def _track_segment(self, seg: SpooledSegment) -> None:
        sc = self.app.config.sources.get(seg.source)
        if sc is None:
            return
        self.tracked.append(Tracked(seg.source, seg.key, seg.covers_ns, tuple(sc.sites)))
        self._newest_change[seg.source] = max(self._newest_change.get(seg.source, 0.0), seg.last_ns / 1e9)
        self.metrics.log_segment(self.sources[seg.source].tenant, seg.source, seg.size)

    async def start_wal_ingest(self) -> None:
        """One task per postgres source: spool the WAL files wal-push leaves in its incoming directory."""
        for name, sc in self.app.config.sources.items():
            if sc.type == "postgres":
                self._stream_tasks.append(asyncio.create_task(self._ingest_loop(name), name=f"wal:{name}"))

    async def _ingest_loop(self, source: str) -> None:
        from drsvc.wal import incoming, ingest_wal  # drsvc.wal imports the app: here, not at the top

        where = incoming(self.app, source)
        swept = 0.0
        while not self._stop_streams.is_set():
            try:
                await self.ingest_once(source, where, ingest_wal)
                if time.monotonic() - swept > 3600:
                    swept = time.monotonic()
                    await asyncio.to_thread(sweep_markers, where)
            except Exception as exc:  # logged; the files stay in incoming, durable, for the next pass
                log.error("WAL ingest failed", extra={"source": source, "error": str(exc)})
            try:
                await asyncio.wait_for(self._stop_streams.wait(), WAL_POLL)
            except TimeoutError:
                pass
        with contextlib.suppress(Exception):  # what wal-push left until the stop goes into the spool
            await self.ingest_once(source, where, ingest_wal)

    async def ingest_once(
        self, source: str, where: Path, ingest: Callable[[App, str], Awaitable[list[str]]]
    ) -> None:
        """Spool the waiting WAL files and track each until min_copies sites hold it; a file's time is its
        mtime (PostgreSQL wrote no record in it later)."""
        times = await asyncio.to_thread(_mtimes, where)
        sc = self.app.config.sources[source]
        self.metrics.wal_backlog(sc.tenant, source, len(times))
        if not times:
            return
        for key in await ingest(self.app, source):
            t = times.get(key.rsplit("/", 1)[-1])
            if t is not None:
                self.tracked.append(Tracked(source, key, t, tuple(sc.sites)))
        await asyncio.to_thread(self._save_tracked)
        self.metrics.wal_backlog(sc.tenant, source, len(await asyncio.to_thread(_mtimes, where)))

    async def start_streamers(self) -> None:
        """One LogStreamer per log source, each in a task of its own until ``stop``."""
        for name, sc in self.app.config.sources.items():
            if sc.type != "log":
                continue
            repo = await self.app.open_repo(sc.tenant)
            streamer = LogStreamer(
                name,
                sc,
                repo,
                self.app.spool,
                self.app.config.state.dir,
                on_segment=self._segment_spooled,
                executor=self.app.pool,
                checkpoint_stores=[self.app.store(n) for n in sc.sites],
                cache_dir=self.app.cache_dir,
            )
            self.streamers[name] = streamer
            self._stream_tasks.append(
                asyncio.create_task(streamer.run(self._stop_streams), name=f"log:{name}")
            )

    def status_line(self, now: float) -> str:
        up = sum(1 for s in self.sites.values() if s.up)
        worst = max((now - st.protected_until for st in self.sources.values()), default=0.0)
        rpo = (
            "never protected"
            if any(st.protected_until == 0 for st in self.sources.values())
            else f"{worst:.0f}s"
        )
        return f"{len(self.sources)} sources, {up}/{len(self.sites)} sites up, worst RPO {rpo}"

    def ready(self) -> tuple[bool, list[str]]:
        reasons = []
        for name, sc in self.app.config.sources.items():
            up = sum(1 for s in sc.sites if self.sites[s].up)
            if up < sc.min_copies:
                reasons.append(f"source {name}: {up} of min_copies {sc.min_copies} sites reachable")
        return not reasons, reasons

    async def apply_retention(self, now: float) -> None:
        """`drsvc forget` for each source with a retention policy, at most every RETENTION_EVERY seconds.
        Only snapshot records go (prune removes data); a record still in the spool is not at any site yet,
        so the newest snapshot the sites hold is the newest the policy sees."""
        for name, st in self.sources.items():
            if self.app.config.sources[name].retention is None or now - st.last_retention < RETENTION_EVERY:
                continue
            st.last_retention = now
            try:
                outcome = await self.app.forget(name)
            except Exception as exc:
                log.error("retention failed", extra={"source": name, "error": str(exc)})
                continue
            if outcome.deleted or outcome.unreachable:
                log.info(
                    "retention applied",
                    extra={
                        "source": name,
                        "forgotten": len(outcome.plan.forget),
                        "unreachable": sorted(outcome.unreachable),
                    },
                )

    def tenants(self) -> list[str]:
        return [t for t in self.app.config.tenants if self.app.config.tenant_sites(t)]

    async def maintain(self, now: float) -> None:
        """Prune and scrub each tenant whose interval has passed (see the module docstring, 5.)."""
        cfg = self.app.config
        outbox = self.app.spool.outbox
        for tenant in self.tenants():
            if self._intake.is_set():
                return
            if cfg.prune.interval is not None:
                stamp = await asyncio.to_thread(outbox.get_meta, f"last_prune:{tenant}")
                last = float(stamp or 0)
                if now - last >= cfg.prune.interval:
                    await self._maintenance_run(tenant, "prune", self._prune(tenant))
                    await asyncio.to_thread(outbox.set_meta, f"last_prune:{tenant}", repr(self.clock()))
            interval = cfg.scrub.interval
            if interval is not None and scrub.scrub_due(cfg.state.dir, tenant, interval, now):
                await self._maintenance_run(
                    tenant,
                    "scrub",
                    scrub.scrub_tenant(self.app, tenant, cfg.scrub.read_share, metrics=self.metrics),
                )

    async def _prune(self, tenant: str) -> None:
        r = await prune_tenant(self.app, tenant)
        self.metrics.prune_finished(tenant, self.clock(), r.deleted_bytes, r.waiting, len(r.locked))

    async def _maintenance_run(self, tenant: str, task: str, work: Awaitable[object]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # logged and counted; the next interval tries again
            self.metrics.maintenance_failed(tenant, task)
            log.error(f"{task} failed", extra={"tenant": tenant, "error": str(exc)})

    async def _maintain_loop(self) -> None:
        while not self._intake.is_set():
            try:
                await self.maintain(self.clock())
            except Exception:
                log.exception("maintenance pass failed")
            try:
                await asyncio.wait_for(self._intake.wait(), MAINTENANCE_POLL)
            except TimeoutError:
                pass

    async def run_once(self) -> None:
        """Everything one pass of the daemon does: due snapshots, one shipping pass per site, a tick."""
        for source in self.due(self.clock()):
            await self.snapshot(source)
        await asyncio.gather(*(loop.pass_once() for loop in self.sites.values()))
        await self.tick()
        await self.apply_retention(self.clock())

    # -- the long-running shape -------------------------------------------------------------------
    async def start_watchers(self) -> None:
        for name, sc in self.app.config.sources.items():
            if not sc.watch:
                continue
            w = TreeWatcher(
                sc.path, functools.partial(self.changed, name), sc.is_excluded, sc.one_file_system
            )
            self._watchers.append(w)
            self._watcher_of[name] = w
            if not await w.start():
                self.sources[name].watch_failed = w.failed
            self.metrics.source_watching(self.sources[name].tenant, name, w.failed is None)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.start_watchers()
        await self.start_streamers()
        await self.start_wal_ingest()
        self._site_tasks = [
            asyncio.create_task(loop.run(self._stop), name=f"site:{n}") for n, loop in self.sites.items()
        ]
        self._unsubscribe: Callable[[], None] | None = self.app.spool.subscribe(self._wake_all)
        self._tasks = [
            asyncio.create_task(self._schedule(), name="scheduler"),
            asyncio.create_task(self._ticker(), name="ticker"),
        ]
        self._protect_task = asyncio.create_task(self._protect_on_ack(), name="protection")
        cfg = self.app.config
        if cfg.prune.interval is not None or cfg.scrub.interval is not None:
            self._maintenance = asyncio.create_task(self._maintain_loop(), name="maintenance")

    def _wake_all(self) -> None:
        """Called from whichever thread spooled an object: hand the wake-up to the daemon's loop."""
        for s in self.sites.values():
            self._loop.call_soon_threadsafe(s.shipper.wakeup.set)

    async def _schedule(self) -> None:
        while not self._intake.is_set():
            try:
                for source in self.due(self.clock()):
                    if self._intake.is_set():
                        return
                    await self.snapshot(source)
                await self.apply_retention(self.clock())
            except Exception:  # never let the scheduler die quietly: log and try again after a pause
                log.exception("scheduler pass failed")
                await asyncio.sleep(IDLE_POLL)
            nxt = min(
                (
                    0.0
                    if st.requested and not self.paused
                    else max(self.next_due(n, st), st.not_before) - self.clock()
                    for n, st in self.sources.items()
                ),
                default=IDLE_POLL,
            )
            self._wake.clear()
            intake, wake = (
                asyncio.ensure_future(self._intake.wait()),
                asyncio.ensure_future(self._wake.wait()),
            )
            await asyncio.wait(
                {intake, wake}, timeout=max(0.05, min(nxt, IDLE_POLL)), return_when="FIRST_COMPLETED"
            )
            for f in (intake, wake):
                f.cancel()

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("tick failed")
            try:
                await asyncio.wait_for(self._stop.wait(), self.app.config.daemon.tick)
            except TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Stop intake, drain in-flight uploads within `grace` seconds, cancel the rest, persist state."""
        self._intake.set()
        for w in self._watchers:
            w.close()
        self._stop_streams.set()  # each streamer cuts once more: what was written before the stop is spooled
        if self._stream_tasks:
            _done, late = await asyncio.wait(self._stream_tasks, timeout=max(1.0, grace / 2))
            for t in late:
                t.cancel()
            await asyncio.gather(*self._stream_tasks, return_exceptions=True)
        for streamer in self.streamers.values():
            streamer.close()
        if self._maintenance is not None:  # prune and scrub are safe to interrupt: stop them now
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        scheduler, ticker = self._tasks if self._tasks else (None, None)
        deadline = time.monotonic() + grace
        if scheduler is not None:
            try:  # a snapshot in progress finishes into the spool if the deadline allows
                await asyncio.wait_for(asyncio.shield(scheduler), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                scheduler.cancel()
        self._stop.set()  # site loops finish their current pass (their uploads in flight), then exit
        if self._site_tasks:
            _done, pending = await asyncio.wait(
                self._site_tasks, timeout=max(0.0, deadline - time.monotonic())
            )
            for t in pending:
                t.cancel()
        everything = [t for t in (scheduler, ticker) if t is not None] + self._site_tasks
        if self._protect_task is not None:
            everything.append(self._protect_task)  # it ends with _stop set
        await asyncio.gather(*everything, return_exceptions=True)
        unsubscribe, self._unsubscribe = getattr(self, "_unsubscribe", None), None
        if unsubscribe is not None:
            unsubscribe()
        await self.tick()  # protection reached during the drain is recorded before exit
