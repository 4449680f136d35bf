"""Running a drill plan: every source x site x point restored alone, verified, timed, judged.

Definitions (the report's fields):

- **requested point**: for ``earlier``, a random time between the oldest and the newest restorable point of
  the source (over all of its sites: ``App.restorable_range``), drawn from the plan's seed and the source's
  name (every site of a source is drilled at the same time); for ``latest``, the newest restorable point
  over all of the source's sites when the source's scenarios begin. For a postgres source, that is when
  PostgreSQL finished writing the last segment of the contiguous WAL after its newest complete base backup.
- **restored point**: the snapshot's time (tree), the last change-log event applied (log), the recovery
  target, else the end of the replayed WAL (postgres: its last segment's write time, else its last
  transaction's).
- **RPO** = requested point - restored point (never below 0): for ``latest``, what losing the other sites
  costs. ``lag_s`` (an extra key) is the scenario's start minus the restored point.
- **RTO** = from the scenario's start to verified data: the restore, its verification against the
  repository and, for postgres, the restored server out of recovery with every probe answered. The
  comparison with the live source is the drill's own proof and not counted.
- A scenario whose site could not restore alone has no RTO or RPO (``null``: it did not recover under the
  drill's conditions); those of its restore with the other sites' help are ``fallback_rto_s`` and
  ``fallback_rpo_s``.

A scenario:

1. Restore with ``site`` alone (``isolate``: the other sites are treated as lost) into a fresh scratch
   directory. If that fails (a missing or corrupt object, a change-log or WAL gap), the scenario fails
   ("site X cannot restore alone") and is restored again with the other sites as fallback (site first), to
   show which objects the others had to supply (``fallbacks``).
2. Verify the restored data against the repository (``restore.verify``: every file read back, from the
   sites the restore used); for tree and log sources, against the live source (``compare``:
   ``compare_tree``, ``compare_log``); for postgres, start PostgreSQL on it (``pgprobe.probe_postgres``),
   wait for recovery to end, run the probes, stop it (always). A postgres restore's WAL is fetched by
   ``drsvc wal-fetch``; the isolated restore writes ``--only-site <site>`` into its restore_command
   (``drsvc.wal``), so the base backup, the WAL listing and every WAL segment PostgreSQL replays come from
   the drilled site alone (the fallback restore's restore_command reads any site).
   The comparison with the live source counts the files compared, changed since, missing from the restore,
   gone since and new since (``source_compare``); when nothing could be compared, ``verified.source`` is
   None (not verified), with a note, never True.
3. Judge RPO and RTO against the targets; remove the scratch restore.

Scratch: each drill works in ``<scratch>/<the first 12 hex digits of its id>``, holding an exclusive
``flock`` on that directory while it runs. A drill killed before its cleanup leaves it behind: each drill,
under a lock on the scratch directory itself, first removes every such directory (exactly 12 lowercase hex
digits, holding only scenario directories ``001``, ``002``, ...) that no running drill holds, and logs it.

At the end: the GB/T 20988 level (``levels``), the JSON and HTML report (``report``), the sealed evidence at
the sites (``evidence``). A drill never changes a source or a site other than adding its evidence.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import logging
import os
import random
import re
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import restore
from drsvc.app import App
from drsvc.core.errors import DRError
from drsvc.drill import evidence, levels, report
from drsvc.drill.compare import compare_log, compare_tree
from drsvc.drill.pgprobe import probe_postgres
from drsvc.drill.plan import Plan, Point, SourcePlan, parse_plan
from drsvc.restores import POSTGRES_APPENDED
from drsvc.wal import restore_postgres
from restore.logreplay import LogRestoreResult
from restore.postgres import PostgresRestoreResult
from restore.verify import verify_log, verify_tree

Result = restore.RestoreResult | LogRestoreResult | PostgresRestoreResult
Progress = Callable[[dict[str, Any]], None]

log = logging.getLogger("drsvc.drill")
_WORK = re.compile(r"[0-9a-f]{12}")  # a drill's directory in the scratch: the first 12 hex digits of its id
_SCENARIO = re.compile(r"[0-9]{3,}")  # a scenario's directory in it: f"{n:03d}"


@dataclass
class DrillOutcome:
    report: dict[str, Any]  # the report (see the module docstring of drsvc.drill.report)
    files: dict[str, str] = field(default_factory=dict)  # what write_report wrote ("json", "html": paths)
    evidence: dict[str, str] = field(default_factory=dict)  # where the sealed report was stored

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"] == "pass")


@dataclass(frozen=True)
class _Points:
    """A source's points, decided once for all of its sites."""

    earliest_ns: int | None
    latest_ns: int | None
    earlier_ns: int | None
    problems: tuple[str, ...] = ()

    def requested(self, point: Point) -> int | None:
        return self.latest_ns if point == "latest" else self.earlier_ns


async def run_drill(
    app: App,
    plan: Plan | Mapping[str, Any],
    progress: Progress | None = None,
    *,
    report_dir: Path | None = None,
    store_evidence: bool = True,
    drsvc_command: Sequence[str] | None = None,
) -> DrillOutcome:
    """Run `plan` (a Plan, or a plan table checked here) and write its report under `report_dir` (default:
    ``[drill] dir``, else ``<state.dir>/drills``); with `store_evidence`, seal it at the sites. `progress` is
    told of each scenario's phases. `drsvc_command`: how PostgreSQL runs drsvc for wal-fetch (default: this
    installation). Raises only for a bad plan or scratch directory: failures are in the report."""
    if not isinstance(plan, Plan):
        plan = parse_plan(plan, app.config)
    app.config.restore.check_target(plan.scratch)
    drill_id = uuid.uuid4().hex
    seed = plan.seed if plan.seed is not None else secrets.randbits(32)
    started = _iso(time.time_ns())
    work = plan.scratch / drill_id[:12]
    held = await asyncio.to_thread(_make_scratch, plan.scratch, work)
    scenarios: list[dict[str, Any]] = []
    try:
        for sp in plan.sources:
            points = await _points(app, sp, seed)
            for site in sp.sites:
                for point in sp.points:
                    run = _Scenario(app, plan, sp, site, point, points, work, drsvc_command)
                    scenarios.append(await run.run(len(scenarios) + 1, plan.scenario_count, progress))
    finally:
        await asyncio.to_thread(_rmtree, work)
        if held is not None:
            os.close(held)
    misses = [
        f"source {s['source']}, site {s['site']}, {s['point']}: {f}" for s in scenarios for f in s["failures"]
    ]
    doc: dict[str, Any] = {
        "id": drill_id,
        "plan": plan.name,
        "started": started,
        "finished": _iso(time.time_ns()),
        "verdict": "fail" if misses else "pass",
        "misses": misses,
        "level": levels.gbt20988_level(scenarios),
        "seed": seed,
        "scenarios": scenarios,
    }
    outcome = DrillOutcome(doc)
    json_path, html_path = await asyncio.to_thread(
        report.write_report, report_dir or report.report_dir(app.config), doc
    )
    outcome.files = {"json": str(json_path), "html": str(html_path)}
    if store_evidence:
        outcome.evidence = await evidence.store_evidence(app, doc)
    return outcome


async def _points(app: App, sp: SourcePlan, seed: int) -> _Points:
    """The source's restorable range over all of its sites (a site that cannot be read is noted), and the
    earlier point drawn from it."""
    ranges: list[tuple[int, int]] = []
    problems: list[str] = []
    for site in app.config.source(sp.source).sites:
        try:
            r = await app.restorable_range(sp.source, site)
        except DRError as exc:
            problems.append(f"site {site} could not be listed: {exc.message}")
            continue
        if r is not None:
            ranges.append(r)
    if not ranges:
        return _Points(None, None, None, (*problems, "nothing is restorable at any site"))
    earliest, latest = min(r[0] for r in ranges), max(r[1] for r in ranges)
    rng = random.Random(f"{seed}:{sp.source}")
    earlier = rng.randint(earliest, latest - 1) if latest > earliest else earliest
    return _Points(earliest, latest, earlier, tuple(problems))


class _Scenario:
    def __init__(
        self,
        app: App,
        plan: Plan,
        sp: SourcePlan,
        site: str,
        point: Point,
        points: _Points,
        work: Path,
        drsvc_command: Sequence[str] | None,
    ) -> None:
        self.app, self.plan, self.sp, self.site, self.point = app, plan, sp, site, point
        self.points = points
        self.work = work
        self.drsvc_command = drsvc_command
        self.failures: list[str] = []
        self._notify: Callable[..., None] = lambda **kw: None

    async def run(self, n: int, of: int, progress: Progress | None) -> dict[str, Any]:
        sp = self.sp
        if progress is not None:
            base = {
                "scenario": n,
                "of": of,
                "source": sp.source,
                "site": self.site,
                "point": self.point,
                "label": f"[{n}/{of}] {sp.source} at {self.site} ({self.point})",
            }
            self._notify = lambda **kw: progress({**base, **kw})
        t0 = time.monotonic()
        start_ns = time.time_ns()
        requested = self.points.requested(self.point)
        rec: dict[str, Any] = {
            "source": sp.source,
            "tenant": sp.tenant,
            "kind": sp.kind,
            "site": self.site,
            "point": self.point,
            "requested": _iso(requested) if requested is not None else None,
            "restored_point": None,
            "rpo_s": None,
            "rto_s": None,
            "rpo_target_s": sp.rpo_target_s,
            "rto_target_s": sp.rto_target_s,
            "verdict": "fail",
            "failures": self.failures,
            "fallbacks": [],
            "bytes": 0,
            "files": 0,
            "verified": {"repository": False, "source": None, "probes": []},
            "isolated": True,  # restored from the site alone (False: the other sites had to help)
            "lag_s": None,
            "notes": [],  # what the verdict does not show: e.g. why the source could not be verified
        }
        self._notify(phase="restore", bytes=0)
        sdir = self.work / f"{n:03d}"
        try:
            if requested is None:
                self.failures.extend(self.points.problems or ("nothing is restorable",))
            else:
                await self._drill(rec, sdir, requested, start_ns, t0)
        except OSError as exc:  # the scratch space or the live source: this scenario fails, the drill goes on
            where = f" ({exc.filename})" if exc.filename else ""
            self.failures.append(f"the scenario could not be completed: {exc.strerror or exc}{where}")
        finally:
            await asyncio.to_thread(_rmtree, sdir)
        if not self.failures:
            rec["verdict"] = "pass"
        self._notify(phase="done", bytes=rec["bytes"], verdict=rec["verdict"], rto_s=rec["rto_s"])
        return rec

    async def _drill(self, rec: dict[str, Any], sdir: Path, requested: int, start_ns: int, t0: float) -> None:
        sp = self.sp
        await asyncio.to_thread(sdir.mkdir, 0o700)
        target = sdir / "data"
        at_ns = requested if self.point == "earlier" else None
        result = await self._restore_with_fallback(rec, target, at_ns)
        if result is None:
            return
        base = result.base if isinstance(result, PostgresRestoreResult) else result
        rec["fallbacks"] = [{"site": f.site, "key": f.key, "error": f.error} for f in base.fallbacks]
        rec["bytes"], rec["files"] = base.bytes, base.files
        restored_ns = result.recovery_point_ns
        self._notify(phase="verify", bytes=base.bytes)
        rec["verified"]["repository"] = await self._verify_repository(rec, result)
        if isinstance(result, PostgresRestoreResult):
            self._notify(phase="probes", bytes=base.bytes)
            server = await probe_postgres(self.app, sp, target, sdir, self.plan.postgres_timeout_s)
            rec["verified"]["probes"] = server.probes
            self.failures.extend(server.failures)
            if restored_ns is None:
                restored_ns = server.replayed_ns
            up = server.recovered
        else:
            up = True
        # a site that could not restore alone has no RTO or RPO of its own: what the other sites made
        # possible is kept as fallback_rto_s and fallback_rpo_s
        prefix = "" if rec["isolated"] else "fallback_"
        if rec["verified"]["repository"] and up:
            rec[f"{prefix}rto_s"] = round(time.monotonic() - t0, 3)
        if restored_ns is not None:
            rec["restored_point"] = _iso(restored_ns)
            rec[f"{prefix}rpo_s"] = max(0, requested - restored_ns) / 1e9
            rec["lag_s"] = max(0, start_ns - restored_ns) / 1e9
        if sp.verify_source and sp.kind != "postgres" and restored_ns is not None:
            self._notify(phase="compare", bytes=base.bytes)
            check = compare_tree if sp.kind == "tree" else compare_log
            found = await asyncio.to_thread(check, target, self.app.config.source(sp.source), restored_ns)
            rec["source_compare"] = found.counts()
            rec["notes"].extend(found.notes)
            if found.failures:
                rec["verified"]["source"] = False
            elif found.compared:
                rec["verified"]["source"] = True
            else:  # None, not True: a comparison of nothing proves nothing
                rec["notes"].append(
                    "not verified against the live source: no restored file could be compared "
                    f"({found.changed_since} changed since the restored point, {found.gone_since} gone since)"
                )
            self.failures.extend(found.failures)
        self._judge(rec)

    async def _restore_with_fallback(
        self, rec: dict[str, Any], target: Path, at_ns: int | None
    ) -> Result | None:
        """The restore from the site alone; when it fails, again with the other sites as fallback."""
        try:
            result = await self._restore(target, at_ns, isolate=True)
            gap = _gap(result)
            if gap is None:
                return result
            self.failures.append(f"site {self.site} cannot restore alone: {gap}")
        except DRError as exc:
            self.failures.append(f"site {self.site} cannot restore alone: {_why(exc)}")
        rec["isolated"] = False
        await asyncio.to_thread(_rmtree, target)
        if len(self.app.config.source(self.sp.source).sites) < 2:
            return None  # no other site to fall back to
        self._notify(phase="fallback", bytes=0)
        try:
            result = await self._restore(target, at_ns, isolate=False)
        except DRError as exc:
            self.failures.append(f"the restore failed with the other sites too: {_why(exc)}")
            return None
        gap = _gap(result)
        if gap is not None:
            self.failures.append(f"with the other sites too: {gap}")
        return result

    async def _restore(self, target: Path, at_ns: int | None, *, isolate: bool) -> Result:
        def prog(p: restore.Progress) -> None:
            self._notify(
                phase="restore",
                bytes=p.bytes_done,
                bytes_done=p.bytes_done,
                bytes_total=p.bytes_total,
                files_done=p.files_done,
                files_total=p.files_total,
            )

        if self.sp.kind == "postgres" and self.drsvc_command is not None:
            self.app.config.restore.check_target(target)
            return await restore_postgres(
                self.app,
                self.sp.source,
                target,
                at_ns,
                self.site,
                drsvc=self.drsvc_command,
                progress=prog,
                isolate=isolate,
            )
        return await self.app.restore(self.sp.source, target, at_ns, self.site, prog, isolate=isolate)

    async def _verify_repository(self, rec: dict[str, Any], result: Result) -> bool:
        """Re-read what was restored and compare it with the repository (``restore.verify``), read from the
        same sites the restore used; a difference is a failure."""
        repo = await self.app.open_repo(self.sp.tenant, self.site)
        others = [] if rec["isolated"] else [n for n in self.app.config.source(self.sp.source).sites]
        repo.stores = [self.app.store(n) for n in dict.fromkeys([self.site, *others])]
        try:
            if isinstance(result, LogRestoreResult):
                report = await verify_log(repo, result)
            elif isinstance(result, PostgresRestoreResult):
                base = result.base
                report = await verify_tree(repo, base.snapshot, Path(base.target), appended=POSTGRES_APPENDED)
            else:
                report = await verify_tree(repo, result.snapshot, Path(result.target))
        except DRError as exc:
            self.failures.append(f"the restored data could not be verified: {_why(exc)}")
            return False
        rec["verify"] = {"files": report.files, "bytes": report.bytes, "mismatches": report.mismatch_count}
        for m in report.mismatches[:20]:
            self.failures.append(f"{m.path}: differs from the repository: {m.problem}")
        if report.mismatch_count > 20:
            self.failures.append(f"and {report.mismatch_count - 20} more differences from the repository")
        return report.ok

    def _judge(self, rec: dict[str, Any]) -> None:
        if not rec["isolated"]:
            return  # the scenario failed already: the site cannot restore alone
        for what, got, target in (
            ("RTO", rec["rto_s"], rec["rto_target_s"]),
            ("RPO", rec["rpo_s"], rec["rpo_target_s"]),
        ):
            if target is None:
                continue
            if got is None:
                self.failures.append(f"{what} not measured (target {_secs(target)} s)")
            elif got > target:
                self.failures.append(f"{what} {_secs(got)} s > target {_secs(target)} s")


def _gap(result: Result) -> str | None:
    if isinstance(result, LogRestoreResult) and result.gap is not None:
        return f"the change log has a gap: {result.gap.describe()}"
    if isinstance(result, PostgresRestoreResult) and result.wal.gap is not None:
        return f"WAL segment {result.wal.gap} is missing: replay stops before it"
    return None


def _why(exc: DRError) -> str:
    where = ", ".join(f"{k}={v}" for k, v in exc.fields.items())
    return f"{exc.message} ({where})" if where else exc.message


def _secs(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat()


def _make_scratch(root: Path, work: Path) -> int | None:
    """Make the drill's directory `work` in the scratch `root`, after removing what killed drills left there
    (module docstring); the descriptor holding `work`'s lock (None: the file system has no locks). The
    scratch root may be traversed by others (a restored PostgreSQL runs as its own user); each drill's
    directory and each scenario's are private to their owner."""
    root.mkdir(parents=True, exist_ok=True, mode=0o711)
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(rootfd, fcntl.LOCK_EX)  # drills starting at once take turns: none removes another's
        except OSError as exc:
            log.warning(
                "cannot lock the drill scratch directory: leftovers of earlier drills are not removed",
                extra={"scratch": str(root), "error": exc.strerror},
            )
        else:
            _remove_leftovers(root)
        work.mkdir(mode=0o711)
        return _lock_dir(work)
    finally:
        os.close(rootfd)  # the scratch root's lock with it


def _lock_dir(path: Path) -> int | None:
    """An exclusive lock on directory `path`, held by the returned descriptor; None when it is taken (or the
    file system has no locks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_leftovers(root: Path) -> None:
    """Remove the directories of drills that ended without their cleanup (killed): named as a drill names
    its directory, holding nothing but scenario directories, and locked by no running drill."""
    with os.scandir(root) as it:
        candidates = [e.name for e in it if _WORK.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    for name in sorted(candidates):
        path = root / name
        try:
            if not all(_SCENARIO.fullmatch(n) for n in os.listdir(path)):
                continue  # not (only) what a drill makes there: not ours to remove
        except OSError:
            continue
        fd = _lock_dir(path)
        if fd is None:
            continue  # a running drill holds it
        try:
            scenarios = sorted(os.listdir(path))
            _rmtree(path)
        finally:
            os.close(fd)
        log.info(
            "removed the scratch directory a killed drill left behind",
            extra={"path": str(path), "scenarios": scenarios, "removed": not path.exists()},
        )


def _rmtree(path: Path) -> None:
    """Remove a scratch restore, even one whose restored directories are read-only."""
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            try:
                if not stat.S_ISLNK(os.lstat(p).st_mode):
                    os.chmod(p, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
