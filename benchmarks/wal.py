"""WAL archiving (issue 6): `drsvc wal-push` against `pgbackrest archive-push`, sync and async, per call.

    python -m benchmarks.wal [--segments 100] [--rounds 3] [--work /tmp/bench-wal] [--process-max 2]
                             [--scale 10] [--json benchmarks/results/wal.json] [--profile | --no-profile]

1. pgBackRest is installed when missing (`apt-get install -y pgbackrest`, Debian's package), PostgreSQL too.
2. A throw-away PostgreSQL cluster, run as `postgres` on a free port with a socket in the work directory,
   makes real 16 MiB WAL segments: `pgbench -i`, then rounds of `pgbench` (2 clients); every third round
   also runs a batch UPDATE of 2% of the rows and a `pg_switch_wal()`; until `--segments` segments after
   the first are archived by `cp %p`. Those segments are the input of every case, byte for byte, mlock'd
   (this VM's DAMON evicts page cache unused for seconds; just-written WAL is in the page cache).
3. pgBackRest gets two configurations per round, each with its own local repository (repo1-path),
   compress-type=zst, repo1-cipher-type=aes-256-cbc with a pass, and a stanza made by `stanza-create`
   against that cluster (which is then stopped: archive-push reads only pg_control). The async ones add
   archive-async=y, process-max and a spool-path. drsvc gets a config (and a state directory) per round.
4. Each case archives the same segments from the stopped cluster's pg_wal, emptied and filled with them
   (hard links) and an archive_status/<segment>.ready file for each (a backlog, as PostgreSQL leaves it
   when archiving lags: pgBackRest's async mode pushes ahead from these), one call at a time, as
   PostgreSQL's archiver does: `/bin/sh -c ARCHIVE_COMMAND` as `postgres`, in the data directory,
   %p = pg_wal/<segment>. Each call is timed from spawn to exit. After a call returns, the segment's
   .ready becomes .done (PostgreSQL's step) and the benchmark checks that the segment is where the tool
   promises it to be. Each round runs the three cases, in an order rotated from round to round.
5. drsvc's daemon side, `drsvc.wal.ingest_wal` (read, compress, seal, spool with fsync), then spools what
   each round's wal-push calls left, in this process, timed.
6. When drsvc misses the target (or with --profile): python's start alone, `-X importtime` and `strace -c`
   of wal-push calls, and the steps of `pgwal.push` timed one by one (copy, fsync, link), also with
   posix_fadvise(DONTNEED) after the fsync.

Everything runs as `postgres` (PostgreSQL refuses root). `postgres` cannot run this venv's interpreter when it
lies under /root, so drsvc runs through a launcher script: the system's Python of the same version with this
checkout and the venv's packages on sys.path, like an installed console script (see tests/test_postgres.py).
Bytecode goes to a directory of its own (PYTHONPYCACHEPREFIX), warmed first: an installed drsvc has its .pyc.
benchmarks/README.md ("WAL archiving") says what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import glob
import json
import math
import mmap
import os
import pwd
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEG = 16 * 1024 * 1024
MiB = 1024 * 1024
STANZA = "bench"
SOURCE = "pg"
TENANT = "bench"
RESULTS = Path(__file__).parent / "results" / "wal.json"
CHECKOUT = Path(__file__).resolve().parents[1]
DRSVC = str(Path(sys.executable).with_name("drsvc"))


# ---- running things as `postgres` ----------------------------------------------------------------------


@dataclass(frozen=True)
class PgUser:
    uid: int
    gid: int
    home: str

    @classmethod
    def get(cls) -> PgUser:
        pw = pwd.getpwnam("postgres")
        return cls(pw.pw_uid, pw.pw_gid, pw.pw_dir)

    def spawn_kwargs(self) -> dict[str, Any]:
        """subprocess options that run the child as `postgres` (no PAM, no extra process: cheap per call)."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self, pycache: Path) -> dict[str, str]:
        """The environment of a child: what PostgreSQL's archiver would pass, plus the bytecode directory."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.home,
            "LANG": "C.UTF-8",
            "PYTHONPYCACHEPREFIX": str(pycache),
        }

    def own(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            for p in paths:
                os.chown(p, self.uid, self.gid)

    def mkdir(self, path: Path, mode: int = 0o700) -> Path:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        path.chmod(mode)
        self.own(path)
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apt_install(package: str) -> None:
    """`apt-get install -y PACKAGE`, with an `apt-get update` first when the lists are missing or stale."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True)


def pg_bindir() -> Path:
    def newest() -> Path | None:
        found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if Path(d, "pgbench").exists()]
        return max(found, key=lambda d: int(d.parent.name), default=None)

    if newest() is None:
        print("PostgreSQL is not installed: apt-get install -y postgresql", file=sys.stderr)
        apt_install("postgresql")
    bindir = newest()
    if bindir is None:
        raise SystemExit("PostgreSQL's programs are not in /usr/lib/postgresql/*/bin")
    return bindir


def ensure_pgbackrest() -> str:
    if shutil.which("pgbackrest") is None:
        print("pgBackRest is not installed: apt-get install -y pgbackrest", file=sys.stderr)
        apt_install("pgbackrest")
    out = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


# ---- a throw-away cluster that makes real WAL ----------------------------------------------------------


class Cluster:
    """One PostgreSQL cluster run by `postgres`, archiving every finished segment with `cp`."""

    def __init__(self, bindir: Path, home: Path, user: PgUser) -> None:
        self.bindir, self.home, self.user = bindir, home, user
        self.datadir = home / "pgdata"
        self.archive = home / "archived"
        self.log = home / "postgres.log"
        self.port = free_port()
        self.env = user.env(home / "pycache")

    def run(self, *args: str, timeout: float = 600) -> str:
        r = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.home,
            **self.user.spawn_kwargs(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {r.stderr.strip()}\n{self.log_tail()}")
        return str(r.stdout)

    def init(self) -> None:
        self.user.mkdir(self.archive, 0o755)
        self.run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync")
        archive = f"test ! -f {self.archive}/%f && cp %p {self.archive}/%f"
        settings = {
            "port": str(self.port),
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.home}'",
            "shared_buffers": "128MB",
            "max_wal_size": "1GB",
            "checkpoint_timeout": "30s",  # checkpoints now and then: full-page images, as on a real server
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": "'" + archive.replace("'", "''") + "'",
            "fsync": "off",  # only makes the WAL faster to make: its content is the same
            "synchronous_commit": "off",
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self) -> None:
        self.run("pg_ctl", "start", "-w", "-t", "120", "-D", str(self.datadir), "-l", str(self.log))

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self.run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.datadir))

    def conn(self) -> list[str]:
        return ["-h", str(self.home), "-p", str(self.port), "-U", "postgres"]

    def sql(self, query: str) -> str:
        return self.run(
            "psql", *self.conn(), "-d", "postgres", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", query
        ).strip()

    def archived(self) -> list[str]:
        return sorted(n for n in os.listdir(self.archive) if len(n) == 24 and not n.startswith("."))

    def system_id(self) -> int:
        out = self.run("pg_controldata", "-D", str(self.datadir))
        line = next(x for x in out.splitlines() if x.startswith("Database system identifier"))
        return int(line.rpartition(":")[2])

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def make_wal(self, want: int, scale: int) -> dict[str, Any]:
        """Write load until `want` segments after the first one are archived; what was done."""
        started = time.monotonic()
        self.run("pgbench", *self.conn(), "-i", "-q", "-s", str(scale), "postgres")
        rounds = switches = 0
        while len(self.archived()) < want + 1:
            self.run("pgbench", *self.conn(), "-n", "-c", "2", "-j", "2", "-T", "2", "postgres")
            rounds += 1
            if rounds % 3 == 0:  # a batch job touching 2% of the rows, then a switch (archive_timeout's)
                self.sql(
                    f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50 = {rounds % 50}"
                )
                self.sql("SELECT pg_switch_wal()")
                switches += 1
        return {
            "pgbench_init_scale": scale,
            "pgbench_rounds": rounds,
            "pgbench_round_seconds": 2,
            "pg_switch_wal_calls": switches,
            "seconds": round(time.monotonic() - started, 1),
        }


def segment_stats(paths: Sequence[Path]) -> dict[str, Any]:
    """How the segments compress (zstd level 3, pgBackRest's default for zst) and how many were switched
    early (end in at least 1 MiB of zeros)."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    raw = packed = early = 0
    for p in paths:
        data = p.read_bytes()
        raw += len(data)
        packed += len(cctx.compress(data))
        early += data.endswith(bytes(MiB))
    return {
        "count": len(paths),
        "bytes": raw,
        "zstd3_ratio": round(packed / raw, 3),
        "switched_early": early,
    }


# ---- pgBackRest ----------------------------------------------------------------------------------------


@dataclass
class PgBackRest:
    """One pgBackRest configuration (sync or async) with its own repository."""

    name: str
    home: Path
    cluster: Cluster
    user: PgUser
    asynchronous: bool
    process_max: int
    cipher_pass: str = field(default_factory=lambda: os.urandom(24).hex())

    @property
    def repo(self) -> Path:
        return self.home / f"repo-{self.name}"

    @property
    def config(self) -> Path:
        return self.home / f"pgbackrest-{self.name}.conf"

    def write(self) -> None:
        for d in (
            self.repo,
            self.home / "pgbr-log",
            self.home / "pgbr-lock",
            self.home / f"spool-{self.name}",
        ):
            self.user.mkdir(d, 0o750)
        options = {
            "repo1-path": str(self.repo),
            "repo1-cipher-type": "aes-256-cbc",
            "repo1-cipher-pass": self.cipher_pass,
            "compress-type": "zst",
            "log-path": str(self.home / "pgbr-log"),
            "lock-path": str(self.home / "pgbr-lock"),
            "log-level-console": "warn",
        }
        if self.asynchronous:
            options |= {
                "archive-async": "y",
                "process-max": str(self.process_max),
                "spool-path": str(self.home / f"spool-{self.name}"),
            }
        stanza = {
            "pg1-path": str(self.cluster.datadir),
            "pg1-port": str(self.cluster.port),
            "pg1-socket-path": str(self.cluster.home),
        }
        text = "[global]\n" + "".join(f"{k}={v}\n" for k, v in options.items())
        text += f"\n[{STANZA}]\n" + "".join(f"{k}={v}\n" for k, v in stanza.items())
        self.config.write_text(text)
        self.config.chmod(0o640)
        self.user.own(self.config)

    def command(self) -> str:
        return f"pgbackrest --config={shlex.quote(str(self.config))} --stanza={STANZA} archive-push %p"

    def stanza_create(self) -> None:
        r = subprocess.run(
            ["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", "stanza-create"],
            capture_output=True,
            text=True,
            env=self.cluster.env,
            cwd=self.home,
            **self.user.spawn_kwargs(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"pgbackrest stanza-create ({self.name}) failed: {r.stdout}{r.stderr}")

    def holds(self, name: str) -> bool:
        """The segment is in the repository (compressed, encrypted): what archive-push returning means."""
        return bool(glob.glob(f"{self.repo}/archive/{STANZA}/*/{name[:16]}/{name}-*"))

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no pgBackRest process (the async one) holds a lock of this stanza."""
        deadline = time.monotonic() + timeout
        for lock in glob.glob(str(self.home / "pgbr-lock" / f"{STANZA}*.lock")):
            while True:
                try:
                    fd = os.open(lock, os.O_RDONLY)
                except FileNotFoundError:
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{lock} still held after {timeout} s") from None
                    time.sleep(0.05)
                finally:
                    os.close(fd)


# ---- drsvc ---------------------------------------------------------------------------------------------


def system_python() -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(version, path="/usr/bin:/bin")
    if python is None:
        raise SystemExit(f"`postgres` cannot run {sys.executable}, and there is no /usr/bin/{version}")
    return python


def drsvc_launcher(home: Path, user: PgUser) -> tuple[list[str], list[str]]:
    """(how `postgres` runs this checkout's drsvc, the interpreter and flags under it)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import drsvc.cli.main"], capture_output=True, **user.spawn_kwargs()
        )
        if probe.returncode == 0:
            return [DRSVC], [sys.executable]
    except PermissionError:
        pass
    # the venv's interpreter lies where `postgres` may not go (under /root): the system's Python of the same
    # version, with the checkout and the venv's packages first on sys.path, as a console script would run
    python = system_python()
    paths = [str(CHECKOUT), sysconfig.get_paths()["purelib"]]
    launcher = home / "drsvc"
    launcher.write_text(
        f"#!{python} -s\nimport sys\nsys.path[:0] = {paths!r}\n"
        "from drsvc.cli.main import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    return [str(launcher)], [python, "-s"]


def drsvc_config(home: Path, user: PgUser, datadir: Path) -> Path:
    """A config with one postgres source on a local site; its state directory belongs to `postgres`."""
    state = user.mkdir(home / "state", 0o750)
    text = (
        f'[state]\ndir = "{state}"\n'
        f'[tenants.{TENANT}.key.passphrase]\nvalue = "bench passphrase"\n'
        f'[sites.local]\ntype = "local"\npath = "{home / "site"}"\n'
        f'[sources.{SOURCE}]\ntenant = "{TENANT}"\ntype = "postgres"\npath = "{datadir}"\nsites = ["local"]\n'
    )
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)
    config = home / "drsvc.toml"
    config.write_text(text)
    config.chmod(0o644)
    return config


def incoming(config_home: Path) -> Path:
    return config_home / "state" / "incoming" / "wal" / SOURCE


# ---- the measurement -----------------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs archive_command lines the way PostgreSQL's archiver does, as `postgres`."""

    user: PgUser
    cwd: Path  # the data directory
    env: dict[str, str]
    log: Path

    def call(self, command: str) -> float:
        """Run one command line through /bin/sh; its wall time from spawn to exit (it must exit 0)."""
        with open(self.log, "ab") as err:
            started = time.perf_counter()
            r = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                **self.user.spawn_kwargs(),
            )
            took = time.perf_counter() - started
        if r.returncode != 0:
            tail = self.log.read_text(errors="replace").splitlines()[-10:]
            raise RuntimeError(f"`{command}` exited {r.returncode}:\n" + "\n".join(tail))
        return took


def pct(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    total = sum(seconds)
    return {
        "calls": len(seconds),
        "seconds_sum": round(total, 3),
        "seg_per_s": round(len(seconds) / total, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(pct(ordered, 0.99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(total / len(seconds) * 1000, 1),
        "per_call_ms": [round(s * 1000, 2) for s in seconds],
    }


def fresh_pg_wal(datadir: Path, sources: Sequence[Path], user: PgUser) -> Path:
    """The (stopped) cluster's pg_wal, holding only the segments and a .ready file for each.
    pgBackRest's async mode reads archive_status beside the file and refuses one outside pg1-path. The
    segments are hard links to the archived copies: writing 1.6 GiB of copies before each case would
    load the disk (and the host's cache under a VM) with writes that are no tool's."""
    pg_wal = datadir / "pg_wal"
    if pg_wal.exists():
        shutil.rmtree(pg_wal)
    status = user.mkdir(pg_wal / "archive_status")
    user.own(pg_wal)
    pg_wal.chmod(0o700)
    for src in sources:
        dst = pg_wal / src.name
        os.link(src, dst)
        dst.chmod(0o600)
        user.own(dst)
        ready = status / f"{src.name}.ready"
        ready.touch()
        user.own(ready)
    return pg_wal


def archive_all(
    runner: Runner, template: str, pg_wal: Path, names: Sequence[str], promised: Callable[[str], bool]
) -> dict[str, Any]:
    """One call per segment, in order, as PostgreSQL's archiver makes them; then .ready -> .done."""
    os.sync()  # what an earlier case left dirty is not this case's to write back
    time.sleep(2.0)
    probe, probe_files = disk_probe(pg_wal.parent.parent, pg_wal / names[0])
    seconds: list[float] = []
    kept = 0
    started = time.perf_counter()
    for name in names:
        seconds.append(runner.call(template.replace("%p", f"{pg_wal.name}/{name}")))
        kept += promised(name)
        status = pg_wal / "archive_status"
        os.rename(status / f"{name}.ready", status / f"{name}.done")
    out = summary(seconds)
    out["elapsed_s"] = round(time.perf_counter() - started, 3)
    out["promise_kept"] = kept
    out["disk_probe_ms"] = probe
    for f in probe_files:
        f.unlink()
    return out


class Pinned:
    """Files mapped and mlock'd by this process: their pages stay in the page cache until ``release``.

    This VM runs DAMON's pageout scheme (kdamond), which evicts page-cache pages nobody touched for a few
    seconds. The segments of a backlog would then be read from the disk by whichever call comes to them
    late, and the cases would differ by when each segment was last read. PostgreSQL's archiver gets
    segments PostgreSQL has just written, so every case gets them from the page cache."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        i, size = ctypes.c_int, ctypes.c_size_t
        self.libc.mmap.argtypes = [ctypes.c_void_p, size, i, i, i, ctypes.c_long]
        self.libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.maps: list[tuple[int, int]] = []
        try:
            for p in paths:
                self._pin(p)
        except BaseException:
            self.release()
            raise

    def _pin(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            addr = self.libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        self.maps.append((addr, size))
        if self.libc.mlock(addr, size) != 0:
            raise OSError(ctypes.get_errno(), f"mlock {path}")

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.maps)

    def release(self) -> None:
        for addr, size in self.maps:
            self.libc.munmap(addr, size)
        self.maps.clear()


def disk_probe(workdir: Path, src: Path, n: int = 3) -> tuple[float, list[Path]]:
    """How long a 16 MiB copy + fsync into a new file takes right now (median of n, ms), and the files.
    On this VM it tells the state a case starts in: a few ms while the kernel hands out pages the host
    has backed, about 40 ms more when the host must back them first. The files are removed only after the
    case: removing them before would hand it pages of the fast kind."""
    took = []
    files = [workdir / f"disk-probe-{i}" for i in range(n)]
    fd = os.open(src, os.O_RDONLY)
    try:
        for path in files:
            started = time.perf_counter()
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                done = 0
                while done < SEG:
                    done += os.copy_file_range(fd, out, SEG - done, done)
                os.fsync(out)
            finally:
                os.close(out)
            took.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return round(statistics.median(took) * 1000, 1), files


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_ingest(config: Path, names: Sequence[str]) -> dict[str, Any]:
    """`drsvc.wal.ingest_wal` on what wal-push left: the daemon's side, timed in this process."""
    from drsvc import wal
    from drsvc.app import App
    from drsvc.core.config import load_config
    from drsvc.core.crypto import ScryptParams

    async def run() -> dict[str, Any]:
        async with App(load_config(config)) as app:
            await app.init_tenant(TENANT, ScryptParams())
            await app.open_repo(TENANT)  # the key, as a running daemon holds it
            os.sync()
            started = time.perf_counter()
            keys = await wal.ingest_wal(app, SOURCE)
            took = time.perf_counter() - started
            spooled = sum(app.spool.path(k).stat().st_size for k in keys)
            return {
                "workers": app.worker_count,
                "segments": len(keys),
                "seconds": round(took, 3),
                "seg_per_s": round(len(keys) / took, 1),
                "spooled_bytes": spooled,
                "all_spooled": sorted(k.rpartition("/")[2] for k in keys) == sorted(names),
            }

    return asyncio.run(run())


# ---- profile of one wal-push ---------------------------------------------------------------------------

STEPS = r"""
import json, os, sys, time
sys.path[:0] = PATHS
t0 = time.perf_counter()
from drsvc.core import pgwal
from drsvc.core.durable import fsync_dir
from pathlib import Path
t_import = time.perf_counter() - t0
out = {"import_pgwal_ms": round(t_import * 1000, 2), "steps": [], "steps_dontneed": []}
NAMES = ("open_check", "copy", "fsync_file", "link_fsync_dir")


def push(src, d, dontneed):
    # pgwal.push's steps for a new file; with dontneed, the copy's pages leave the page cache after the fsync
    t = [time.perf_counter()]
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    st = os.fstat(fd)
    pgwal.read_long_header(fd)
    t.append(time.perf_counter())
    tmp = os.path.join(d, ".tmp-" + os.urandom(12).hex())
    out_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    pgwal.copy_fd(fd, out_fd, st.st_size)
    os.utime(out_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    t.append(time.perf_counter())
    os.fsync(out_fd)
    if dontneed:
        os.posix_fadvise(out_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t.append(time.perf_counter())
    os.close(out_fd)
    os.link(tmp, os.path.join(d, os.path.basename(src)))
    fsync_dir(Path(d))
    os.unlink(tmp)
    t.append(time.perf_counter())
    os.close(fd)
    return {k: round((b - a) * 1000, 2) for k, a, b in zip(NAMES, t, t[1:])}


for src in SRC:
    step = push(src, DEST, False)
    try:  # what if the call wrote zstd -1 output instead of the raw segment
        import zstandard
        t1 = time.perf_counter()
        data = zstandard.ZstdCompressor(level=1).compress(open(src, "rb").read())
        t2 = time.perf_counter()
        p = os.path.join(DEST, ".zst-" + os.path.basename(src))
        fd2 = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd2, data)
        t3 = time.perf_counter()
        os.fsync(fd2)
        t4 = time.perf_counter()
        os.close(fd2)
        step["zstd1_ms"] = round((t2 - t1) * 1000, 2)
        step["zstd1_write_ms"] = round((t3 - t2) * 1000, 2)
        step["zstd1_fsync_ms"] = round((t4 - t3) * 1000, 2)
        step["zstd1_bytes"] = len(data)
    except ImportError:
        pass
    out["steps"].append(step)
os.mkdir(os.path.join(DEST, "dontneed"))
for src in SRC:
    out["steps_dontneed"].append(push(src, os.path.join(DEST, "dontneed"), True))
print(json.dumps(out))
"""


# what the fast path of wal-push imports, and what those import (their cumulative import times)
IMPORT_CHAIN = (
    "site",
    "drsvc.cli.main",
    "drsvc.core.errors",
    "typing",
    "drsvc.cli.wal_fast",
    "drsvc.core.pgwal",
    "drsvc.core.durable",
    "uuid",
    "pathlib",
    "re",
    "struct",
    "tomllib",
)


def parse_strace(text: str) -> dict[str, tuple[float, int]]:
    """syscall -> (seconds, calls) from an `strace -c` summary."""
    found: dict[str, tuple[float, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
            try:
                found[parts[-1]] = (float(parts[1]), int(parts[3]))
            except ValueError:
                continue
    return found


def profile_push(
    home: Path,
    user: PgUser,
    env: dict[str, str],
    drsvc: list[str],
    python: list[str],
    datadir: Path,
    segments: Sequence[Path],
) -> dict[str, Any]:
    """Where one wal-push call's time goes: interpreter start, imports, syscalls, the steps of the copy."""
    runner = Runner(user, datadir, env, home / "profile.log")
    out: dict[str, Any] = {}
    py = shlex.join(python)
    floor = [runner.call(f"{py} -c pass") for _ in range(30)]
    out["python_start_ms"] = summary(floor)["p50_ms"]
    floor_s = [runner.call(f"{py} -S -c pass") for _ in range(30)]
    out["python_start_no_site_ms"] = summary(floor_s)["p50_ms"]

    def scratch(tag: str) -> Path:
        return drsvc_config(user.mkdir(home / tag, 0o755), user, datadir)

    # imports, as `python -X importtime` (which slows each import a little itself)
    config = scratch("importtime")
    total_us: list[int] = []
    selfs: dict[str, list[int]] = {}
    cumulative: dict[str, list[int]] = {}
    for src in segments[:5]:
        r = subprocess.run(
            [*python, "-X", "importtime", drsvc[0], "-c", str(config), "wal-push", SOURCE, str(src)],
            capture_output=True,
            text=True,
            env=env,
            cwd=datadir,
            **user.spawn_kwargs(),
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        rows = [line.split("|") for line in r.stderr.splitlines() if line.startswith("import time:")][1:]
        total_us.append(sum(int(row[0].rpartition(":")[2]) for row in rows))
        for row in rows:
            name = row[2].strip()
            selfs.setdefault(name, []).append(int(row[0].rpartition(":")[2]))
            cumulative.setdefault(name, []).append(int(row[1]))
    out["imports_ms"] = round(statistics.median(total_us) / 1000, 2)
    top = sorted(selfs.items(), key=lambda kv: -statistics.median(kv[1]))[:12]
    out["imports_top_self_ms"] = {k: round(statistics.median(v) / 1000, 2) for k, v in top}
    out["imports_cumulative_ms"] = {
        k: round(statistics.median(cumulative[k]) / 1000, 2) for k in IMPORT_CHAIN if k in cumulative
    }

    # system calls, as `strace -f -c -w` (wall time in each syscall; strace itself slows every call)
    if shutil.which("strace"):
        config = scratch("strace")
        sums: dict[str, list[float]] = {}
        for src in segments[5:10]:
            with tempfile.NamedTemporaryFile("r", suffix=".strace") as f:
                push = [*drsvc, "-c", str(config), "wal-push", SOURCE, str(src)]
                subprocess.run(
                    ["strace", "-f", "-c", "-w", "-o", f.name, "-u", "postgres", *push],
                    env=env,
                    cwd=datadir,
                    check=True,
                )
                for name, (sec, calls) in parse_strace(f.read()).items():
                    acc = sums.setdefault(name, [0.0, 0])
                    acc[0] += sec
                    acc[1] += calls
        n = len(segments[5:10])
        ranked = sorted(sums.items(), key=lambda kv: -kv[1][0])[:10]
        out["strace_per_call"] = {k: {"ms": round(s * 1000 / n, 2), "calls": c / n} for k, (s, c) in ranked}

    # the steps of pgwal.push, timed one by one in one process
    dest = user.mkdir(home / "steps", 0o750)
    code = (
        STEPS.replace("PATHS", repr([str(CHECKOUT), sysconfig.get_paths()["purelib"]]))
        .replace("SRC", repr([str(p) for p in segments[10:40]]))
        .replace("DEST", repr(str(dest)))
    )
    os.sync()
    r = subprocess.run(
        [*python, "-c", code], capture_output=True, text=True, env=env, cwd=datadir, **user.spawn_kwargs()
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    steps = json.loads(r.stdout)
    out["import_pgwal_ms"] = steps["import_pgwal_ms"]
    keys = steps["steps"][0].keys()
    out["push_steps_median_ms"] = {k: round(statistics.median(s[k] for s in steps["steps"]), 2) for k in keys}
    out["push_steps_p90_ms"] = {k: round(pct(sorted(s[k] for s in steps["steps"]), 0.9), 2) for k in keys}
    out["push_steps"] = steps["steps"]
    # the same steps with posix_fadvise(DONTNEED) after the fsync: the copy leaves the page cache, and the
    # next copy reuses its pages instead of taking never-used memory (on a VM, the host backs those first)
    dn = steps["steps_dontneed"]
    out["push_steps_dontneed_median_ms"] = {k: round(statistics.median(s[k] for s in dn), 2) for k in dn[0]}
    out["push_steps_dontneed_p90_ms"] = {k: round(pct(sorted(s[k] for s in dn), 0.9), 2) for k in dn[0]}
    out["push_steps_dontneed"] = dn
    return out


# ---- the run -------------------------------------------------------------------------------------------


@contextmanager
def cluster_running(cluster: Cluster) -> Iterator[Cluster]:
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def stop_leftover(work: Path, bindir: Path, user: PgUser) -> None:
    """A cluster an interrupted earlier run of this benchmark left running in `work` is stopped first."""
    datadir = work / "pgdata"
    if (datadir / "postmaster.pid").exists():
        subprocess.run(
            [str(bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(datadir)],
            capture_output=True,
            env=user.env(work / "pycache"),
            cwd="/",
            **user.spawn_kwargs(),
        )


def table(result: dict[str, Any]) -> str:
    seg = result["segments"]
    lines = [
        f"WAL archiving: {seg['count']} real segments of 16 MiB from PostgreSQL {result['postgresql']} "
        f"(pgbench, {seg['switched_early']} switched early; zstd -3 to {seg['zstd3_ratio']:.0%}), "
        f"{result['cores']} cores, {result['pgbackrest']}; {result['rounds']} rounds, all calls pooled; "
        f"load average before {result['loadavg_before'][0]}",
        f"{'case':46} {'calls':>5} {'seg/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  promise kept",
    ]
    for case in result["cases"]:
        lines.append(
            f"{case['case']:46} {case['calls']:>5} {case['seg_per_s']:>7} {case['p50_ms']:>8} "
            f"{case['p99_ms']:>8} {case['max_ms']:>8}  "
            f"{case['promise_kept']}/{case['calls']} {case['promise']}"
        )
    ing = result["ingest"]
    lines.append(
        f"{'drsvc ingest_wal (daemon, in process)':46} {ing['segments']:>5} {ing['seg_per_s']:>7} "
        f"{'':>8} {'':>8} {'':>8}  {ing['workers']} workers, {ing['spooled_bytes'] / MiB:.0f} MiB spooled"
    )
    for t in result["targets"]:
        lines.append(f"{t['target']}: {t['measured']}: {'PASS' if t['pass'] else 'FAIL'}")
    return "\n".join(lines)


@dataclass
class Case:
    """One archive_command of one round, with its own destination."""

    key: str  # drsvc, sync, async
    label: str
    template: str  # the archive_command line, %p for the file
    promise: str
    promised: Callable[[str], bool]  # is the file where the command promises it to be
    stored: Path  # what the destination holds afterwards
    after: Callable[[], None] = lambda: None


def drsvc_case(home: Path, user: PgUser, datadir: Path, drsvc: list[str]) -> Case:
    config = drsvc_config(user.mkdir(home, 0o755), user, datadir)
    inc = incoming(home)

    def in_incoming(name: str) -> bool:
        try:
            return (inc / name).stat().st_size == SEG
        except FileNotFoundError:
            return False

    return Case(
        "drsvc",
        "drsvc wal-push",
        shlex.join([*drsvc, "-c", str(config), "wal-push", SOURCE]) + " %p",
        "fsync'd copy in state incoming/ (raw)",
        in_incoming,
        inc,
    )


def pgbackrest_case(br: PgBackRest) -> Case:
    label = f"async, process-max={br.process_max}" if br.asynchronous else "sync"
    return Case(
        "async" if br.asynchronous else "sync",
        f"pgbackrest archive-push ({label})",
        br.command(),
        "in the repo (zst, aes-256-cbc)",
        br.holds,
        br.repo / "archive",
        br.wait_idle,  # the async process may still be at work: let it finish before the next case
    )


def pooled(key: str, runs: Sequence[tuple[int, Case, dict[str, Any]]]) -> dict[str, Any]:
    """One case over all rounds: the per-call numbers of every call, and each round's rate."""
    mine = [(r, c, m) for r, c, m in runs if c.key == key]
    seconds = [s / 1000 for _, _, m in mine for s in m["per_call_ms"]]
    out: dict[str, Any] = {"case": mine[0][1].label, "command": mine[0][1].template}
    out["promise"] = mine[0][1].promise
    out |= summary(seconds)
    out["promise_kept"] = sum(m["promise_kept"] for _, _, m in mine)
    out["stored_bytes"] = mine[0][2]["stored_bytes"]
    out["rounds"] = [
        {"round": r, "seg_per_s": m["seg_per_s"], "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"]}
        | {"disk_probe_ms": m["disk_probe_ms"]}
        | {"elapsed_s": m["elapsed_s"], "per_call_ms": m["per_call_ms"]}
        for r, _, m in mine
    ]
    del out["per_call_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three cases, in rotated order")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-wal"))
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--process-max", type=int, default=2, help="pgBackRest async process-max")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale (the bulk-load part of the WAL)")
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile wal-push calls (default: when drsvc misses the target)",
    )
    a = ap.parse_args(argv)
    if a.segments < 40 or a.rounds < 1:
        ap.error("--segments must be at least 40 (the profile uses 40 of them), --rounds at least 1")
    run_started = time.monotonic()
    load_before = os.getloadavg()
    user = PgUser.get()
    bindir = pg_bindir()
    pgbackrest_version = ensure_pgbackrest()
    work: Path = a.work.absolute()
    stop_leftover(work, bindir, user)
    shutil.rmtree(work, ignore_errors=True)
    user.mkdir(work, 0o755)
    pycache = user.mkdir(work / "pycache", 0o755)
    env = user.env(pycache)

    cluster = Cluster(bindir, work, user)
    cluster.init()
    brs = [
        PgBackRest(f"{mode}{r}", work, cluster, user, mode == "async", a.process_max)
        for r in range(a.rounds)
        for mode in ("sync", "async")
    ]
    with cluster_running(cluster):
        print(f"making WAL: pgbench on PostgreSQL {bindir.parent.name}, port {cluster.port}", file=sys.stderr)
        load = cluster.make_wal(a.segments, a.scale)
        for br in brs:
            br.write()
            br.stanza_create()
    names = cluster.archived()[1 : a.segments + 1]  # not the first: initdb's
    sources = [cluster.archive / n for n in names]
    seg_info = segment_stats(sources) | {"first": names[0], "last": names[-1], "load": load}
    seg_info["system_id"] = cluster.system_id()
    print(f"{len(names)} segments {names[0]}..{names[-1]} ({load['seconds']} s)", file=sys.stderr)

    drsvc_root = user.mkdir(work / "drsvc", 0o755)
    drsvc_cmd, python = drsvc_launcher(drsvc_root, user)
    runner = Runner(user, cluster.datadir, env, work / "archive_command.log")
    pinned = Pinned(sources)  # the segments stay in the page cache, as just-written WAL is
    # warm: compile drsvc's bytecode into the cache directory (in a scratch state), load pgBackRest's binary
    warm = drsvc_case(drsvc_root / "warm", user, cluster.datadir, drsvc_cmd)
    for src in sources[:3]:
        runner.call(warm.template.replace("%p", str(src)))
        runner.call(f"pgbackrest --config={brs[0].config} --stanza={STANZA} info >/dev/null")

    runs: list[tuple[int, Case, dict[str, Any]]] = []
    drsvc_homes: list[Path] = []
    for r in range(a.rounds):
        drsvc_homes.append(drsvc_root / f"r{r}")
        cases = [drsvc_case(drsvc_homes[-1], user, cluster.datadir, drsvc_cmd)]
        cases += [pgbackrest_case(br) for br in brs[2 * r : 2 * r + 2]]
        for case in cases[r % 3 :] + cases[: r % 3]:  # each case first in some round
            print(f"round {r + 1}/{a.rounds}: {case.label} ...", file=sys.stderr)
            pg_wal = fresh_pg_wal(cluster.datadir, sources, user)
            measured = archive_all(runner, case.template, pg_wal, names, case.promised)
            case.after()
            measured["stored_bytes"] = dir_bytes(case.stored)
            measured["held_at_end"] = sum(case.promised(n) for n in names)
            runs.append((r, case, measured))
            print(
                f"  {measured['seg_per_s']} seg/s, p50 {measured['p50_ms']} ms "
                f"(16 MiB copy + fsync before: {measured['disk_probe_ms']} ms)",
                file=sys.stderr,
            )
    shutil.rmtree(cluster.datadir / "pg_wal")
    results = [pooled(key, runs) for key in ("drsvc", "sync", "async")]

    print("drsvc ingest_wal ...", file=sys.stderr)
    ingests = []
    for home in drsvc_homes:  # what wal-push left, in the page cache, as the daemon finds it 0.5 s later
        waiting = Pinned([incoming(home) / n for n in names])
        try:
            ingests.append(measure_ingest(home / "drsvc.toml", names))
        finally:
            waiting.release()
    ingest = {
        "workers": ingests[0]["workers"],
        "segments": sum(i["segments"] for i in ingests),
        "seconds": round(sum(i["seconds"] for i in ingests), 3),
        "spooled_bytes": ingests[0]["spooled_bytes"],
        "all_spooled": all(i["all_spooled"] for i in ingests),
        "rounds": ingests,
    }
    ingest["seg_per_s"] = round(ingest["segments"] / ingest["seconds"], 1)

    drsvc_rate, async_rate = results[0]["seg_per_s"], results[2]["seg_per_s"]
    calls = len(names) * a.rounds
    targets = [
        {
            "target": "drsvc wal-push seg/s >= pgBackRest async seg/s",
            "measured": f"{drsvc_rate} vs {async_rate}",
            "pass": drsvc_rate >= async_rate and results[0]["promise_kept"] == calls,
        },
        {
            "target": "drsvc ingest keeps up: ingest seg/s >= wal-push seg/s",
            "measured": f"{ingest['seg_per_s']} vs {drsvc_rate}",
            "pass": ingest["seg_per_s"] >= drsvc_rate and ingest["all_spooled"],
        },
    ]
    result: dict[str, Any] = {
        "postgresql": bindir.parent.name,
        "pgbackrest": pgbackrest_version,
        "cores": os.cpu_count(),
        "rounds": a.rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "segments_mlocked_bytes": pinned.bytes,
        "python_under_drsvc": python,
        "drsvc_command": drsvc_cmd,
        "segments": seg_info,
        "cases": results,
        "ingest": ingest,
        "targets": targets,
    }
    if a.profile or (a.profile is None and not targets[0]["pass"]):
        print("profiling wal-push ...", file=sys.stderr)
        result["profile"] = profile_push(work, user, env, drsvc_cmd, python, cluster.datadir, sources)
    pinned.release()
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["run_seconds"] = round(time.monotonic() - run_started, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if "profile" in result:
        p = result["profile"]
        print(
            f"profile of wal-push: python start {p['python_start_ms']} ms "
            f"(-S: {p['python_start_no_site_ms']} ms), imports {p['imports_ms']} ms, "
            f"steps (median ms) {p['push_steps_median_ms']}, (p90 ms) {p['push_steps_p90_ms']}",
        )
        print(
            f"the same with fadvise(DONTNEED) after the fsync: (median ms) "
            f"{p['push_steps_dontneed_median_ms']}, (p90 ms) {p['push_steps_dontneed_p90_ms']}"
        )
        if "strace_per_call" in p:
            print(f"strace -c -w per call (ms): {p['strace_per_call']}")
    print(f"results: {a.json}  ({result['run_seconds']} s)")
    return 0 if all(t["pass"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
