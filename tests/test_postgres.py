"""The postgres source: wal-push (archive_command), base backups, point-in-time restore, wal-fetch
(restore_command), against a real PostgreSQL from Debian's packages run as `postgres`, and SeaweedFS sites.

PostgreSQL refuses to run as root: every cluster runs as the `postgres` user (``runuser``) in a directory of
its own under /tmp that `postgres` owns (pytest's tmp_path is private to root), on a free port. The drsvc
that PostgreSQL runs is this checkout: the venv's own script when `postgres` may execute it, else a small
launcher that runs the system's Python of the same version on this checkout and the venv's packages.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedServer, free_ports
from helpers import FAST_SCRYPT, PASSPHRASE
from test_sites import s3_site

import drsvc
from drsvc import wal
from drsvc.app import App
from drsvc.core import pgwal
from drsvc.core.config import load_config
from drsvc.core.crypto import Keys, Suite
from drsvc.core.errors import IntegrityError, SnapshotError
from drsvc.core.layout import Kind
from drsvc.core.pgbackup import BackupStart, default_bindir, parse_backup_label, stop_segment
from drsvc.core.repository import dctx
from drsvc.core.walobject import WalSealer, open_wal
from replicator import replicate
from restore.postgres import recovery_settings, recovery_time
from restore.wal import by_segment, parse_xact_times

DRSVC = str(Path(sys.executable).with_name("drsvc"))
PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_waldump", "psql")
SEG = 1 << 20  # fake segments: 1 MiB, the smallest size PostgreSQL allows


# ---- PostgreSQL as the `postgres` user ---------------------------------------------------------------


def pg_bindir() -> Path:
    """PostgreSQL's programs; a clear failure (never a skip) when Debian's packages are not installed."""
    bindir = default_bindir()
    missing = [p for p in PROGRAMS if bindir is None or not os.access(bindir / p, os.X_OK)]
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("the `postgres` user")
    if missing:
        pytest.fail(
            f"PostgreSQL's server programs are missing ({', '.join(missing)}; looked in "
            "/usr/lib/postgresql/*/bin): "
            "run `make test`, which installs Debian's postgresql package"
        )
    assert bindir is not None
    return bindir


def as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def pg_home() -> Iterator[Path]:
    """A directory `postgres` owns and can reach (pytest's tmp_path is private to root)."""
    home = Path(tempfile.mkdtemp(prefix="drsvc-pg-", dir="/tmp"))
    chown_postgres(home)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def drsvc_for_postgres(home: Path) -> list[str]:
    """A command line by which `postgres` runs this checkout's drsvc."""
    check = [sys.executable, "-c", "import drsvc.cli.main"]
    if subprocess.run(as_postgres(check), capture_output=True).returncode == 0:
        return [DRSVC]
    # the venv's interpreter lies where `postgres` may not go (e.g. under /root): the system's Python of the
    # same version, on this checkout and the venv's packages (the same C extensions for that version)
    python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    if python is None:
        pytest.fail(
            f"`postgres` cannot run {sys.executable}, and there is no /usr/bin/python3.X to run instead"
        )
    path = f"{Path(drsvc.__file__).parents[1]}:{sysconfig.get_paths()['purelib']}"
    launcher = home / "drsvc"
    launcher.write_text(
        f'#!/bin/sh\nPYTHONPATH={shlex.quote(path)} exec {python} -s -m drsvc.cli.main "$@"\n'
    )
    launcher.chmod(0o755)
    probe = subprocess.run(as_postgres([str(launcher), "--help"]), capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    return [str(launcher)]


class Cluster:
    """One PostgreSQL cluster run by `postgres`: initdb, start, SQL through psql, stop."""

    def __init__(self, bindir: Path, home: Path, datadir: Path, port: int) -> None:
        self.bindir, self.home, self.datadir, self.port = bindir, home, datadir, port
        self.log = home / f"{datadir.name}.log"

    def run(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(
            as_postgres([str(self.bindir / args[0]), *args[1:]]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, f"{args[0]} failed: {r.stderr}\n{self.log_tail()}"
        return r.stdout

    def initdb(self, settings: dict[str, str]) -> None:
        self.run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync")
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in {**self.base_settings(), **settings}.items():
                f.write(f"{k} = {v}\n")

    def base_settings(self) -> dict[str, str]:
        return {
            "port": str(self.port),
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.home}'",
            "shared_buffers": "16MB",
            "max_wal_size": "64MB",
        }

    def start(self) -> None:
        self.run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "120",
            "-D",
            str(self.datadir),
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port}",
        )

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(
                as_postgres(
                    [str(self.bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.datadir)]
                ),
                capture_output=True,
            )

    def sql(self, query: str) -> str:
        args = [str(self.bindir / "psql"), "-h", str(self.home), "-p", str(self.port), "-U", "postgres"]
        r = subprocess.run(
            [*args, "-d", "postgres", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", query],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"{query}: {r.stderr}\n{self.log_tail()}"
        return r.stdout.strip()

    def wait_for(self, query: str, expect: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        got = ""
        while time.monotonic() < deadline:
            try:
                got = self.sql(query)
            except AssertionError:
                got = "(no answer)"
            if got == expect:
                return
            time.sleep(0.2)
        pytest.fail(f"{query} gave {got!r}, not {expect!r}, for {timeout} s\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def write_config(home: Path, sites: dict[str, dict[str, Any]], source: dict[str, Any]) -> Path:
    """A TOML config (readable by `postgres`, as PostgreSQL's commands read it) with one postgres source."""

    def toml(table: str, values: dict[str, Any]) -> str:
        lines = [f"[{table}]"]
        for k, v in values.items():
            if isinstance(v, dict):
                continue
            lines.append(f"{k} = {json.dumps(v)}")
        out = "\n".join(lines) + "\n"
        for k, v in values.items():
            if isinstance(v, dict):
                out += toml(f"{table}.{k}", v)
        return out

    state = home / "state"
    state.mkdir(exist_ok=True)
    chown_postgres(state)  # wal-push, as `postgres`, writes state/incoming
    text = toml("state", {"dir": str(state)})
    text += toml("tenants.fin", {"key": {"passphrase": {"value": PASSPHRASE}}})
    for name, site in sites.items():
        text += toml(f"sites.{name}", site)
    text += toml("sources.pg", {"tenant": "fin", "type": "postgres", "sites": list(sites), **source})
    path = home / "drsvc.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


async def ship(app: App) -> None:
    reports = await replicate(app.spool, [app.store(n) for n in app.config.source("pg").sites])
    assert not [r.error for r in reports if r.error]


async def wal_names(app: App, site: str) -> set[str]:
    repo = await app.open_repo("fin")
    handles = await repo.list_handles(Kind.WAL, repo.keys.source_tag("pg"), store=app.store(site))
    return {h.name for h in handles}


# ---- the end-to-end test the issue asks for ------------------------------------------------------------


async def test_archive_to_two_sites_and_restore_to_a_time_in_the_middle(
    pg_home: Path, seaweed: WeedServer
) -> None:
    bindir = pg_bindir()
    drsvc_cmd = drsvc_for_postgres(pg_home)
    port, port_mid, port_end = free_ports(3)
    buckets = [seaweed.make_bucket(), seaweed.make_bucket()]
    datadir = pg_home / "main"
    config = write_config(
        pg_home,
        {"s1": s3_site(seaweed, buckets[0]), "s2": s3_site(seaweed, buckets[1])},
        {
            "path": str(datadir),
            "min_copies": 2,
            "conninfo": f"host={pg_home} port={port} user=postgres dbname=postgres",
            "pg_bindir": str(bindir),
        },
    )
    archive = shlex.join([*drsvc_cmd, "-c", str(config), "wal-push", "pg"]) + " %p"
    main = Cluster(bindir, pg_home, datadir, port)
    restored: list[Cluster] = []
    app = App(load_config(config), workers=2)
    try:
        main.initdb(
            {
                "wal_level": "replica",
                "archive_mode": "on",
                "archive_command": "'" + archive.replace("'", "''") + "'",
            }
        )
        main.start()
        main.sql("CREATE TABLE t (id int PRIMARY KEY, note text)")
        await app.init_tenant("fin", FAST_SCRYPT)

        backup = await wal.take_base_backup(app, "pg")
        assert backup.record.source == "pg" and backup.stats.files > 100
        assert not list((app.config.state.dir / "basebackup").iterdir())  # the copy is gone

        commits: list[tuple[int, int, int]] = []  # id, before BEGIN, after COMMIT returned
        for i in range(1, 7):
            before = time.time_ns()
            main.sql(f"INSERT INTO t VALUES ({i}, repeat('x', 1000))")
            commits.append((i, before, time.time_ns()))
            if i % 2 == 0:
                main.sql("SELECT pg_switch_wal()")
            time.sleep(0.4)
        last = main.sql("SELECT pg_walfile_name(pg_switch_wal())")
        main.wait_for(f"SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver", "t")
        assert main.sql("SELECT failed_count FROM pg_stat_archiver") == "0"

        spooled = await wal.ingest_wal(app, "pg")
        assert any(k.endswith(last) for k in spooled)
        assert not pgwal_pending(app)  # every incoming file went into the spool
        await ship(app)
        at_s1, at_s2 = await wal_names(app, "s1"), await wal_names(app, "s2")
        assert at_s1 == at_s2 and last in at_s1 and any(n.endswith(".backup") for n in at_s1)

        # restorable: from the base backup to the end of the archived WAL (after the last commit), not just
        # to the base backup's time
        span = await app.restorable_range("pg")
        assert span is not None and span[0] == backup.record.time_ns and span[1] >= commits[5][2]

        # the first site lost a segment replay needs: restore_command reads the second site's copy
        repo = await app.open_repo("fin")
        lost = sorted(n for n in at_s1 if pgwal.is_segment(n))[1]
        seaweed.client().remove_object(buckets[0], f"fin/wal/{repo.keys.source_tag('pg')}/{lost}")

        # a time between the third and the fourth commit
        t_mid = (commits[2][2] + commits[3][1]) // 2
        r = await wal.restore_postgres(app, "pg", pg_home / "mid", t_mid, drsvc=drsvc_cmd)
        assert r.wal.target_ns == t_mid and not r.wal.past_end and r.rpo_achieved_s == 0
        assert r.wal.last_xact_ns is not None and r.wal.last_xact_ns >= commits[5][1]
        assert r.base.snapshot.id == backup.record.id and r.base.site == "s1"
        mid = Cluster(bindir, pg_home, pg_home / "mid", port_mid)
        restored.append(mid)
        mid.start()
        mid.wait_for("SELECT pg_is_in_recovery()", "f")
        assert mid.sql("SELECT id FROM t ORDER BY id").split() == ["1", "2", "3"]
        assert not (mid.datadir / "pg_wal" / pgwal.PREFETCH_DIR).exists()  # removed at the end of recovery
        assert mid.sql("SHOW archive_mode") == "off"  # a restored copy does not archive into the source

        # a time after the last commit: replay runs to the end of the WAL, and says so
        t_end = time.time_ns()
        r = await wal.restore_postgres(app, "pg", pg_home / "end", t_end, drsvc=drsvc_cmd)
        assert r.wal.past_end and r.wal.target_ns is None and r.wal.end == last
        assert r.wal.last_xact_ns is not None and commits[5][1] <= r.wal.last_xact_ns <= commits[5][2]
        end = Cluster(bindir, pg_home, pg_home / "end", port_end)
        restored.append(end)
        end.start()
        end.wait_for("SELECT pg_is_in_recovery()", "f")
        assert end.sql("SELECT id FROM t ORDER BY id").split() == ["1", "2", "3", "4", "5", "6"]
    finally:
        for c in [main, *restored]:
            c.stop()
        await app.close()
        for b in buckets:
            seaweed.remove_bucket(b)


def pgwal_pending(app: App) -> list[str]:
    d = Path(pgwal.incoming_dir(app.config.state.dir, "pg"))
    return [n for n in os.listdir(d) if pgwal.is_wal_name(n)] if d.is_dir() else []


# ---- wal-push and wal-fetch on fake WAL files (no server needed) -----------------------------------------


def fake_segment(sysid: int = 7000000000000000001, seed: int = 0, seg_size: int = SEG) -> bytes:
    header = pgwal.LONG_HEADER.pack(0xD110, pgwal.XLP_LONG_HEADER, 1, 0, 0, sysid, seg_size, 8192)
    body = bytes((seed * 31 + i) % 251 for i in range(4096))
    return header + body + bytes(seg_size - len(header) - len(body))


def seg(n: int) -> str:
    return pgwal.segment_name(1, n, SEG)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRSVC, "-c", str(config), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def wal_env(tmp_path: Path, seaweed: WeedServer) -> Iterator[tuple[Path, Path]]:
    """A config with a postgres source on two S3 sites, and a fake pg_wal directory."""
    buckets = [seaweed.make_bucket(), seaweed.make_bucket()]
    config = write_config(
        tmp_path,
        {"s1": s3_site(seaweed, buckets[0]), "s2": s3_site(seaweed, buckets[1])},
        {"path": str(tmp_path / "pgdata")},
    )
    (tmp_path / "pg_wal").mkdir()
    try:
        yield config, tmp_path / "pg_wal"
    finally:
        for b in buckets:
            seaweed.remove_bucket(b)


async def test_wal_push_is_durable_idempotent_and_never_overwrites(wal_env: tuple[Path, Path]) -> None:
    config, pg_wal = wal_env
    state = load_config(config).state.dir
    incoming = Path(pgwal.incoming_dir(state, "pg"))
    (pg_wal / seg(1)).write_bytes(fake_segment())
    r = cli(config, "wal-push", "pg", str(pg_wal / seg(1)))
    assert r.returncode == 0, r.stderr
    copy = incoming / seg(1)
    assert copy.read_bytes() == fake_segment()
    assert copy.stat().st_mtime_ns == (pg_wal / seg(1)).stat().st_mtime_ns
    assert not [n for n in os.listdir(incoming) if n.startswith(".tmp-")]
    assert cli(config, "wal-push", "pg", str(pg_wal / seg(1))).returncode == 0  # PostgreSQL retrying

    other = pg_wal / "other"
    other.mkdir()
    (other / seg(1)).write_bytes(fake_segment(seed=1))  # same name, other content
    r = cli(config, "wal-push", "pg", str(other / seg(1)))
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr and "Traceback" not in r.stderr
    assert copy.read_bytes() == fake_segment()

    (pg_wal / seg(2)).write_bytes(fake_segment(sysid=42))  # another cluster
    r = cli(config, "wal-push", "pg", str(pg_wal / seg(2)))
    assert r.returncode == 1 and "belongs to database system 42" in r.stderr
    (pg_wal / "000000010000000000000003.bad").write_bytes(b"x")
    assert cli(config, "wal-push", "pg", str(pg_wal / "000000010000000000000003.bad")).returncode == 1
    (pg_wal / "00000002.history").write_bytes(b"1\t0/3000000\tno recovery target specified\n")
    assert cli(config, "wal-push", "pg", str(pg_wal / "00000002.history")).returncode == 0
    assert cli(config, "-c", "/nonexistent.toml", "wal-push", "pg", str(pg_wal / seg(1))).returncode == 1

    # spooled: the copy goes, its marker stays; pushing it again is still checked against it
    async with App(load_config(config), workers=2) as app:
        await app.init_tenant("fin", FAST_SCRYPT)
        keys = await wal.ingest_wal(app, "pg")
        assert len(keys) == 2 and not copy.exists() and (incoming / pgwal.DONE_DIR / seg(1)).exists()
        assert cli(config, "wal-push", "pg", str(pg_wal / seg(1))).returncode == 0
        assert not copy.exists()  # nothing copied again: it is spooled already
        r = cli(config, "wal-push", "pg", str(other / seg(1)))
        assert r.returncode == 1 and "already archived with different content" in r.stderr
        assert await wal.ingest_wal(app, "pg") == []


async def test_a_source_s_own_incoming_directory_is_where_push_and_ingest_meet(tmp_path: Path) -> None:
    """`incoming` set (the daemon's state directory closed to PostgreSQL's user): wal-push writes there, the
    daemon spools from there, and nothing goes under the state directory."""
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    config = write_config(
        tmp_path,
        {"a": {"type": "local", "path": str(tmp_path / "site")}},
        {"path": str(tmp_path / "pgdata"), "incoming": "shared/pg"},
    )
    (pg_wal / seg(1)).write_bytes(fake_segment())
    r = cli(config, "wal-push", "pg", str(pg_wal / seg(1)))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shared" / "pg" / seg(1)).read_bytes() == fake_segment()
    assert not Path(pgwal.incoming_dir(load_config(config).state.dir, "pg")).exists()
    async with App(load_config(config), workers=2) as app:
        await app.init_tenant("fin", FAST_SCRYPT)
        assert wal.incoming(app, "pg") == tmp_path / "shared" / "pg"
        (key,) = await wal.ingest_wal(app, "pg")
        assert key.endswith(seg(1)) and not (tmp_path / "shared" / "pg" / seg(1)).exists()


async def test_ingest_again_after_a_crash_writes_the_same_object_and_never_another(
    wal_env: tuple[Path, Path],
) -> None:
    config, pg_wal = wal_env
    (pg_wal / seg(1)).write_bytes(fake_segment())
    assert cli(config, "wal-push", "pg", str(pg_wal / seg(1))).returncode == 0
    incoming = Path(pgwal.incoming_dir(load_config(config).state.dir, "pg"))
    kept = pg_wal / "kept"
    shutil.copy2(incoming / seg(1), kept)  # what a crash before the removal would leave
    async with App(load_config(config), workers=2) as app:
        await app.init_tenant("fin", FAST_SCRYPT)
        (key,) = await wal.ingest_wal(app, "pg")
        await ship(app)
        assert not app.spool.path(key).exists()  # shipped everywhere: gone from the spool
        at_site = await app.store("s1").get(key)

        # crashed after the spool put, before the marker: spooled again, the very same bytes
        shutil.copy2(kept, incoming / seg(1))
        (incoming / pgwal.DONE_DIR / seg(1)).unlink()
        assert await wal.ingest_wal(app, "pg") == [key]
        assert app.spool.path(key).read_bytes() == at_site
        await ship(app)

        # crashed after the marker, before the removal: nothing spooled again, the copy goes
        shutil.copy2(kept, incoming / seg(1))
        assert await wal.ingest_wal(app, "pg") == [key]
        assert not (incoming / seg(1)).exists() and not app.spool.path(key).exists()

        # other content under an archived name (wal-push refuses it; put here behind its back): set aside
        (incoming / seg(1)).write_bytes(fake_segment(seed=9))
        with pytest.raises(SnapshotError, match="other content"):
            await wal.ingest_wal(app, "pg")
        assert not (incoming / seg(1)).exists() and len(os.listdir(incoming / ".rejected")) == 1
        assert await app.store("s2").get(key) == at_site


def wait_unlocked(lock: Path, timeout: float = 60) -> None:
    """Until no prefetcher holds `lock`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd = pgwal.try_lock(str(lock)) if lock.parent.is_dir() else None
        if fd is not None:
            os.close(fd)
            return
        time.sleep(0.05)
    pytest.fail(f"{lock} still held after {timeout} s")


def test_wal_push_and_cached_wal_fetch_import_nothing_heavy(wal_env: tuple[Path, Path]) -> None:
    config, pg_wal = wal_env
    (pg_wal / seg(1)).write_bytes(fake_segment())
    cache = pg_wal / pgwal.PREFETCH_DIR
    cache.mkdir()
    (cache / seg(5)).write_bytes(fake_segment(seed=5))
    for args in (
        ["wal-push", "pg", str(pg_wal / seg(1))],
        ["wal-fetch", "--prefetch", "0", "pg", seg(5), str(pg_wal / "RECOVERYXLOG")],
    ):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "drsvc.cli.main", "-c", str(config), *args],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        loaded = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
        assert not loaded & {"asyncio", "argparse", "pydantic", "cryptography", "zstandard", "minio"}, args
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == fake_segment(seed=5)


async def test_wal_fetch_verifies_falls_back_prefetches_and_tells_missing_from_broken(
    wal_env: tuple[Path, Path], seaweed: WeedServer
) -> None:
    config, pg_wal = wal_env
    for n in range(1, 5):
        (pg_wal / seg(n)).write_bytes(fake_segment(seed=n))
        assert cli(config, "wal-push", "pg", str(pg_wal / seg(n))).returncode == 0
    async with App(load_config(config), workers=2) as app:
        await app.init_tenant("fin", FAST_SCRYPT)
        await wal.ingest_wal(app, "pg")
        await ship(app)
        repo = await app.open_repo("fin")
        prefix = f"fin/wal/{repo.keys.source_tag('pg')}/"
    sites = load_config(config).sites
    bucket = {n: s.bucket for n, s in sites.items()}  # type: ignore[union-attr]
    c = seaweed.client()
    restore_dir = pg_wal.parent / "restore" / "pg_wal"
    restore_dir.mkdir(parents=True)
    dest = restore_dir / "RECOVERYXLOG"

    # the first site lost its copy: read from the second, verified
    c.remove_object(bucket["s1"], prefix + seg(1))
    r = cli(config, "wal-fetch", "pg", seg(1), str(dest))
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == fake_segment(seed=1)

    # the fetch started a prefetcher: it fills the cache with the next segments, up to the last one archived
    cache = restore_dir / pgwal.PREFETCH_DIR
    wait_unlocked(cache / pgwal.LOCK_FILE)
    assert sorted(n for n in os.listdir(cache) if not n.startswith(".")) == [seg(2), seg(3), seg(4)]
    started = time.monotonic()
    r = cli(config, "wal-fetch", "pg", seg(2), str(dest))
    took = time.monotonic() - started
    assert r.returncode == 0 and dest.read_bytes() == fake_segment(seed=2)
    assert not (cache / seg(2)).exists()  # served from the cache: moved, not copied
    print(f"wal-fetch served from the prefetch cache in {took * 1000:.0f} ms")

    # missing everywhere: exit 1, quietly (PostgreSQL asks for files that do not exist all the time)
    for name in ("00000002.history", seg(9)):
        r = cli(config, "wal-fetch", "--prefetch", "0", "pg", name, str(dest))
        assert r.returncode == 1 and r.stderr == "", r.stderr

    # the only remaining copy is corrupt: 126, so that PostgreSQL stops instead of ending recovery early
    data = bytearray(c.get_object(bucket["s2"], prefix + seg(3)).read())
    data[len(data) // 2] ^= 1
    c.remove_object(bucket["s1"], prefix + seg(3))
    c.put_object(bucket["s2"], prefix + seg(3), io.BytesIO(bytes(data)), len(data))
    r = cli(config, "wal-fetch", "--prefetch", "0", "--cache", str(pg_wal / "empty"), "pg", seg(3), str(dest))
    assert r.returncode == 126 and "no intact copy" in r.stderr

    # no site reachable: 126 too
    elsewhere = pg_wal.parent / "elsewhere"
    elsewhere.mkdir()
    broken = write_config(
        elsewhere, {"s1": {"type": "local", "path": str(elsewhere / "no-site")}}, {"path": "/x"}
    )
    r = cli(broken, "wal-fetch", "--prefetch", "0", "pg", seg(4), str(elsewhere / "RECOVERYXLOG"))
    assert r.returncode == 126 and r.stderr


async def test_wal_fetch_only_site_never_reads_another(
    wal_env: tuple[Path, Path], seaweed: WeedServer
) -> None:
    """A drill recovers PostgreSQL from one site with the others deemed lost: `--only-site` (written into
    restore_command by an isolated restore) reads that site alone, and so does the prefetcher it starts."""
    config, pg_wal = wal_env
    for n in range(1, 4):
        (pg_wal / seg(n)).write_bytes(fake_segment(seed=n))
        assert cli(config, "wal-push", "pg", str(pg_wal / seg(n))).returncode == 0
    async with App(load_config(config), workers=2) as app:
        await app.init_tenant("fin", FAST_SCRYPT)
        await wal.ingest_wal(app, "pg")
        await ship(app)
        prefix = f"fin/wal/{(await app.open_repo('fin')).keys.source_tag('pg')}/"
    bucket = {n: s.bucket for n, s in load_config(config).sites.items()}  # type: ignore[union-attr]
    c = seaweed.client()
    for n in (1, 3):
        c.remove_object(bucket["s2"], prefix + seg(n))  # s2 lost the 1st and 3rd; s1 holds all three
    restore_dir = pg_wal.parent / "restore" / "pg_wal"
    restore_dir.mkdir(parents=True)
    dest = restore_dir / "RECOVERYXLOG"

    r = cli(config, "wal-fetch", "--only-site", "s2", "pg", seg(1), str(dest))
    assert r.returncode == 1 and not dest.exists()  # s1 has it, but s1 is lost for this recovery
    r = cli(config, "wal-fetch", "--only-site", "s2", "pg", seg(2), str(dest))
    assert r.returncode == 0 and dest.read_bytes() == fake_segment(seed=2)
    cache = restore_dir / pgwal.PREFETCH_DIR
    wait_unlocked(cache / pgwal.LOCK_FILE)
    assert not (cache / seg(3)).exists()  # the prefetcher read s2 alone too
    r = cli(config, "wal-fetch", "--only-site", "s1", "pg", seg(1), str(dest))
    assert r.returncode == 0 and dest.read_bytes() == fake_segment(seed=1)
    r = cli(config, "wal-fetch", "--only-site", "nowhere", "--prefetch", "0", "pg", seg(1), str(dest))
    assert r.returncode == 126 and "not in the copy policy" in r.stderr
    assert wal.wal_fetch_command(["drsvc"], Path("/c.toml"), "pg", "s2") == (
        "drsvc -c /c.toml wal-fetch --only-site s2 pg %f %p"
    )


# ---- pieces ------------------------------------------------------------------------------------------


def test_wal_objects_seal_deterministically_and_bind_name_and_source() -> None:
    keys = Keys(Suite.AES_256_GCM, b"r" * 16, b"m" * 64)
    sealer = WalSealer(keys, 1)
    data = fake_segment()
    a = sealer.seal("pg", seg(1), data, 123, 7)
    assert a == sealer.seal("pg", seg(1), data, 123, 7)  # a re-spooled file is the same object
    assert a != sealer.seal("pg", seg(1), fake_segment(seed=1), 123, 7)
    assert len(a) < len(data) // 10  # compressed
    got = open_wal(keys, "pg", seg(1), a, dctx())
    assert (got.data, got.time_ns, got.sysid) == (data, 123, 7)
    with pytest.raises(IntegrityError):
        open_wal(keys, "other", seg(1), a, dctx())
    with pytest.raises(IntegrityError):
        open_wal(keys, "pg", seg(2), a, dctx())


def test_wal_names_labels_and_recovery_settings() -> None:
    assert pgwal.next_segments("0000000100000000000000FE", 16 << 20, 3) == [
        "0000000100000000000000FF",
        "000000010000000100000000",
        "000000010000000100000001",
    ]
    assert pgwal.parse_segment("000000020000000100000003", 1 << 30) == (2, 7)
    label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 1\n"
    start = parse_backup_label(label)
    assert start == BackupStart(0x2000028, "000000010000000000000002", 1, 16 << 20)
    assert start.history_file == "000000010000000000000002.00000028.backup"
    assert (
        stop_segment("STOP WAL LOCATION: 0/3000100 (file 000000010000000000000003)\n")
        == "000000010000000000000003"
    )
    out = (
        "rmgr: Transaction len (rec/tot): 34/34, tx: 735, lsn: 0/03000060, prev 0/03000028, "
        "desc: COMMIT 2026-11-25 11:08:35.123456 UTC\n"
    )
    assert parse_xact_times(out) == [1795604915123456000]
    assert by_segment(
        {seg(1): set(), "000000020000000000000001": set(), seg(2): set(), "00000002.history": set()}, SEG, 1
    ) == {
        1: "000000020000000000000001",
        2: seg(2),
    }
    s = recovery_settings("drsvc -c 'a b' wal-fetch pg %f %p", 1795604915123456789, False)
    assert s["recovery_target_time"] == "'2026-11-25 11:08:35.123456+00'"
    assert s["restore_command"] == "'drsvc -c ''a b'' wal-fetch pg %f %p'" and s["archive_mode"] == "off"
    assert recovery_settings("x", None, True)["recovery_target_time"] == "''"
    assert "archive_mode" not in recovery_settings("x", None, True)
    assert recovery_time(999) == "1970-01-01 00:00:00.000000+00"


def test_fake_segments_look_like_postgresql_s(tmp_path: Path) -> None:
    path = tmp_path / seg(1)
    path.write_bytes(fake_segment(sysid=99))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pgwal.read_long_header(fd) == (99, SEG)
    finally:
        os.close(fd)
    assert pgwal.LONG_HEADER.size == 40


async def test_the_daemon_ingests_pushed_wal_and_tracks_its_protection(wal_env: tuple[Path, Path]) -> None:
    """`drsvc run`'s side of archive_command: the supervisor spools what wal-push left, the site loops ship
    it, and the source's protected_until reaches the newest WAL file's time."""
    from drsvc.metrics import Metrics
    from drsvc.supervisor import Supervisor

    config, pg_wal = wal_env
    for n in (1, 2, 3):
        (pg_wal / seg(n)).write_bytes(fake_segment(seed=n))
        assert cli(config, "wal-push", "pg", str(pg_wal / seg(n))).returncode == 0
    newest = (pg_wal / seg(3)).stat().st_mtime_ns
    app = App(load_config(config), workers=2)
    try:
        await app.init_tenant("fin", FAST_SCRYPT)
        metrics = Metrics()
        sup = Supervisor(app, metrics)
        await sup.start()
        try:
            st = sup.sources["pg"]
            deadline = time.monotonic() + 30
            while st.protected_until * 1e9 < newest - 1000 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            assert st.protected_until * 1e9 >= newest - 1000  # float seconds: allow a microsecond
            assert not pgwal_pending(app)
            body = metrics.render()[0].decode()
            assert 'drsvc_wal_backlog_files{source="pg",tenant="fin"} 0.0' in body
        finally:
            await sup.stop(5)
        for site in ("s1", "s2"):
            assert {seg(1), seg(2), seg(3)} <= await wal_names(app, site)
    finally:
        await app.close()


async def test_forget_takes_the_wal_before_the_oldest_kept_base_backup(tmp_path: Path) -> None:
    """Retention of a postgres source: forgetting a base backup deletes the archived WAL that only it needed
    (segments before the oldest kept backup's start), at every site; history files stay."""
    import snapshot
    from snapshot.postgres import backup_config

    sites = {n: {"type": "local", "path": str(tmp_path / "sites" / n)} for n in ("a", "b")}
    config = write_config(tmp_path, sites, {"path": str(tmp_path / "pgdata"), "retention": {"keep_last": 1}})
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    for n in range(1, 7):
        (pg_wal / seg(n)).write_bytes(fake_segment(seed=n))
        assert cli(config, "wal-push", "pg", str(pg_wal / seg(n))).returncode == 0
    (pg_wal / "00000002.history").write_text("1\t0/5000000\tno recovery target specified\n")
    assert cli(config, "wal-push", "pg", str(pg_wal / "00000002.history")).returncode == 0
    app = App(load_config(config), workers=2)
    try:
        await app.init_tenant("fin", FAST_SCRYPT)
        await wal.ingest_wal(app, "pg")
        sc = app.config.source("pg")
        repo = await app.open_repo("fin")
        for start in (2, 5):  # two base backups: the WAL they need starts at segments 2 and 5
            backup = tmp_path / f"backup{start}"
            backup.mkdir()
            lsn = start * SEG + 0x28
            (backup / "backup_label").write_text(
                f"START WAL LOCATION: 0/{lsn:X} (file {seg(start)})\nCHECKPOINT LOCATION: 0/{lsn + 0x38:X}\n"
                "BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-25 12:00:00 UTC\n"
                "LABEL: test\nSTART TIMELINE: 1\n"
            )
            stores = [app.store(n) for n in sc.sites]
            await snapshot.take_snapshot(
                "pg", backup_config(sc, backup), repo, app.spool, stores, app.cache_dir, app.pool, app.workers
            )
        await ship(app)
        dry = await app.forget("pg", dry_run=True)
        assert dry.wal_forgotten == 4 * 2
        for s in ("a", "b"):  # a dry run deletes nothing
            assert len(await wal_names(app, s)) == 7
        o = await app.forget("pg")
        assert len(o.plan.forget) == 1 and o.wal_forgotten == 4 * 2  # segments 1 to 4, at two sites
        for s in ("a", "b"):  # the kept backup starts at segment 5
            assert await wal_names(app, s) == {seg(5), seg(6), "00000002.history"}
    finally:
        await app.close()
