"""Jobs (restores, drills) run by the daemon under a concurrency limit, their state kept in SQLite.

1. ``JobRunner.submit`` records the job as ``queued`` (a committed row) and returns it at once; a task waits
   for one of ``max_running`` slots, marks the job ``running`` and awaits its work function.
2. The work reports progress through a sink that merges keys into the job's in-memory progress (cheap, from
   any thread); a flusher writes it to SQLite at most every PROGRESS_INTERVAL seconds.
3. The work's dict becomes the result (``succeeded``); a DRError becomes ``failed`` with error
   ``{code, message, hint, ...fields}``; any other exception ``failed`` with code ``internal``; a cancel
   ``cancelled``; the daemon's shutdown (``JobRunner.close``) ``failed-interrupted``.
4. ``JobStore`` opened after a crash or a kill finds the jobs that were queued or running: each becomes
   ``failed-interrupted`` (error code ``interrupted``), never "running" forever. Finished jobs older than
   ``keep`` are pruned.

The store belongs to the process holding the state directory (the daemon); every state change is committed
(WAL mode, synchronous=FULL) before it is visible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from drsvc.core.errors import DRError

log = logging.getLogger(__name__)

JobKind = Literal["restore", "drill"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "failed-interrupted"]
ProgressSink = Callable[[Mapping[str, Any]], None]  # merge keys into the job's progress; cheap, call often
Work = Callable[[ProgressSink], Awaitable[dict[str, Any]]]

KINDS: tuple[JobKind, ...] = get_args(JobKind)
ACTIVE: frozenset[JobState] = frozenset({"queued", "running"})
FINISHED: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled", "failed-interrupted"})
KEEP_S = 30 * 86400.0  # finished jobs are kept this long
PROGRESS_INTERVAL = 0.25  # seconds between progress writes of one job (the in-memory view is current)
JOBS_FILE = "jobs.sqlite"  # in the state directory


def jobs_path(state_dir: Path) -> Path:
    """Where the daemon keeps its jobs: ``<state.dir>/jobs.sqlite``."""
    return state_dir / JOBS_FILE


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    tenants TEXT NOT NULL,
    who TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT NOT NULL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS job_tenants (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    PRIMARY KEY (tenant, job_id)
);
"""


class JobError(DRError):
    """A request about a job that cannot be carried out."""


class JobNotFound(JobError):
    hint = "list the jobs to see their ids; finished jobs are kept 30 days"


class JobFinished(JobError):
    """The job has already finished: there is nothing to cancel."""

    hint = "a finished job cannot be cancelled; its result stays available"


class RunnerClosed(JobError):
    """The runner is shutting down and takes no more jobs."""

    hint = "the daemon is stopping; submit the job again once it is back"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Job:
    id: str  # 32 lowercase hex
    kind: JobKind
    tenants: tuple[str, ...]
    who: str  # the token name that asked
    request: dict[str, Any]
    state: JobState
    created: float  # epoch seconds
    started: float | None
    finished: float | None
    progress: dict[str, Any]  # restores: bytes_done, bytes_total, files_done, files_total, eta_s, site, phase
    result: dict[str, Any] | None
    error: dict[str, Any] | None  # {"code": "...", "message": "...", ...}

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: epoch seconds and ISO 8601 UTC times (``created_at``, ...)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "tenants": list(self.tenants),
            "who": self.who,
            "request": self.request,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "created_at": _iso(self.created),
            "started_at": _iso(self.started),
            "finished_at": _iso(self.finished),
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
        }


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def error_dict(exc: BaseException) -> dict[str, Any]:
    """A job's error: a DRError's ``code`` attribute if it has one (else its class name in snake case),
    message, hint and fields; any other exception code ``internal``."""
    if isinstance(exc, DRError):
        code = getattr(exc, "code", None)
        out: dict[str, Any] = {k: _jsonable(v) for k, v in exc.fields.items()}
        out.update(
            code=code if isinstance(code, str) else _snake(type(exc).__name__),
            message=exc.message,
            hint=exc.hint,
        )
        return out
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}


_COLUMNS = "id, kind, tenants, who, request, state, created, started, finished, progress, result, error"
_UPDATABLE = frozenset({"state", "started", "finished", "progress", "result", "error", "request"})


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, separators=(",", ":"))


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        job.kind,
        _dump(list(job.tenants)),
        job.who,
        _dump(job.request),
        job.state,
        job.created,
        job.started,
        job.finished,
        _dump(job.progress),
        _dump(job.result),
        _dump(job.error),
    )


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        id=row[0],
        kind=row[1],
        tenants=tuple(json.loads(row[2])),
        who=row[3],
        request=json.loads(row[4]),
        state=row[5],
        created=row[6],
        started=row[7],
        finished=row[8],
        progress=json.loads(row[9]),
        result=None if row[10] is None else json.loads(row[10]),
        error=None if row[11] is None else json.loads(row[11]),
    )


class JobStore:
    """Jobs in one SQLite file (e.g. ``<state.dir>/jobs.sqlite``). Thread-safe; every method is a short
    synchronous call. Active jobs are also held in memory: ``get`` and ``list`` show their current progress
    even between the throttled progress writes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, keep: float = KEEP_S) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.RLock()
        self._active: dict[str, Job] = {}  # queued and running jobs: the current view
        self._dirty: set[str] = set()  # active jobs whose progress was not written yet
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.executescript(SCHEMA)
            self.interrupted = self._recover(keep)
        except BaseException:
            self.db.close()
            raise

    def _recover(self, keep: float) -> list[str]:
        """Jobs left queued or running by an earlier process become failed-interrupted; old ones go."""
        now = self.clock()
        with self._lock:
            ids = [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
            error = _dump(
                {
                    "code": "interrupted",
                    "message": "the daemon stopped while the job was queued or running",
                    "hint": "submit the job again; an interrupted restore never puts anything in its "
                    "target, and the daemon removes the partial copy in its staging directory beside the "
                    "target when it starts (its log names what it removed)",
                }
            )
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "UPDATE jobs SET state = 'failed-interrupted', finished = ?, error = ? "
                    "WHERE state IN ('queued', 'running')",
                    (now, error),
                )
                self.db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (now - keep,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return ids

    def close(self) -> None:
        with self._lock:
            for job_id in list(self._dirty):
                self._write_progress(job_id)
            self.db.close()

    def create(self, kind: JobKind, tenants: Iterable[str], who: str, request: Mapping[str, Any]) -> Job:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            tenants=tuple(dict.fromkeys(tenants)),
            who=who,
            request=json.loads(json.dumps(dict(request), default=str)),  # what the row holds, exactly
            state="queued",
            created=self.clock(),
            started=None,
            finished=None,
            progress={},
            result=None,
            error=None,
        )
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 12)})", _row(job))
                self.db.executemany(
                    "INSERT INTO job_tenants (job_id, tenant) VALUES (?, ?)",
                    [(job.id, t) for t in job.tenants],
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._active[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                return job
            row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(
        self,
        kind: JobKind | None = None,
        tenants: Iterable[str] | None = None,
        limit: int = 50,
        *,
        within: Iterable[str] | None = None,
    ) -> list[Job]:
        """Newest first; with `tenants`, only the jobs touching any of them; with `within`, only the jobs
        whose tenants are all among `within` (what a token scoped to those tenants may see: a drill of two
        tenants is not shown to a token of one of them)."""
        where: list[str] = []
        args: list[Any] = []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if tenants is not None:
            names = sorted(set(tenants))
            if not names:
                return []
            marks = ", ".join("?" * len(names))
            where.append(f"id IN (SELECT job_id FROM job_tenants WHERE tenant IN ({marks}))")
            args += names
        if within is not None:
            scope = sorted(set(within))
            marks = ", ".join("?" * len(scope))
            outside = f"tenant NOT IN ({marks})" if scope else "1"
            where.append(f"NOT EXISTS (SELECT 1 FROM job_tenants WHERE job_id = jobs.id AND {outside})")
            args += scope
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self.db.execute(sql, (*args, max(0, limit))).fetchall()
            return [self._active.get(r[0]) or _job(r) for r in rows]

    def update(self, job_id: str, **fields: Any) -> Job:
        """Set fields (state, started, finished, progress, result, error, request) and commit them. A job
        that reaches a finished state leaves the in-memory view."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"job fields that cannot be updated: {', '.join(sorted(unknown))}")
        if "state" in fields and fields["state"] not in ACTIVE | FINISHED:
            raise ValueError(f"unknown job state {fields['state']!r}")
        with self._lock:
            job = self.get(job_id)
            if job is None:
                raise JobNotFound("no such job", job=job_id)
            job = dataclasses.replace(job, **fields)
            row = _row(job)
            self.db.execute(
                "UPDATE jobs SET request = ?, state = ?, started = ?, finished = ?, progress = ?, "
                "result = ?, error = ? WHERE id = ?",
                (row[4], row[5], *row[7:], job_id),
            )
            self._dirty.discard(job_id)
            if job.state in ACTIVE:
                self._active[job_id] = job
            else:
                self._active.pop(job_id, None)
        return job

    def merge_progress(self, job_id: str, values: Mapping[str, Any]) -> None:
        """Merge keys into an active job's progress, in memory only (``flush_progress`` writes it). A job
        that has finished is left alone."""
        with self._lock:
            job = self._active.get(job_id)
            if job is None:
                return
            self._active[job_id] = dataclasses.replace(job, progress={**job.progress, **values})
            self._dirty.add(job_id)

    def flush_progress(self, job_id: str) -> None:
        """Write an active job's progress if it changed since the last write."""
        with self._lock:
            if job_id in self._dirty and job_id in self._active:
                self._write_progress(job_id)

    def _write_progress(self, job_id: str) -> None:
        job = self._active.get(job_id)
        self._dirty.discard(job_id)
        if job is not None:
            self.db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_dump(job.progress), job_id))


class JobRunner:
    """Runs jobs in this event loop, at most `max_running` at once, the others queued in submission order."""

    def __init__(
        self, store: JobStore, max_running: int, progress_interval: float = PROGRESS_INTERVAL
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.store = store
        self.max_running = max_running
        self.progress_interval = progress_interval
        self._slots = asyncio.Semaphore(max_running)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()  # cancelled by request (not by close)
        self._closing = False

    @property
    def running(self) -> int:
        return sum(1 for j in map(self.store.get, self._tasks) if j is not None and j.state == "running")

    async def submit(
        self, kind: JobKind, tenants: Iterable[str], who: str, request: Mapping[str, Any], work: Work
    ) -> Job:
        """Record the job (queued) and return it at once; `work` runs when a slot frees."""
        if self._closing:
            raise RunnerClosed("the job runner is shutting down")
        job = self.store.create(kind, tenants, who, request)
        task = asyncio.create_task(self._run(job.id, work), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job.id, None))
        return job

    async def _run(self, job_id: str, work: Work) -> None:
        store = self.store
        try:
            async with self._slots:
                current = store.get(job_id)
                if current is None or current.state != "queued":  # cancelled while it waited
                    return
                store.update(job_id, state="running", started=store.clock())
                flusher = asyncio.create_task(self._flush(job_id))
                try:
                    result = await work(lambda values: store.merge_progress(job_id, values))
                finally:
                    flusher.cancel()
                    await asyncio.gather(flusher, return_exceptions=True)
            self._finish(job_id, "succeeded", result=dict(result))
        except asyncio.CancelledError:
            if self._closing and job_id not in self._cancelled:
                self._finish(
                    job_id,
                    "failed-interrupted",
                    error={
                        "code": "interrupted",
                        "message": "the daemon stopped while the job was queued or running",
                        "hint": "submit the job again",
                    },
                )
            else:
                self._finish(
                    job_id, "cancelled", error={"code": "cancelled", "message": "cancelled on request"}
                )
        except DRError as exc:
            self._finish(job_id, "failed", error=error_dict(exc))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._finish(job_id, "failed", error=error_dict(exc))

    def _finish(self, job_id: str, state: JobState, **fields: Any) -> None:
        """The final state, written synchronously (a second cancel cannot leave it running)."""
        job = self.store.get(job_id)
        if job is None or job.done:
            return
        self.store.update(job_id, state=state, finished=self.store.clock(), **fields)

    async def _flush(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            await asyncio.to_thread(self.store.flush_progress, job_id)

    async def cancel(self, job_id: str, wait: bool = True) -> Job:
        """A queued job is cancelled at once. A running job's task is cancelled; its state becomes
        ``cancelled`` once the work has stopped (and cleaned up): awaited here unless `wait` is False.
        JobNotFound for an unknown id, JobFinished for a finished job."""
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound("no such job", job=job_id)
        if job.done:
            raise JobFinished(f"the job has already finished ({job.state})", job=job_id, state=job.state)
        self._cancelled.add(job_id)
        task = self._tasks.get(job_id)
        if job.state == "queued" or task is None:
            self._finish(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled on request"})
        if task is not None:
            task.cancel()
            if wait:
                await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        found = self.store.get(job_id)
        assert found is not None
        return found

    async def wait(self, job_id: str) -> Job:
        """The job once it has finished."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound("no such job", job=job_id)
        return job

    async def close(self) -> None:
        """Daemon shutdown: take no more jobs; cancel the queued and running ones, which become
        failed-interrupted once they have stopped. The store stays open (its owner closes it)."""
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "ACTIVE",
    "FINISHED",
    "JOBS_FILE",
    "KINDS",
    "Job",
    "JobError",
    "JobFinished",
    "JobKind",
    "JobNotFound",
    "JobRunner",
    "JobState",
    "JobStore",
    "ProgressSink",
    "RunnerClosed",
    "Work",
    "error_dict",
    "jobs_path",
]
