"""PostgreSQL's WAL files on this host: names, the incoming directory `drsvc wal-push` fills, its checks.

Standard library only (plus ``durable`` and ``errors``, which are too): `drsvc wal-push` (archive_command)
and the cached path of `drsvc wal-fetch` (restore_command) run once per WAL segment, and a Python that
imports the repository's machinery starts ten times slower than one that imports this.

The incoming directory of a source, written by wal-push as PostgreSQL's user, emptied by the daemon:

    <state.dir>/incoming/wal/<source>/<WAL file name>         a copy: fsync'd, with the original's mtime
    <state.dir>/incoming/wal/<source>/.sysid                  the cluster's system identifier, decimal
    <state.dir>/incoming/wal/<source>/.done/<WAL file name>   "size mtime_ns sha256" of a file already spooled
    <state.dir>/incoming/wal/<source>/.tmp-<hex>              a copy being written

1. wal-push copies the file into a temporary file of that directory, sets the original's mtime, fsyncs it,
   links it to its name (a link, unlike a rename, never replaces an existing name) and fsyncs the directory.
   Only then does it exit 0: the file survives a crash of this host from that moment on.
2. A name that is already there (or in ``.done``) with the same content is success, with other content an
   error: PostgreSQL retries, an operator looks, archived WAL is never overwritten. Same size and mtime count
   as same content (rsync's quick check), else the bytes (or their SHA-256, for ``.done``) are compared.
3. A segment's first page names its cluster (system identifier). The first segment pushed records it in
   ``.sysid``; a segment of another cluster is refused (two clusters configured with one source).
4. The daemon spools each file (``snapshot.wal``), then writes its ``.done`` marker, then removes it.
"""

from __future__ import annotations

import errno
import os
import struct

from drsvc.core.durable import TMP_PREFIX, fsync_dir
from drsvc.core.errors import DRError

# PostgreSQL's WAL, history and backup-history file names, as archive_command passes them (= layout.Kind.WAL:
# ^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$), checked without `re`, whose import
# and compilation cost wal-push a few milliseconds a call
_UPPER_HEX = frozenset("0123456789ABCDEF")
# XLogLongPageHeaderData: magic u16, info u16, timeline u32, pageaddr u64, rem_len u32, (pad 4), sysid u64,
# seg_size u32, xlog_blcksz u32 (host byte order: a segment is read on the kind of host that wrote it)
LONG_HEADER = struct.Struct("=HHIQI4xQII")
XLP_LONG_HEADER = 0x0002
MIN_SEG_SIZE, MAX_SEG_SIZE = 1 << 20, 1 << 30
DONE_DIR = ".done"
SYSID_FILE = ".sysid"
LOCK_FILE = ".lock"  # in a prefetch cache directory
PREFETCH_DIR = "drsvc-prefetch"  # wal-fetch's cache, next to the file PostgreSQL asked for (in pg_wal)
COPY_CHUNK = 8 * 1024 * 1024


class WalPushError(DRError):
    """wal-push refused a file or could not make it durable; PostgreSQL keeps it and retries."""

    hint = "PostgreSQL keeps the file in pg_wal and retries archive_command; fix the cause named above"


def incoming_dir(state_dir: str | os.PathLike[str], source: str) -> str:
    return os.path.join(os.fspath(state_dir), "incoming", "wal", source)


# ---- names ------------------------------------------------------------------------------------------


def _hex(text: str) -> bool:
    return bool(text) and _UPPER_HEX.issuperset(text)


def is_wal_name(name: str) -> bool:
    """A segment (24 hex digits), a partial segment (+ ``.partial``), a backup-history file (+ ``.`` 8 hex
    digits ``.backup``) or a timeline-history file (8 hex digits ``.history``); hex in upper case."""
    if len(name) == 24:
        return _hex(name)
    if len(name) == 32 and name.endswith(".partial"):
        return _hex(name[:24])
    if len(name) == 40 and name[24] == "." and name.endswith(".backup"):
        return _hex(name[:24]) and _hex(name[25:33])
    return len(name) == 16 and name.endswith(".history") and _hex(name[:8])


def is_segment(name: str) -> bool:
    """A whole WAL segment's name (24 hex digits: timeline, then the segment number in two halves)."""
    return len(name) == 24 and _hex(name)


def segments_per_id(seg_size: int) -> int:
    return 0x100000000 // seg_size


def parse_segment(name: str, seg_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a segment name."""
    if not is_segment(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    tli, hi, lo = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    return tli, hi * segments_per_id(seg_size) + lo


def segment_name(tli: int, segno: int, seg_size: int) -> str:
    per = segments_per_id(seg_size)
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


def next_segments(name: str, seg_size: int, n: int) -> list[str]:
    """The `n` segment names after `name` on its timeline."""
    tli, segno = parse_segment(name, seg_size)
    return [segment_name(tli, segno + i, seg_size) for i in range(1, n + 1)]


def parse_lsn(text: str) -> int:
    """``"0/2000028"`` -> 0x2000028."""
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def seg_size_from(lsn: int, tli: int, file_name: str) -> int:
    """The segment size under which `lsn` lies in `file_name` (a backup_label names both)."""
    size = MIN_SEG_SIZE
    while size <= MAX_SEG_SIZE:
        if segment_name(tli, lsn // size, size) == file_name:
            return size
        size *= 2
    raise ValueError(f"LSN {format_lsn(lsn)} does not lie in {file_name} for any WAL segment size")


# ---- checks -----------------------------------------------------------------------------------------


def read_long_header(fd: int) -> tuple[int, int]:
    """(system identifier, segment size) from a segment's first page header; ValueError if it has none."""
    head = os.pread(fd, LONG_HEADER.size, 0)
    if len(head) < LONG_HEADER.size:
        raise ValueError("too short for a WAL page header")
    _magic, info, _tli, _addr, _rem, sysid, seg_size, blcksz = LONG_HEADER.unpack(head)
    if not info & XLP_LONG_HEADER or not _power_of_two(seg_size, MIN_SEG_SIZE, MAX_SEG_SIZE):
        raise ValueError("its first page has no WAL long page header")
    if not _power_of_two(blcksz, 1024, 65536):
        raise ValueError(f"WAL block size {blcksz} is not one PostgreSQL uses")
    return sysid, seg_size


def _power_of_two(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and n & (n - 1) == 0


def _same_bytes(path: str, fd: int) -> bool:
    with open(path, "rb") as f:
        offset = 0
        while True:
            a = f.read(COPY_CHUNK)
            b = os.pread(fd, COPY_CHUNK, offset)
            if a != b:
                return False
            if not a:
                return True
            offset += len(a)


def sha256_fd(fd: int) -> str:
    import hashlib  # only for a file pushed again after it was spooled: not on every push

    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, COPY_CHUNK, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def marker_text(size: int, mtime_ns: int, sha256: str) -> str:
    return f"{size} {mtime_ns} {sha256}\n"


def parse_marker(text: str) -> tuple[int, int, str]:
    size, mtime_ns, digest = text.split()
    return int(size), int(mtime_ns), digest


# ---- wal-push ---------------------------------------------------------------------------------------


def push(src: str, d: str) -> bool:
    """Make `src` durable in the source's incoming directory `d`. True if copied, False if it was already
    there (same content). Raises WalPushError for anything that must not be acknowledged to PostgreSQL."""
    name = os.path.basename(src)
    if not is_wal_name(name):
        raise WalPushError(f"not a PostgreSQL WAL, history or backup file name: {name!r}", path=src)
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise WalPushError(f"cannot read the WAL file: {exc.strerror}", path=src) from None
    try:
        st = os.fstat(fd)
        sysid = _check_segment(fd, st.st_size, name, src)
        try:
            _make_dirs(d)
            if _already_there(d, name, fd, st):
                return False
            if sysid is not None:
                _check_cluster(d, sysid, src)
            if _copy_into(fd, st, d, name):
                return True
            if _already_there(d, name, fd, st):  # a concurrent push of the same file linked it first
                return False
            raise WalPushError("the file appeared and went while it was pushed; PostgreSQL retries", path=src)
        except OSError as exc:
            raise WalPushError(
                f"cannot write the incoming directory: {exc.strerror}",
                path=exc.filename or d,
                hint=f"PostgreSQL's OS user needs write access to {d}; PostgreSQL retries meanwhile",
            ) from None
    finally:
        os.close(fd)


def _check_segment(fd: int, size: int, name: str, src: str) -> int | None:
    """The system identifier of a segment (None for history and backup files)."""
    if not (is_segment(name) or name.endswith(".partial")):
        return None
    try:
        sysid, seg_size = read_long_header(fd)
    except ValueError as exc:
        raise WalPushError(f"not a WAL segment: {exc}", path=src) from None
    if size != seg_size:
        raise WalPushError(f"WAL segment is {size} bytes, its header says {seg_size}", path=src)
    return sysid


def _make_dirs(d: str) -> None:
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    _make_dirs(parent)
    try:
        os.mkdir(d, 0o750)
    except FileExistsError:
        return
    fsync_dir(parent)  # the new entry must survive a crash like the files in it


def _already_there(d: str, name: str, fd: int, st: os.stat_result) -> bool:
    """Whether the incoming directory holds (or spooled) `name` with the content of `fd`; WalPushError if it
    holds other content."""
    path = os.path.join(d, name)
    try:
        have = os.stat(path)
    except FileNotFoundError:
        return _already_spooled(d, name, fd, st)
    if (have.st_size, have.st_mtime_ns) == (st.st_size, st.st_mtime_ns) or (
        have.st_size == st.st_size and _same_bytes(path, fd)
    ):
        fsync_dir(d)  # it may have been linked by a push that crashed before this fsync
        return True
    raise WalPushError(
        "refusing to overwrite an archived WAL file with different content",
        path=path,
        hint="two clusters, or a restored copy, archive into this source; give each its own source",
    )


def _already_spooled(d: str, name: str, fd: int, st: os.stat_result) -> bool:
    try:
        with open(os.path.join(d, DONE_DIR, name)) as f:
            size, mtime_ns, digest = parse_marker(f.read())
    except (FileNotFoundError, ValueError):
        return False
    if (size, mtime_ns) == (st.st_size, st.st_mtime_ns) or (size == st.st_size and sha256_fd(fd) == digest):
        return True
    raise WalPushError(
        "refusing to archive again a WAL file already archived with different content",
        path=os.path.join(d, DONE_DIR, name),
        hint="two clusters, or a restored copy, archive into this source; give each its own source",
    )


def _check_cluster(d: str, sysid: int, src: str) -> None:
    path = os.path.join(d, SYSID_FILE)
    if not os.path.exists(path):  # the first segment pushed (a concurrent first push may win: read it back)
        _write_new(d, SYSID_FILE, f"{sysid}\n".encode())
    try:
        with open(path) as f:
            recorded = int(f.read().strip())
    except ValueError:
        raise WalPushError("the recorded system identifier is unreadable", path=path) from None
    if recorded != sysid:
        raise WalPushError(
            f"the WAL file belongs to database system {sysid}, this source archives system {recorded}",
            path=src,
            hint=f"give the other cluster its own source (or, if this cluster replaced the old one for good, "
            f"remove {path})",
        )


def _write_new(d: str, name: str, data: bytes) -> None:
    """Create `d/name` with `data`, durably, unless it exists."""
    tmp = os.path.join(d, f"{TMP_PREFIX}{os.urandom(12).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _link(tmp, d, name)
    finally:
        os.unlink(tmp)


def _copy_into(src_fd: int, st: os.stat_result, d: str, name: str) -> bool:
    """Copy `src_fd` to `d/name` (temp file, mtime, fsync, link, fsync dir). False if the name appeared."""
    tmp = os.path.join(d, f"{TMP_PREFIX}{os.urandom(12).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        try:
            copy_fd(src_fd, fd, st.st_size)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
            # The copy is read once more, by the daemon, seconds later: keeping its pages cached only makes
            # the next push wait while the kernel reclaims memory for fresh ones (37 -> 75 ms a call once the
            # cache is full, in benchmarks/wal.py). Written and fsync'd, they are clean and drop at once.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return _link(tmp, d, name)
    finally:
        os.unlink(tmp)


def _link(tmp: str, d: str, name: str) -> bool:
    try:
        os.link(tmp, os.path.join(d, name))
    except FileExistsError:
        return False
    fsync_dir(d)
    return True


def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes from offset 0 of `src` to `dst` in the kernel (copy_file_range, else sendfile)."""
    offset = 0
    use_cfr = True
    while offset < size:
        try:
            if use_cfr:
                n = os.copy_file_range(src, dst, size - offset, offset)
            else:
                n = os.sendfile(dst, src, offset, size - offset)
        except OSError as exc:
            if use_cfr and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                use_cfr = False
                continue
            raise
        if n == 0:
            raise OSError(errno.EIO, "the file shrank while it was copied")
        offset += n


# ---- wal-fetch's prefetch cache ---------------------------------------------------------------------


def take_cached(cache_dir: str, name: str, dest: str) -> bool:
    """Move a prefetched file to `dest` (where PostgreSQL asked for it). False if it is not cached."""
    path = os.path.join(cache_dir, name)
    try:
        os.rename(path, dest)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # pg_wal on another file system than the cache: copy, then drop the cached file
    tmp = f"{dest}.drsvc-{os.urandom(6).hex()}"
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            copy_fd(src, out, os.fstat(src).st_size)
        finally:
            os.close(out)
        os.rename(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)
    os.unlink(path)
    return True


def try_lock(path: str) -> int | None:
    """Take the lock file `path` (one prefetcher at a time): its file descriptor, or None if another
    process holds it. The lock lasts while any process holds the descriptor (a spawned child
    inherits it)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def cached_ahead(cache_dir: str, name: str, seg_size: int, n: int) -> int:
    """How many of the `n` segments after `name` are in the cache, counting until the first missing one."""
    count = 0
    for nxt in next_segments(name, seg_size, n):
        if not os.path.exists(os.path.join(cache_dir, nxt)):
            break
        count += 1
    return count
