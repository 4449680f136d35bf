"""The worker process pool: routing is stable, and a killed worker fails one snapshot, not the next."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from helpers import init_app, local_sites, make_config, tree_state

from drsvc.core.errors import SnapshotError
from snapshot.reader import FileJob
from snapshot.workers import WorkerPool, routed_batches


def _job(size: int, offset: int = 0) -> FileJob:
    st = os.stat_result((0o100644, 1, 1, 1, 0, 0, size, 0, 0, 0))
    return FileJob("/x", "x", st, False, offset)


def test_routing_sends_identical_sizes_and_segments_to_one_worker() -> None:
    pool = WorkerPool.__new__(WorkerPool)
    pool.size = 2
    jobs = [_job(s) for s in (10, 10, 300_000, 300_000, 7, 7)]
    assert len({pool.route(j) for j in jobs[:2]}) == 1 and len({pool.route(j) for j in jobs[2:4]}) == 1
    batches = routed_batches(jobs, pool.route, small=256 * 1024, max_bytes=1 << 20, max_files=64)
    assert sorted(len(b) for _, b in batches if b[0].st.st_size >= 256 * 1024) == [1, 1]
    for w, batch in batches:
        assert all(pool.route(j) == w for j in batch)


async def test_a_killed_worker_fails_its_job_and_is_replaced(tmp_path: Path) -> None:
    pool = WorkerPool(2)
    try:
        await pool.warm()
        pid = await pool._on(0, os.getpid)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(SnapshotError, match="worker process 0 died"):
            await pool.read(0, [_job(10)])
        assert await pool._on(0, os.getpid) != pid  # a new process serves the next job
    finally:
        pool.close()


async def test_a_worker_killed_between_snapshots_does_not_fail_the_next(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(random.Random(i).randbytes(200_000 + i))
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])), in_process_bytes=0)
    try:
        await app.snapshot("docs")  # the workers have begun and finished one snapshot
        (src / "f0.bin").write_bytes(b"changed")
        for i in range(app.workers.size):
            os.kill(await app.workers._on(i, os.getpid), signal.SIGKILL)
        o = await app.snapshot("docs")  # an incremental: no warm-up, begin() meets the dead workers
        assert o.protection.protected and o.result.stats.files_read == 1
        await app.restore("docs", tmp_path / "out", None)
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)
