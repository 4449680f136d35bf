"""Where a snapshot's file jobs run: in this process while the work is small, in worker processes after.

Worker processes pay ~0.3 s to start and each holds its own copy of the dedup set, which an incremental
snapshot of a few changed files does not recover. So the first ``local_limit`` bytes are read by an
in-process reader on one thread; the worker processes begin (with the dedup set as it stands then) only
when a snapshot turns out to be larger, and from then on take every job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from snapshot.reader import FileJob, FileOut, FileReader
from snapshot.workers import WorkerContext, WorkerPool, WorkerTotals

LOCAL_LIMIT = 64 * 1024 * 1024


def job_bytes(job: FileJob) -> int:
    return job.length if job.length >= 0 else max(0, job.st.st_size - job.offset)


class Dispatcher:
    def __init__(
        self,
        workers: WorkerPool,
        context: Callable[[], WorkerContext],
        local: FileReader,
        local_limit: int = LOCAL_LIMIT,
    ) -> None:
        self.workers = workers
        self._context = context
        self.local = local
        self.local_limit = local_limit
        self._local_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader")
        self._local_bytes = 0
        self._begun: asyncio.Future[None] | None = None
        # two batches in flight per worker: one running, one waiting in its pipe
        self._slots = [asyncio.Semaphore(2) for _ in range(workers.size)]

    def route(self, job: FileJob) -> int:
        return self.workers.route(job)

    async def read(self, worker: int, batch: list[FileJob]) -> list[FileOut]:
        size = sum(job_bytes(j) for j in batch)
        if self._begun is None and self._local_bytes + size <= self.local_limit:
            self._local_bytes += size
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._local_exec, self.local.read_batch, batch)
        if self._begun is None:
            self._begun = asyncio.ensure_future(self.workers.begin(self._context()))
        await self._begun
        async with self._slots[worker]:
            return await self.workers.read(worker, batch)

    async def finish(self) -> WorkerTotals | None:
        """Flush the workers' packs, if they were used; the caller flushes the local reader's packer."""
        await asyncio.to_thread(self._local_exec.shutdown, True)
        if self._begun is None:
            return None
        await self._begun
        return await self.workers.finish()

    async def abort(self) -> None:
        await asyncio.to_thread(self._local_exec.shutdown, True, cancel_futures=True)
        if self._begun is not None:
            await self.workers.abort()
