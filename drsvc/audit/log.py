"""The local log: appending (O_APPEND, fsync, head anchor), reading, verifying, expiring, and the sites'
replication watermarks."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drsvc.audit.record import (
    ALGORITHMS,
    EXPIRED,
    HEAD,
    KEEP_MIN_S,
    LOCK,
    REPLICATED,
    Anchor,
    AuditRecord,
    Line,
    canonical,
    digest,
    genesis,
    int_field,
    log_files,
    parse_record,
    read_json,
    read_lines,
    str_field,
)
from drsvc.audit.verdict import AuditVerdict, Scan, check_scan
from drsvc.core.durable import TMP_PREFIX, fsync_dir, make_dirs, write_file
from drsvc.core.errors import DRError

if TYPE_CHECKING:
    from drsvc.core.config import Config


@dataclass(frozen=True)
class Watermark:
    """The newest record shipped to a site, and the batch that carried it."""

    seq: int
    hash: str
    batch: str
    time_ns: int


class AuditLog:
    """The local audit log in one directory; thread-safe, one writing process at a time (flock)."""

    def __init__(
        self,
        dir: str | Path,
        *,
        hash: str = "sha256",
        keep_s: float = KEEP_MIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if hash not in ALGORITHMS:
            raise ValueError(f"unknown audit hash {hash!r}: use one of {', '.join(ALGORITHMS)}")
        self.dir = Path(dir)
        self.hash = hash
        self.keep_s = keep_s
        self.clock = clock
        self._lock = threading.Lock()  # appends, expiry
        self._marks_lock = threading.Lock()  # replicated.json
        self._fd: int | None = None
        self._file = ""
        self._floor = ""  # the newest file when the writer started: never write to an earlier one
        self._last: tuple[int, str] | None = None  # seq and hash of the newest record
        self._lock_fd: int | None = None
        self._firsts: dict[str, int] = {}  # file -> seq of its first record

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._close_file()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._last = None

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._file = None, ""

    def now_ns(self) -> int:
        return int(self.clock() * 1e9)

    # -- writing ------------------------------------------------------------------------------------

    def _start(self) -> None:
        """Take the writer's lock, end a torn last line, and find the newest record (or anchor)."""
        make_dirs(self.dir)
        if self._lock_fd is None:
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DRError(
                        "another process writes this audit log", path=str(self.dir), hint="run one daemon"
                    ) from None
                raise
            self._lock_fd = fd
        last: tuple[int, str] | None = None
        files = log_files(self.dir)
        self._floor = files[-1] if files else ""
        if files:
            path = self.dir / files[-1]
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):  # a write cut by a crash: end it, keep it as evidence
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for name in reversed(files):
            recs = [ln.record for ln in read_lines(self.dir / name) if ln.record is not None]
            if recs:
                top = max(recs, key=lambda r: r.seq)
                last = (top.seq, top.hash)
                break
        for anchor in (HEAD, EXPIRED):  # never reuse a seq the anchors know: that would hide a removal
            try:
                a = Anchor.load(self.dir / anchor)
            except ValueError:
                a = None
            if a is not None and (last is None or a.seq > last[0]):
                last = (a.seq, a.hash)
        self._last = last if last is not None else (0, genesis(self.hash))

    def _open_file(self, name: str) -> None:
        self._close_file()
        path = self.dir / name
        new = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = name
        if new:
            fsync_dir(self.dir)

    def append(
        self,
        *,
        who: str,
        action: str,
        target: Mapping[str, Any],
        result: str,
        status: int,
        tenant: str | None = None,
        remote: str | None = None,
        request_id: str | None = None,
    ) -> AuditRecord:
        """Write one record and fsync it; when this returns, the record survives a crash."""
        target_json = json.loads(json.dumps(dict(target), default=str, allow_nan=False))
        with self._lock:
            if self._last is None:
                self._start()
            assert self._last is not None
            now = self.now_ns()
            name = f"audit-{dt.datetime.fromtimestamp(now // 10**9, dt.UTC):%Y%m%d}.jsonl"
            name = max(name, self._file, self._floor)  # never back to an earlier file (clock steps back)
            if name != self._file or self._fd is None:
                self._open_file(name)
            assert self._fd is not None
            seq, prev = self._last[0] + 1, self._last[1]
            body = AuditRecord(
                seq, now, who, action, target_json, result, int(status), tenant, remote, request_id, prev, ""
            ).to_json()
            del body["hash"]
            h = digest(self.hash, canonical(body))
            rec = AuditRecord(
                seq, now, who, action, target_json, result, int(status), tenant, remote, request_id, prev, h
            )
            line = canonical(rec.to_json()) + b"\n"
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError:
                self._close_file()
                self._last = None  # the next append starts again: ends a torn line, re-reads the newest
                raise
            self._last = (seq, h)
            self._write_head(Anchor(seq, h, now))
            return rec

    def _write_head(self, a: Anchor) -> None:
        """Replace head.json: fsync'd, not the directory (a stale head after a crash is harmless)."""
        tmp = self.dir / f"{TMP_PREFIX}head"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, canonical(a.to_json()))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / HEAD)

    # -- reading ------------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[tuple[str, int]], Anchor | None, Anchor | None, list[str]]:
        """The files and their sizes now, with the anchors read first (a record appended meanwhile is
        beyond the sizes and newer than the head read)."""
        errors: list[str] = []
        anchors: list[Anchor | None] = []
        with self._lock:
            for name in (HEAD, EXPIRED):
                try:
                    anchors.append(Anchor.load(self.dir / name))
                except ValueError as exc:
                    errors.append(str(exc))
                    anchors.append(None)
            files = []
            for name in log_files(self.dir):
                try:
                    files.append((name, (self.dir / name).stat().st_size))
                except FileNotFoundError:
                    continue  # expired meanwhile
        return files, anchors[0], anchors[1], errors

    def _scan(self) -> Scan:
        files, head, base, errors = self._snapshot()
        lines: list[Line] = []
        for name, size in files:
            lines.extend(read_lines(self.dir / name, size))
        return Scan(len(files), lines, head, base, errors)

    def records(self, since_ns: int = 0) -> Iterator[AuditRecord]:
        """The readable records in file order, those at or after `since_ns`."""
        for name, size in self._snapshot()[0]:
            for ln in read_lines(self.dir / name, size):
                if ln.record is not None and ln.record.time_ns >= since_ns:
                    yield ln.record

    def after(self, seq: int, limit: int) -> list[Line]:
        """Up to `limit` record lines with seqs above `seq`, in file order, from the files that may hold
        them (the last file whose first record is at or before seq + 1, and those after it)."""
        files = self._snapshot()[0]
        start = 0
        for i, (name, _size) in enumerate(files):
            first = self._first_seq(name)
            if first is not None and first <= seq + 1:
                start = i
        out: list[Line] = []
        for name, size in files[start:]:
            for ln in read_lines(self.dir / name, size):
                if ln.record is not None and ln.record.seq > seq:
                    out.append(ln)
                    if len(out) >= limit:
                        return out
        return out

    def _first_seq(self, name: str) -> int | None:
        """The seq of a file's first line, if it is a record (cached: files only grow)."""
        if name not in self._firsts:
            with open(self.dir / name, "rb") as f:
                line = f.readline()
            if not line.endswith(b"\n"):
                return None
            try:
                self._firsts[name] = parse_record(line[:-1]).seq
            except ValueError:
                return None
        return self._firsts[name]

    def verify(self) -> AuditVerdict:
        """Check every file against the chain and the anchors (the sites: ``verify_with_sites``)."""
        return self.verify_scan()[1]

    def verify_scan(self) -> tuple[Scan, AuditVerdict]:
        scan = self._scan()
        verdict = AuditVerdict(str(self.dir), files=scan.files)
        check_scan(scan, verdict, self.keep_s, self.now_ns())
        return scan, verdict

    # -- expiry -------------------------------------------------------------------------------------

    def expire(self, shipped_to: Sequence[str] = ()) -> list[str]:
        """Delete the oldest files whose records are all older than `keep_s`, never the newest file;
        first record the newest deleted record in expired.json. The names of the files deleted.
        With `shipped_to` (the audit tenant's sites), a file goes only once every one of those sites holds
        its records (by the replication watermarks): a site down for longer than `keep` delays expiry
        rather than losing records that exist nowhere else."""
        cutoff = self.now_ns() - int(self.keep_s * 1e9)
        with self._lock:
            files = log_files(self.dir)
            gone: list[str] = []
            newest: AuditRecord | None = None
            marks = self.watermarks() if shipped_to else {}
            shipped = min((marks[s].seq if s in marks else 0 for s in shipped_to), default=None)
            for name in files[:-1]:
                recs = [ln.record for ln in read_lines(self.dir / name) if ln.record is not None]
                if any(r.time_ns >= cutoff for r in recs):
                    break
                if shipped is not None and any(r.seq > shipped for r in recs):
                    break
                day = dt.datetime.strptime(name[6:14], "%Y%m%d").replace(tzinfo=dt.UTC)
                if not recs and (day.timestamp() + 86400) * 1e9 >= cutoff:
                    break
                gone.append(name)
                if recs:
                    newest = max(recs, key=lambda r: r.seq)
            if not gone:
                return []
            if newest is not None:
                try:
                    old = Anchor.load(self.dir / EXPIRED)
                except ValueError:
                    old = None
                if old is None or newest.seq > old.seq:
                    anchor = Anchor(newest.seq, newest.hash, newest.time_ns)
                    write_file(self.dir / EXPIRED, canonical(anchor.to_json()))
            for name in gone:
                (self.dir / name).unlink(missing_ok=True)
            fsync_dir(self.dir)
            return gone

    # -- replication watermarks ---------------------------------------------------------------------

    def watermarks(self) -> dict[str, Watermark]:
        """Per site, the newest record shipped there (an unreadable file: nothing shipped yet)."""
        try:
            d = read_json(self.dir / REPLICATED) or {}
            return {
                site: Watermark(
                    int_field(w["seq"]), str_field(w["hash"]), str_field(w["batch"]), int_field(w["time_ns"])
                )
                for site, w in d.items()
            }
        except (ValueError, KeyError, TypeError):
            return {}

    def set_watermark(self, site: str, mark: Watermark) -> None:
        with self._marks_lock:
            marks = self.watermarks()
            if site in marks and marks[site].seq >= mark.seq:
                return
            marks[site] = mark
            body = {
                s: {"seq": m.seq, "hash": m.hash, "batch": m.batch, "time_ns": m.time_ns}
                for s, m in sorted(marks.items())
            }
            write_file(self.dir / REPLICATED, json.dumps(body, indent=1).encode())


def audit_dir(config: Config) -> Path:
    return config.audit.dir if config.audit.dir is not None else config.state.dir / "audit"


def open_log(config: Config, clock: Callable[[], float] = time.time) -> AuditLog:
    """The audit log the config describes ([audit] dir, hash, keep)."""
    return AuditLog(audit_dir(config), hash=config.audit.hash, keep_s=config.audit.keep, clock=clock)
