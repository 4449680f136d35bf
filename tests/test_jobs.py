"""Jobs: the SQLite store (round trip, restart, pruning, listing) and the runner (limit, cancel, errors)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsvc.core.errors import DRError, RestoreError
from drsvc.jobs import (
    Job,
    JobFinished,
    JobNotFound,
    JobRunner,
    JobStore,
    ProgressSink,
    RunnerClosed,
)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0  # every reading is later: "newest first" is well defined
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(tmp_path / "jobs.sqlite", clock=Clock())
    yield s
    s.close()


def raw_row(path: Path, job_id: str) -> dict[str, Any]:
    """The row as another connection sees it (what survives a crash)."""
    db = sqlite3.connect(path)
    try:
        state, progress = db.execute("SELECT state, progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return {"state": state, "progress": json.loads(progress)}


def test_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path, clock=Clock())
    job = s.create("restore", ["fin", "fin", "hr"], "alice", {"source": "docs", "target": Path("/r/x")})
    assert len(job.id) == 32 and job.id == job.id.lower() and int(job.id, 16) >= 0
    assert job.state == "queued" and job.tenants == ("fin", "hr") and job.request["target"] == "/r/x"
    assert s.get(job.id) == job
    s.update(job.id, state="running", started=1_800_000_005.0, progress={"bytes_done": 1})
    done = s.update(job.id, state="succeeded", finished=1_800_000_009.0, result={"rpo_achieved_s": 1.5})
    s.close()

    s = JobStore(path, clock=Clock())
    try:
        again = s.get(job.id)
        assert again == done
        assert again.state == "succeeded" and again.result == {"rpo_achieved_s": 1.5}
        d = again.to_dict()
        json.dumps(d)
        assert d["started_at"] == "2027-01-15T08:00:05.000Z" and d["tenants"] == ["fin", "hr"]
        assert s.get("0" * 32) is None
        with pytest.raises(JobNotFound):
            s.update("0" * 32, state="failed")
        with pytest.raises(ValueError):
            s.update(job.id, id="x")
    finally:
        s.close()


def test_restart_marks_queued_and_running_jobs_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path, clock=Clock())
    queued = s.create("restore", ["fin"], "a", {})
    running = s.create("drill", ["fin"], "a", {})
    s.update(running.id, state="running", started=s.clock())
    ok = s.create("restore", ["fin"], "a", {})
    s.update(ok.id, state="succeeded", finished=s.clock(), result={})
    s.db.close()  # a crash: nothing flushed or closed in order

    s = JobStore(path, clock=Clock())
    try:
        assert sorted(s.interrupted) == sorted([queued.id, running.id])
        for j in (queued, running):
            got = s.get(j.id)
            assert got is not None and got.state == "failed-interrupted"
            assert got.error is not None and got.error["code"] == "interrupted" and got.finished
        assert s.get(ok.id).state == "succeeded"  # type: ignore[union-attr]
    finally:
        s.close()


def test_old_finished_jobs_are_pruned_on_open(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    clock = Clock()
    s = JobStore(path, clock=clock)
    old = s.create("restore", ["fin"], "a", {})
    s.update(old.id, state="failed", finished=clock.t, error={"code": "x", "message": "y"})
    s.close()
    clock.t += 29 * 86400
    recent = JobStore(path, clock=clock)
    new = recent.create("restore", ["fin"], "a", {})
    recent.update(new.id, state="succeeded", finished=clock.t, result={})
    recent.close()
    clock.t += 2 * 86400
    s = JobStore(path, clock=clock)
    try:
        assert s.get(old.id) is None
        assert s.get(new.id) is not None
    finally:
        s.close()


def test_list_newest_first_with_filters(store: JobStore) -> None:
    a = store.create("restore", ["fin"], "a", {})
    b = store.create("drill", ["hr", "fin"], "a", {})
    c = store.create("restore", ["hr"], "a", {})
    assert [j.id for j in store.list()] == [c.id, b.id, a.id]
    assert [j.id for j in store.list(kind="restore")] == [c.id, a.id]
    assert [j.id for j in store.list(tenants=["fin"])] == [b.id, a.id]
    assert [j.id for j in store.list(tenants=["hr", "ops"], kind="drill")] == [b.id]
    assert store.list(tenants=[]) == []
    assert [j.id for j in store.list(limit=1)] == [c.id]


def test_list_within_a_scope_shows_only_jobs_wholly_inside_it(store: JobStore) -> None:
    """A token of one tenant must not see a drill that also touches another tenant (it would read that
    tenant's scenarios and report): `within` keeps the jobs whose tenants are all in the scope."""
    a = store.create("restore", ["fin"], "a", {})
    b = store.create("drill", ["hr", "fin"], "a", {})
    c = store.create("restore", ["hr"], "a", {})
    assert [j.id for j in store.list(within=["fin"])] == [a.id]
    assert [j.id for j in store.list(within=["hr"])] == [c.id]
    assert [j.id for j in store.list(within=["fin", "hr", "ops"])] == [c.id, b.id, a.id]
    assert [j.id for j in store.list(kind="drill", within=["fin", "hr"])] == [b.id]
    assert store.list(within=["ops"]) == [] and store.list(within=[]) == []
    assert [j.id for j in store.list(within=["fin", "hr"], limit=1)] == [c.id]


async def test_concurrency_limit_second_job_waits_queued(store: JobStore) -> None:
    runner = JobRunner(store, max_running=1)
    release = {1: asyncio.Event(), 2: asyncio.Event()}
    started: list[int] = []

    def slow(n: int) -> Any:
        async def work(progress: ProgressSink) -> dict[str, Any]:
            started.append(n)
            await release[n].wait()
            return {"n": n}

        return work

    first = await runner.submit("restore", ["fin"], "a", {}, slow(1))
    second = await runner.submit("restore", ["fin"], "a", {}, slow(2))
    assert first.state == "queued" and second.state == "queued"  # returned at once
    for _ in range(20):
        await asyncio.sleep(0)
    assert started == [1]
    assert store.get(first.id).state == "running"  # type: ignore[union-attr]
    assert store.get(second.id).state == "queued"  # type: ignore[union-attr]
    assert runner.running == 1
    release[1].set()
    assert (await runner.wait(first.id)).result == {"n": 1}
    for _ in range(20):
        await asyncio.sleep(0)
    assert started == [1, 2] and store.get(second.id).state == "running"  # type: ignore[union-attr]
    release[2].set()
    done = await runner.wait(second.id)
    assert done.state == "succeeded" and done.result == {"n": 2} and done.started and done.finished
    await runner.close()


async def test_cancel_queued_and_running(store: JobStore) -> None:
    runner = JobRunner(store, max_running=1)
    entered = asyncio.Event()
    cleaned: list[str] = []
    ran: list[str] = []

    async def blocking(progress: ProgressSink) -> dict[str, Any]:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that itself awaits
            cleaned.append("done")
            raise
        return {}

    async def never(progress: ProgressSink) -> dict[str, Any]:
        ran.append("never")
        return {}

    running = await runner.submit("restore", ["fin"], "a", {}, blocking)
    queued = await runner.submit("restore", ["fin"], "a", {}, never)
    await entered.wait()

    got = await runner.cancel(queued.id)
    assert got.state == "cancelled" and got.error is not None and got.error["code"] == "cancelled"
    got = await runner.cancel(running.id)
    assert got.state == "cancelled" and cleaned == ["done"]  # the state comes once the work has stopped
    await asyncio.sleep(0.05)
    assert ran == []
    with pytest.raises(JobFinished):
        await runner.cancel(running.id)
    with pytest.raises(JobNotFound):
        await runner.cancel("f" * 32)
    await runner.close()


class CodedError(DRError):
    code = "unknown_site"


async def test_failures_become_failed_with_their_codes(store: JobStore) -> None:
    runner = JobRunner(store, max_running=2)

    async def drerror(progress: ProgressSink) -> dict[str, Any]:
        raise RestoreError("no snapshot at or before the requested time", source="docs", path=Path("/x"))

    async def coded(progress: ProgressSink) -> dict[str, Any]:
        raise CodedError("no such site", site="mars")

    async def bug(progress: ProgressSink) -> dict[str, Any]:
        raise KeyError("oops")

    jobs = [await runner.submit("restore", ["fin"], "a", {}, w) for w in (drerror, coded, bug)]
    done = [await runner.wait(j.id) for j in jobs]
    assert [j.state for j in done] == ["failed"] * 3
    errors = [j.error for j in done]
    assert errors[0] == {
        "code": "restore_error",
        "message": "no snapshot at or before the requested time",
        "hint": "",
        "source": "docs",
        "path": "/x",
    }
    assert errors[1] is not None and errors[1]["code"] == "unknown_site" and errors[1]["site"] == "mars"
    assert errors[2] is not None and errors[2]["code"] == "internal" and "oops" in errors[2]["message"]
    await runner.close()


async def test_progress_is_current_in_memory_and_throttled_in_sqlite(store: JobStore) -> None:
    runner = JobRunner(store, max_running=1, progress_interval=0.2)
    step = asyncio.Event()
    go_on = asyncio.Event()

    async def work(progress: ProgressSink) -> dict[str, Any]:
        progress({"site": "a"})
        for i in range(1, 101):
            progress({"bytes_done": i})
        step.set()
        await go_on.wait()
        return {}

    job = await runner.submit("restore", ["fin"], "a", {}, work)
    await step.wait()
    assert store.get(job.id).progress == {"site": "a", "bytes_done": 100}  # type: ignore[union-attr]
    assert [j.progress for j in store.list()] == [{"site": "a", "bytes_done": 100}]
    assert raw_row(store.path, job.id)["progress"] == {}  # not written yet: at most every 0.2 s
    await asyncio.sleep(0.35)
    assert raw_row(store.path, job.id) == {"state": "running", "progress": {"site": "a", "bytes_done": 100}}
    go_on.set()
    done = await runner.wait(job.id)
    assert done.progress == {"site": "a", "bytes_done": 100}
    assert raw_row(store.path, job.id)["state"] == "succeeded"
    await runner.close()


async def test_close_interrupts_running_and_queued_jobs(store: JobStore) -> None:
    runner = JobRunner(store, max_running=1)
    entered = asyncio.Event()

    async def forever(progress: ProgressSink) -> dict[str, Any]:
        entered.set()
        await asyncio.Event().wait()
        return {}

    a = await runner.submit("drill", ["fin"], "a", {}, forever)
    b = await runner.submit("drill", ["fin"], "a", {}, forever)
    await entered.wait()
    await runner.close()
    for j in (a, b):
        got = store.get(j.id)
        assert isinstance(got, Job) and got.state == "failed-interrupted"
        assert got.error is not None and got.error["code"] == "interrupted"
    with pytest.raises(RunnerClosed):
        await runner.submit("drill", ["fin"], "a", {}, forever)
