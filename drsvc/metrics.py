"""Prometheus metrics of one daemon, in a registry of its own.

1. ``Metrics()`` builds every ``drsvc_*`` family in a private ``CollectorRegistry``: several daemons
   (or tests) in one process never share or collide on series.
2. The supervisor reports facts through typed helpers (``source_snapshot``, ``source_protected``,
   ``site_backlog``, ...); nobody else touches the prometheus objects or formats label values.
3. ``update_rpo(now_s)`` recomputes every source's RPO gauge (now − protected_until) from the stored
   protected_until values; the supervisor calls it on each tick and before a scrape is served.
4. ``remove_source`` / ``remove_site`` / ``remove_tenant`` drop every label set of a source, site or tenant
   on a config reload, so a removed source stops showing a growing RPO.
5. Drills run outside the daemon (a systemd timer runs `drsvc drill`), so their gauges come from the newest
   report on disk: ``watch_drill_report(<drill dir>/last.json)`` names the file, and ``render()`` re-reads it
   when it changed (stat per scrape, read only when its mtime, size or inode moved). ``drill_report(report)``
   sets the same gauges from a report in hand.
6. ``render()`` returns the exposition body and its content type for the HTTP endpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

Outcome = Literal["ok", "partial", "failed"]
Op = Literal["put", "get", "list", "stat", "delete"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
OPS: tuple[Op, ...] = get_args(Op)

SNAPSHOT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _package_version() -> str:
    try:
        return metadata.version("drsvc")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every metric family of one daemon; the helpers are the only way to change a value."""

    def __init__(self, version: str | None = None, drill_report: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        src = ("tenant", "source")

        self._rpo = Gauge(
            "drsvc_source_rpo_seconds",
            "Seconds of changes that would be lost now: now - protected_until",
            src,
            registry=r,
        )
        self._last_snapshot = Gauge(
            "drsvc_source_last_snapshot_timestamp_seconds",
            "Unix time of the source's last completed snapshot",
            src,
            registry=r,
        )
        self._last_protected = Gauge(
            "drsvc_source_last_protected_timestamp_seconds",
            "Unix time up to which the source is held by at least min_copies sites",
            src,
            registry=r,
        )
        self._snapshots = Counter(
            "drsvc_source_snapshots_total",
            "Snapshots taken, by outcome",
            (*src, "outcome"),
            registry=r,
        )
        self._snapshot_duration = Histogram(
            "drsvc_source_snapshot_duration_seconds",
            "Wall time of one snapshot",
            src,
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )

        self._site_up = Gauge(
            "drsvc_site_up", "1 if the site answered its last probe, else 0", ("site",), registry=r
        )
        self._backlog_objects = Gauge(
            "drsvc_site_backlog_objects",
            "Objects spooled but not yet shipped to the site",
            ("site",),
            registry=r,
        )
        self._backlog_bytes = Gauge(
            "drsvc_site_backlog_bytes", "Bytes spooled but not yet shipped to the site", ("site",), registry=r
        )
        self._backlog_age = Gauge(
            "drsvc_site_backlog_oldest_age_seconds",
            "Age of the oldest object waiting for the site (0 when the backlog is empty)",
            ("site",),
            registry=r,
        )
        self._shipped = Counter(
            "drsvc_site_shipped_bytes_total", "Bytes shipped to the site", ("site",), registry=r
        )
        self._site_errors = Counter(
            "drsvc_site_errors_total", "Failed requests to the site, by kind", ("site", "kind"), registry=r
        )
        self._request = Histogram(
            "drsvc_site_request_seconds",
            "Latency of one object-store request, by operation",
            ("site", "op"),
            buckets=REQUEST_BUCKETS,
            registry=r,
        )

        self._spool_used = Gauge("drsvc_spool_used_bytes", "Bytes held in the local spool", registry=r)
        self._spool_quota = Gauge(
            "drsvc_spool_quota_bytes", "Spool quota in bytes (0: unlimited)", registry=r
        )
        self._spool_full = Gauge("drsvc_spool_full", "1 when the spool refuses new data, else 0", registry=r)

        self._scrub_findings = Counter(
            "drsvc_scrub_findings_total",
            "Scrub findings by site and kind (missing, corrupt, size, extra, stray, unreachable)",
            ("tenant", "site", "kind"),
            registry=r,
        )
        self._scrub_repairs = Counter(
            "drsvc_scrub_repairs_total",
            "Copies the scrubber wrote to a site from a verified copy at another site",
            ("tenant", "site"),
            registry=r,
        )
        self._scrub_unrecoverable = Gauge(
            "drsvc_scrub_unrecoverable_objects",
            "Objects that no site held intact at the tenant's last scrub (alert on > 0)",
            ("tenant",),
            registry=r,
        )
        self._scrub_verified = Counter(
            "drsvc_scrub_bytes_verified_total",
            "Bytes the scrubber downloaded and verified",
            ("tenant",),
            registry=r,
        )
        self._scrub_last = Gauge(
            "drsvc_scrub_last_run_timestamp_seconds",
            "Unix time the tenant's last scrub finished",
            ("tenant",),
            registry=r,
        )

        self._log_lag = Gauge(
            "drsvc_log_lag_seconds",
            "Log sources: newest change spooled minus newest change protected on min_copies sites",
            ("tenant", "source"),
            registry=r,
        )
        self._log_segment_bytes = Histogram(
            "drsvc_log_segment_bytes",
            "Log sources: sealed size of each change-log segment",
            ("tenant", "source"),
            buckets=(1024, 16 * 1024, 256 * 1024, 1024**2, 4 * 1024**2, 16 * 1024**2, 64 * 1024**2),
            registry=r,
        )
        self._wal_backlog = Gauge(
            "drsvc_wal_backlog_files",
            "Postgres sources: WAL files wal-push has handed over that are not sealed into the spool yet",
            ("tenant", "source"),
            registry=r,
        )
        self._watching = Gauge(
            "drsvc_source_watching",
            "1 when inotify watches the tree source, 0 when it fell back to scanning (see the logs)",
            ("tenant", "source"),
            registry=r,
        )
        self._prune_last = Gauge(
            "drsvc_prune_last_run_timestamp_seconds",
            "Unix time the tenant's last prune run finished",
            ("tenant",),
            registry=r,
        )
        self._prune_deleted = Counter(
            "drsvc_prune_deleted_bytes_total",
            "Pack bytes prune deleted (one replica; every site holding a pack deletes it)",
            ("tenant",),
            registry=r,
        )
        self._prune_waiting = Gauge(
            "drsvc_prune_condemned_packs",
            "Packs condemned by prune and waiting for their grace period (or their object lock) to end",
            ("tenant",),
            registry=r,
        )
        self._prune_locked = Gauge(
            "drsvc_prune_locked_objects",
            "Objects the tenant's last prune could not delete because object lock still retains them",
            ("tenant",),
            registry=r,
        )
        self._maintenance_failures = Counter(
            "drsvc_maintenance_failures_total",
            "Scrub or prune runs of the daemon that failed (see the logs)",
            ("tenant", "task"),
            registry=r,
        )

        self._drill_last = Gauge(
            "drsvc_drill_last_timestamp_seconds",
            "Unix time the newest DR drill finished (0: no drill report yet)",
            registry=r,
        )
        self._drill_success = Gauge(
            "drsvc_drill_last_success",
            "1: the newest DR drill passed (every target met, all verified); 0: it failed, or none ran",
            registry=r,
        )
        self._drill_level = Gauge(
            "drsvc_drill_level",
            "GB/T 20988-2007 level (0-6) the newest drill's measured RTO and RPO are consistent with",
            registry=r,
        )
        drill_labels = ("source", "site", "point")
        self._drill_rto = Gauge(
            "drsvc_drill_rto_seconds",
            "RTO achieved by the newest drill's restore of the source from the site alone",
            drill_labels,
            registry=r,
        )
        self._drill_rpo = Gauge(
            "drsvc_drill_rpo_seconds",
            "RPO achieved by the newest drill's restore: requested point minus restored point",
            drill_labels,
            registry=r,
        )

        self._build = Gauge(
            "drsvc_build_info", "Always 1; the label carries the version", ("version",), registry=r
        )
        self._build.labels(version or _package_version()).set(1)

        self._maintenance_labels: set[tuple[str, str]] = set()
        self._protected_until: dict[tuple[str, str], float] = {}
        self._sources: set[tuple[str, str]] = set()
        self._error_kinds: dict[str, set[str]] = {}
        self._scrub_labels: set[tuple[str, str, str]] = set()  # (tenant, site, kind) of findings
        # (source, site, point) label sets of the drill RTO ("rto_s") and RPO ("rpo_s") gauges
        self._drill_labels: dict[str, set[tuple[str, str, str]]] = {"rto_s": set(), "rpo_s": set()}
        self._drill_path: Path | None = None
        self._drill_seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the file read
        self.watch_drill_report(drill_report)

    # -- sources ---------------------------------------------------------------------------------------------

    def source_snapshot(
        self, tenant: str, source: str, outcome: Outcome, duration_s: float, snapshot_time_s: float
    ) -> None:
        """One snapshot finished; a failed one is counted and timed but leaves the last-snapshot time."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        self._touch_source(tenant, source)
        self._snapshots.labels(tenant, source, outcome).inc()
        self._snapshot_duration.labels(tenant, source).observe(duration_s)
        if outcome != "failed":
            self._last_snapshot.labels(tenant, source).set(snapshot_time_s)

    def source_protected(self, tenant: str, source: str, protected_until_s: float) -> None:
        """The source's data up to ``protected_until_s`` is now held by enough sites."""
        self._touch_source(tenant, source)
        self._protected_until[(tenant, source)] = protected_until_s
        self._last_protected.labels(tenant, source).set(protected_until_s)

    def update_rpo(self, now_s: float) -> None:
        """Set every protected source's RPO gauge to ``now_s - protected_until`` (never below 0)."""
        for (tenant, source), until in self._protected_until.items():
            self._rpo.labels(tenant, source).set(max(0.0, now_s - until))

    def remove_source(self, tenant: str, source: str) -> None:
        """Drop every series of the source (config reload removed it); unknown sources are ignored."""
        key = (tenant, source)
        self._sources.discard(key)
        self._protected_until.pop(key, None)
        for family in (
            self._rpo,
            self._last_snapshot,
            self._last_protected,
            self._snapshot_duration,
            self._watching,
        ):
            with contextlib.suppress(KeyError):
                family.remove(tenant, source)
        for outcome in OUTCOMES:
            with contextlib.suppress(KeyError):
                self._snapshots.remove(tenant, source, outcome)

    def _touch_source(self, tenant: str, source: str) -> None:
        # The first sighting creates every outcome at 0, so rate() sees each series from the start.
        if (tenant, source) not in self._sources:
            self._sources.add((tenant, source))
            for outcome in OUTCOMES:
                self._snapshots.labels(tenant, source, outcome)

    # -- sites -----------------------------------------------------------------------------------------------

    def site_up(self, site: str, up: bool) -> None:
        self._site_up.labels(site).set(1 if up else 0)

    def site_backlog(self, site: str, objects: int, nbytes: int, oldest_age_s: float) -> None:
        self._backlog_objects.labels(site).set(objects)
        self._backlog_bytes.labels(site).set(nbytes)
        self._backlog_age.labels(site).set(oldest_age_s)

    def site_shipped(self, site: str, nbytes: int) -> None:
        self._shipped.labels(site).inc(nbytes)

    def site_error(self, site: str, kind: str) -> None:
        """A request to the site failed; ``kind`` is a short fixed word (timeout, denied, ...)."""
        self._error_kinds.setdefault(site, set()).add(kind)
        self._site_errors.labels(site, kind).inc()

    def observe_request(self, site: str, op: Op, seconds: float) -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, not {op!r}")
        self._request.labels(site, op).observe(seconds)

    def remove_site(self, site: str) -> None:
        """Drop every series of the site (config reload removed it); unknown sites are ignored."""
        for family in (
            self._site_up,
            self._backlog_objects,
            self._backlog_bytes,
            self._backlog_age,
            self._shipped,
        ):
            with contextlib.suppress(KeyError):
                family.remove(site)
        for kind in self._error_kinds.pop(site, set()):
            with contextlib.suppress(KeyError):
                self._site_errors.remove(site, kind)
        for op in OPS:
            with contextlib.suppress(KeyError):
                self._request.remove(site, op)
        for tenant, s, kind in [k for k in self._scrub_labels if k[1] == site]:
            self._remove_scrub_labels(tenant, s, kind)

    # -- scrub -----------------------------------------------------------------------------------------------

    def scrub_finding(self, tenant: str, site: str, kind: str) -> None:
        """The scrubber found something at a site; ``kind`` is a drsvc.scrub.FindingKind value."""
        self._scrub_labels.add((tenant, site, kind))
        self._scrub_findings.labels(tenant, site, kind).inc()

    def scrub_repair(self, tenant: str, site: str) -> None:
        self._scrub_labels.add((tenant, site, ""))
        self._scrub_repairs.labels(tenant, site).inc()

    def scrub_verified(self, tenant: str, nbytes: int) -> None:
        self._scrub_verified.labels(tenant).inc(nbytes)

    def scrub_finished(self, tenant: str, finished_s: float, unrecoverable: int) -> None:
        """A scrub of the tenant finished at ``finished_s`` with this many objects no site holds intact."""
        self._scrub_last.labels(tenant).set(finished_s)
        self._scrub_unrecoverable.labels(tenant).set(unrecoverable)

    def log_lag(self, tenant: str, source: str, seconds: float) -> None:
        self._log_lag.labels(tenant, source).set(seconds)

    def log_segment(self, tenant: str, source: str, nbytes: int) -> None:
        self._log_segment_bytes.labels(tenant, source).observe(nbytes)

    def wal_backlog(self, tenant: str, source: str, files: int) -> None:
        self._wal_backlog.labels(tenant, source).set(files)

    def source_watching(self, tenant: str, source: str, watching: bool) -> None:
        self._watching.labels(tenant, source).set(1 if watching else 0)

    # -- prune and failures of maintenance ------------------------------------------------------------------

    def prune_finished(
        self, tenant: str, finished_s: float, deleted_bytes: int, waiting: int, locked: int
    ) -> None:
        self._prune_last.labels(tenant).set(finished_s)
        self._prune_deleted.labels(tenant).inc(deleted_bytes)
        self._prune_waiting.labels(tenant).set(waiting)
        self._prune_locked.labels(tenant).set(locked)

    def maintenance_failed(self, tenant: str, task: str) -> None:
        self._maintenance_labels.add((tenant, task))
        self._maintenance_failures.labels(tenant, task).inc()

    def remove_tenant(self, tenant: str) -> None:
        """Drop every scrub and prune series of the tenant (config reload removed it); unknown tenants are
        ignored."""
        for t, task in [k for k in self._maintenance_labels if k[0] == tenant]:
            self._maintenance_labels.discard((t, task))
            with contextlib.suppress(KeyError):
                self._maintenance_failures.remove(t, task)
        for family in (
            self._scrub_unrecoverable,
            self._scrub_verified,
            self._scrub_last,
            self._prune_last,
            self._prune_deleted,
            self._prune_waiting,
            self._prune_locked,
        ):
            with contextlib.suppress(KeyError):
                family.remove(tenant)
        for t, site, kind in [k for k in self._scrub_labels if k[0] == tenant]:
            self._remove_scrub_labels(t, site, kind)

    def _remove_scrub_labels(self, tenant: str, site: str, kind: str) -> None:
        self._scrub_labels.discard((tenant, site, kind))
        with contextlib.suppress(KeyError):
            if kind:
                self._scrub_findings.remove(tenant, site, kind)
            else:
                self._scrub_repairs.remove(tenant, site)

    # -- drills ----------------------------------------------------------------------------------------------

    def watch_drill_report(self, path: Path | None) -> None:
        """Take the drill gauges from `path` (``<drill dir>/last.json``) at each render; None stops."""
        if path != self._drill_path:
            self._drill_path, self._drill_seen = path, None
            self._clear_drill()

    def update_drill(self) -> None:
        """Re-read the watched report if it changed since the last read; a missing file clears the drill
        gauges, an unreadable one leaves them as they were."""
        if self._drill_path is None:
            return
        try:
            st = os.stat(self._drill_path)
        except OSError:
            self._drill_seen = None
            self._clear_drill()
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._drill_seen:
            return
        try:
            report = json.loads(self._drill_path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(report, dict):
            self._drill_seen = seen
            self.drill_report(report)

    def drill_report(self, report: dict[str, Any]) -> None:
        """Set the drill gauges from one report (the contract of drsvc/drill/report.py); series of sources,
        sites or points the report does not have are dropped."""
        finished = _epoch(report.get("finished"))
        self._drill_last.set(finished if finished is not None else 0.0)
        self._drill_success.set(1 if report.get("verdict") == "pass" else 0)
        level = report.get("level")
        number = level.get("gbt20988") if isinstance(level, dict) else None
        self._drill_level.set(number if isinstance(number, int) and not isinstance(number, bool) else 0)
        values: dict[str, dict[tuple[str, str, str], float]] = {"rto_s": {}, "rpo_s": {}}
        for sc in report.get("scenarios") or []:
            if not isinstance(sc, dict):
                continue
            labels = (str(sc.get("source", "")), str(sc.get("site", "")), str(sc.get("point", "")))
            for field, into in values.items():
                value = sc.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    into[labels] = max(float(value), into.get(labels, float("-inf")))  # the worst of repeats
        for field, family in (("rto_s", self._drill_rto), ("rpo_s", self._drill_rpo)):
            new = values[field]
            for labels in self._drill_labels[field] - new.keys():
                with contextlib.suppress(KeyError):
                    family.remove(*labels)
            for labels, value in new.items():
                family.labels(*labels).set(value)
            self._drill_labels[field] = set(new)

    def _clear_drill(self) -> None:
        for field, family in (("rto_s", self._drill_rto), ("rpo_s", self._drill_rpo)):
            for labels in self._drill_labels[field]:
                with contextlib.suppress(KeyError):
                    family.remove(*labels)
            self._drill_labels[field] = set()
        for gauge in (self._drill_last, self._drill_success, self._drill_level):
            gauge.set(0)

    # -- spool and exposition --------------------------------------------------------------------------------

    def spool(self, used: int, quota: int, full: bool | None = None) -> None:
        """Spool usage; ``full`` defaults to ``quota > 0 and used >= quota`` (a quota of 0 is unlimited)."""
        if full is None:
            full = quota > 0 and used >= quota
        self._spool_used.set(used)
        self._spool_quota.set(quota)
        self._spool_full.set(1 if full else 0)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of this registry and its content type (the drill gauges re-read first)."""
        self.update_drill()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _epoch(iso: object) -> float | None:
    """Unix seconds of an ISO 8601 time (UTC when it names no zone), None if it is not one."""
    if not isinstance(iso, str):
        return None
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()
