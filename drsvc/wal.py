"""The postgres source, wired to an App: WAL ingest, base backups, wal-fetch and restore.

- ``ingest_wal(app, source)``: what the daemon runs for a postgres source whenever its incoming directory
  holds files (and what a base backup runs first): spool them, return their keys.
- ``take_base_backup(app, source)``: pg_basebackup, the waiting WAL spooled, a tree snapshot of the copy as
  the source (spool only, like ``App.snapshot_to_spool``), the copy removed.
- ``fetch_wal`` / ``prefetch_wal``: the work of `drsvc wal-fetch` on a restore host (no daemon, no state).
- ``restore_postgres(app, source, target, at_ns)``: ``App.restore`` for a postgres source.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shlex
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import snapshot
from drsvc.app import App
from drsvc.core import pgwal
from drsvc.core.config import SourceConfig
from drsvc.core.durable import write_file
from drsvc.core.errors import ConfigError
from drsvc.core.pgbackup import default_bindir
from drsvc.core.repository import Repository, gather_limited
from drsvc.core.walobject import WalFile, WalSealer
from restore.postgres import PostgresRestoreResult
from restore.postgres import restore_postgres as restore_postgres_repo
from restore.wal import WalMissing
from restore.wal import fetch_wal as fetch_wal_repo
from restore.writer import Progress as RestoreProgress
from snapshot.postgres import adopt_owner, backup_config, pg_basebackup
from snapshot.wal import WalIngest, pending_wal

PREFETCH_CONCURRENCY = 4
INGEST_CONCURRENCY = 4


def postgres_source(app: App, source: str) -> SourceConfig:
    sc = app.config.source(source)
    if sc.type != "postgres":
        raise ConfigError(
            f"source {source!r} is a {sc.type} source, not postgres", key=f"sources.{source}.type"
        )
    return sc


def pg_bindir(sc: SourceConfig) -> Path | None:
    return sc.pg_bindir if sc.pg_bindir is not None else default_bindir()


def incoming(app: App, source: str) -> Path:
    """Where `drsvc wal-push` leaves the source's WAL files: its `incoming` setting, else under the state
    directory (the same rule as ``wal_fast.incoming_for``)."""
    sc = app.config.source(source)
    return sc.incoming if sc.incoming is not None else Path(pgwal.incoming_dir(app.config.state.dir, source))


def _checked_site(sc: SourceConfig, source: str, site: str | None) -> str | None:
    if site is not None and site not in sc.sites:
        raise ConfigError(
            f"site {site!r} is not in the copy policy of source {source!r}", key=f"sources.{source}.sites"
        )
    return site


async def _repo(app: App, sc: SourceConfig, site: str | None = None, isolate: bool = False) -> Repository:
    """The tenant's repository, read from the source's own sites (`site` first, if given; only `site`
    with `isolate`)."""
    repo = await app.open_repo(sc.tenant, site)
    names = [site] if site is not None else []
    others = [] if isolate else [n for n in sc.sites if n != site]
    repo.stores = [app.store(n) for n in [*names, *others]]
    return repo


# ---- the daemon's side ------------------------------------------------------------------------------


async def ingest_wal(app: App, source: str) -> list[str]:
    """Spool every WAL file waiting in the source's incoming directory (``snapshot.wal``); their keys, in
    name order (a file found spooled before, after a crash, counts). Crash-safe: a file leaves the incoming
    directory only after its spool put returned. Needs the tenant's key: a site must have answered once."""
    sc = postgres_source(app, source)
    where = incoming(app, source)
    names = await asyncio.to_thread(pending_wal, where)
    if not names:
        return []
    repo = await _repo(app, sc)
    ingest = WalIngest(
        WalSealer(repo.keys, repo.params.compression_level),
        repo.layout,
        source,
        repo.keys.source_tag(source),
        app.spool,
        sc.sites,
        where,
    )
    loop = asyncio.get_running_loop()
    keys = await gather_limited(
        min(app.worker_count, INGEST_CONCURRENCY),  # each holds a segment a few times over (~64 MiB)
        [functools.partial(loop.run_in_executor, app.pool, ingest.ingest, n) for n in names],
    )
    return [k for k in keys if k is not None]


async def take_base_backup(
    app: App, source: str, progress: Callable[[snapshot.Stats], None] | None = None
) -> snapshot.SnapshotResult:
    """A base backup of a postgres source into the spool; the daemon's shippers (or ``replicator.replicate``)
    move it to the sites. The record's time is after pg_basebackup returned: a restore to any later time can
    start from it."""
    sc = postgres_source(app, source)
    if not sc.conninfo:
        raise ConfigError(
            "a postgres source needs conninfo to take base backups",
            key=f"sources.{source}.conninfo",
            hint="a libpq connection string for pg_basebackup, e.g. 'host=/var/run/postgresql user=postgres'",
        )
    bindir = pg_bindir(sc)
    if bindir is None:
        raise ConfigError(
            "PostgreSQL's programs were not found in /usr/lib/postgresql/*/bin",
            key=f"sources.{source}.pg_bindir",
        )
    tmp = await asyncio.to_thread(_backup_dir, app.config.state.dir / "basebackup", source)
    try:
        await pg_basebackup(bindir, sc.conninfo, tmp, source)
        await asyncio.to_thread(adopt_owner, tmp, sc.path)
        await ingest_wal(app, source)  # the WAL the backup needs goes into the outbox before its record
        repo = await _repo(app, sc)
        return await snapshot.take_snapshot(
            source,
            backup_config(sc, tmp),
            repo,
            app.spool,
            [app.store(n) for n in sc.sites],
            app.cache_dir,
            app.pool,
            app.workers,
            progress,
            app.in_process_bytes,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _backup_dir(root: Path, source: str) -> Path:
    """A new empty directory for one base backup; what a crashed earlier one left is removed."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in root.glob(f"{source}.*"):
        shutil.rmtree(old, ignore_errors=True)
    path = root / f"{source}.{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    return path


# ---- a restore host's side --------------------------------------------------------------------------


async def fetch_wal(app: App, source: str, name: str, *, only_site: str | None = None) -> WalFile:
    """One WAL file from the first site holding an intact copy (``restore.wal.fetch_wal``), or from
    `only_site` alone: WalMissing when no reachable site has it, another DRError when it could not be read."""
    sc = postgres_source(app, source)
    repo = await _repo(app, sc, _checked_site(sc, source, only_site), isolate=only_site is not None)
    return await fetch_wal_repo(repo, source, name)


async def prefetch_wal(
    app: App, source: str, after: str, seg_size: int, count: int, cache: Path, *, only_site: str | None = None
) -> list[str]:
    """Fetch the `count` segments after `after` into `cache` (in order, stopping at the first the archive
    lacks); the names written. Stops when `cache` is removed (recovery ended)."""
    sc = postgres_source(app, source)
    wanted = [n for n in pgwal.next_segments(after, seg_size, count) if not (cache / n).exists()]
    if not wanted:
        return []
    repo = await _repo(app, sc, _checked_site(sc, source, only_site), isolate=only_site is not None)
    sem = asyncio.Semaphore(PREFETCH_CONCURRENCY)

    async def one(name: str) -> WalFile:
        async with sem:
            return await fetch_wal_repo(repo, source, name)

    tasks = [asyncio.ensure_future(one(n)) for n in wanted]
    written: list[str] = []
    try:
        for name, task in zip(wanted, tasks, strict=True):
            try:
                wal = await task
            except WalMissing:
                break
            if not await asyncio.to_thread(_cache_file, cache, name, wal.data):
                break
            written.append(name)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return written


def _cache_file(cache: Path, name: str, data: bytes) -> bool:
    """Write one prefetched file (fsync'd: PostgreSQL reads it after a crash too); False once the cache
    directory is gone (recovery ended and removed it): it is not made again."""
    if not cache.is_dir():
        return False
    write_file(cache / name, data, True, 0o600)
    return True


def default_drsvc_command() -> list[str]:
    """How PostgreSQL can run this drsvc: the `drsvc` script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("drsvc")
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "drsvc.cli.main"]


def wal_fetch_command(drsvc: Sequence[str], config: Path, source: str, only_site: str | None = None) -> str:
    """restore_command: `drsvc -c CONFIG wal-fetch [--only-site SITE] SOURCE %f %p`, quoted for the shell
    PostgreSQL uses."""
    only = ["--only-site", only_site] if only_site is not None else []
    return f"{shlex.join([*drsvc, '-c', str(config), 'wal-fetch', *only, source])} %f %p"


async def restore_postgres(
    app: App,
    source: str,
    target: Path,
    at_ns: int | None,
    site: str | None = None,
    *,
    drsvc: Sequence[str] | None = None,
    keep_archiving: bool = False,
    progress: Callable[[RestoreProgress], None] | None = None,
    isolate: bool = False,
) -> PostgresRestoreResult:
    """``App.restore`` for a postgres source: the base backup for `at_ns` in `target`, with recovery settings
    whose restore_command runs `drsvc` (default: this installation) with this config file."""
    sc = postgres_source(app, source)
    _checked_site(sc, source, site)
    if app.config.path is None:
        raise ConfigError(
            "restore_command needs the config file's path; load the config from a file", key="config"
        )
    # isolated (a drill): PostgreSQL's recovery fetches the WAL from that site alone too
    only_site = site if isolate else None
    config = app.config.path.absolute()
    command = wal_fetch_command(drsvc or default_drsvc_command(), config, source, only_site)
    return await restore_postgres_repo(
        await _repo(app, sc, site, isolate),
        source,
        target,
        at_ns,
        command,
        pg_bindir=pg_bindir(sc),
        keep_archiving=keep_archiving,
        progress=progress,
    )
