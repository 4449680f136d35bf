"""Reading a postgres source's WAL archive: fetch one file from any site, list it, find the end of replay.

``fetch_wal`` is what `drsvc wal-fetch` (restore_command) does. Its outcome tells PostgreSQL apart two cases
that it must never confuse: the file exists nowhere (normal: recovery asks past the end of the archive, or
for the next timeline's history), or it could not be read (a site down, every copy corrupt), where replay
must stop rather than end early and promote a cluster with data missing.

1. Try each site in order (the preferred one first): the first copy that verifies (AEAD, name, source,
   length) is returned; every failed site is recorded as a fallback.
2. No copy verified: if some site holds a corrupt copy, IntegrityError; else if some site answered that it
   has no such object, WalMissing (sites that could not be reached may lag, but one surviving site must be
   enough to restore); else (no site answered) the last store error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from drsvc.core import pgwal
from drsvc.core.errors import IntegrityError, ObjectNotFound, RestoreError, StoreError
from drsvc.core.layout import Handle, Kind
from drsvc.core.repository import Fallback, Repository, dctx
from drsvc.core.walobject import WalFile, open_wal


class WalMissing(RestoreError):
    """No reachable site holds the WAL file: to PostgreSQL, the end of the archive."""

    hint = "normal when recovery looks past the end of the archive or for a timeline that does not exist"


async def fetch_wal(repo: Repository, source: str, name: str) -> WalFile:
    key = repo.layout.key(Handle(Kind.WAL, name, repo.keys.source_tag(source)))
    missing: list[str] = []
    corrupt: list[str] = []
    last: StoreError | None = None
    for store in repo.stores:
        try:
            sealed = await store.get(key)
            repo.report.requests += 1
            repo.report.bytes_fetched += len(sealed)
            return await asyncio.to_thread(open_wal, repo.keys, source, name, sealed, dctx())
        except ObjectNotFound as exc:
            missing.append(store.name)
            error: StoreError | IntegrityError = exc
        except IntegrityError as exc:
            corrupt.append(f"{store.name}: {exc.message}")
            error = exc
        except StoreError as exc:
            last = error = exc
        repo.report.fallbacks.append(Fallback(store.name, key, error.message))
    if corrupt:
        raise IntegrityError(f"no intact copy of {name} at any site ({'; '.join(corrupt)})", key=key)
    if missing:
        raise WalMissing(f"{name} is not in the archive", source=source, sites=", ".join(missing))
    assert last is not None
    raise last


@dataclass
class WalListing:
    """The WAL file names found at the sites, and the sites that could not be listed."""

    names: dict[str, set[str]] = field(default_factory=dict)  # name -> sites holding it
    unreachable: dict[str, str] = field(default_factory=dict)  # site -> error


async def list_wal(repo: Repository, source: str) -> WalListing:
    tag = repo.keys.source_tag(source)
    out = WalListing()
    for store in repo.stores:
        try:
            handles = await repo.list_handles(Kind.WAL, tag, store=store)
        except StoreError as exc:
            out.unreachable[store.name] = exc.message
            continue
        for h in handles:
            out.names.setdefault(h.name, set()).add(store.name)
    return out


# pg_waldump --rmgr=Transaction, TZ=UTC: "... desc: COMMIT 2026-11-25 11:08:35.123456 UTC; ..."
_XACT = re.compile(
    r"desc: (?:COMMIT|ABORT)(?:_PREPARED)?(?: \d+:)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC"
)


def parse_xact_times(waldump_output: str) -> list[int]:
    """The times (ns since the epoch) of the commit and abort records pg_waldump printed."""
    out = []
    for m in _XACT.finditer(waldump_output):
        t = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
        out.append(int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000)
    return out


async def xact_times(pg_bindir: Path, wal: WalFile) -> list[int]:
    """Commit and abort times in one segment, read by pg_waldump (the only records a time target stops at).
    OSError if pg_waldump cannot run."""
    with tempfile.TemporaryDirectory(prefix="drsvc-waldump-") as tmp:
        path = Path(tmp) / wal.name
        await asyncio.to_thread(path.write_bytes, wal.data)
        proc = await asyncio.create_subprocess_exec(
            str(pg_bindir / "pg_waldump"),
            "--rmgr=Transaction",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # it ends every partly filled segment with an error line
            env={**os.environ, "TZ": "UTC", "LC_ALL": "C"},
        )
        out, _ = await proc.communicate()
    return parse_xact_times(out.decode(errors="replace"))


def by_segment(names: dict[str, set[str]], seg_size: int, min_tli: int) -> dict[int, str]:
    """Segment number -> the name replay would use for it: the highest timeline at or above `min_tli`."""
    out: dict[int, tuple[int, str]] = {}
    for name in names:
        if not pgwal.is_segment(name):
            continue
        tli, segno = pgwal.parse_segment(name, seg_size)
        if tli >= min_tli and (segno not in out or out[segno][0] < tli):
            out[segno] = (tli, name)
    return {segno: name for segno, (_, name) in out.items()}
