"""Base backups of a postgres source: pg_basebackup into a directory, snapshotted as a tree.

1. ``pg_basebackup -D <dir> -Fp -X none -c fast --no-sync -d <conninfo>``: a plain copy of the cluster with
   its backup_label. ``-X none`` makes the server wait until the WAL the backup needs is archived
   (archive_command is `drsvc wal-push`), so when it returns that WAL is in the incoming directory.
2. When running as root, the copy's files get the owner of the source's data directory, so that a restore
   lays them down for PostgreSQL's user.
3. The caller spools the waiting WAL first (outbox order: a base backup's record reaches a site after the
   WAL it needs), snapshots the directory as the source with ``backup_config`` (fixed, page-aligned chunks:
   a changed page changes its chunk only), and removes the directory.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from drsvc.core.config import SourceConfig
from drsvc.core.errors import SnapshotError
from drsvc.core.pgbackup import BackupStart, parse_backup_label

STDERR_TAIL = 2000


@dataclass(frozen=True)
class BaseBackup:
    path: Path
    start: BackupStart


async def pg_basebackup(bindir: Path, conninfo: str, target: Path, source: str) -> BaseBackup:
    """Run pg_basebackup into `target` (an empty directory); SnapshotError with its messages on failure."""
    args = [
        str(bindir / "pg_basebackup"),
        *("-D", str(target), "-F", "p", "-X", "none", "-c", "fast", "--no-sync"),
        *("-l", f"drsvc {source}", "-d", conninfo),
    ]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise SnapshotError(
            f"cannot run pg_basebackup: {exc.strerror}",
            source=source,
            path=args[0],
            hint=f"install PostgreSQL's client programs or set sources.{source}.pg_bindir",
        ) from None
    try:
        _, err = await proc.communicate()
    except BaseException:  # cancelled (the caller's timeout, a shutdown): no pg_basebackup left behind
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise SnapshotError(
            f"pg_basebackup failed with exit code {proc.returncode}: "
            f"{err.decode(errors='replace').strip()[-STDERR_TAIL:]}",
            source=source,
            hint=f"check sources.{source}.conninfo and that pg_hba.conf allows a replication connection; "
            "pg_basebackup -X none also waits until archive_command has archived the backup's WAL",
        )
    return await asyncio.to_thread(read_backup, target, source)


def read_backup(path: Path, source: str) -> BaseBackup:
    try:
        return BaseBackup(path, parse_backup_label((path / "backup_label").read_text()))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"the base backup has no usable backup_label: {exc}", source=source) from None


def adopt_owner(tree: Path, like: Path) -> None:
    """Give every entry of `tree` the owner of `like` (when root, and `like` exists on this host)."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(like)
    except OSError:
        return
    os.lchown(tree, st.st_uid, st.st_gid)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), st.st_uid, st.st_gid)


def backup_config(config: SourceConfig, path: Path) -> SourceConfig:
    """The settings a base backup directory is snapshotted with: a tree at `path`, everything in it (an
    excluded file would break the backup), every file cut into fixed page-aligned chunks."""
    return config.model_copy(update={"type": "tree", "path": path, "exclude": (), "page_files": ("*",)})
