"""A restored PostgreSQL in a drill: start it, wait for the end of recovery, run the probes, stop it.

1. ``probe_postgres`` finds the server's programs (``pg_bindir``) and, when run as root, runs them as the
   data directory's owner (``runuser``; a root-owned restore is given to ``postgres``).
2. ``pg_ctl start`` on a free port with a unix socket in the scenario's directory (or a short one under /tmp
   when that path is too long) and no TCP, archiving off.
3. Poll ``pg_is_in_recovery()`` until it is false or ``wait_s`` has passed; read the last replayed
   transaction's time (the restored point when the restore named none); run each probe with ``psql -At``
   and compare its output with ``expect``.
4. Always ``pg_ctl stop -m immediate``, and remove a socket directory made under /tmp.

Failures go into ``Server.failures``: this reports, it never raises for a server that misbehaves.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsvc.app import App
from drsvc.drill.plan import SourcePlan
from drsvc.wal import pg_bindir


@dataclass
class Server:
    """What probe_postgres found: whether recovery ended, the last replayed time, each probe, failures."""

    recovered: bool = False
    replayed_ns: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def probe_postgres(app: App, sp: SourcePlan, target: Path, sdir: Path, wait_s: float) -> Server:
    """Start PostgreSQL on the restored data directory (as the directory's owner when run as root, on a free
    port, a unix socket in the scenario's directory and no TCP), wait until recovery has ended, run each
    probe with ``psql -At``, and stop it with ``pg_ctl stop -m immediate`` whatever happened."""
    out = Server()
    bindir = pg_bindir(app.config.source(sp.source))
    if bindir is None:
        out.failures.append("PostgreSQL's programs were not found (set pg_bindir): the probes did not run")
        return out
    run_as, sock = await asyncio.to_thread(_prepare_postgres, target, sdir)
    log = sdir / "postgres.log"
    port = _free_port()
    opts = f"-p {port} -c listen_addresses='' -c unix_socket_directories='{sock}' -c archive_mode=off"
    pg_ctl = str(bindir / "pg_ctl")
    psql = [str(bindir / "psql"), "-X", "-h", str(sock), "-p", str(port), "-U", sp.user, "-At"]

    async def sql(query: str, db: str = "postgres") -> tuple[int, str]:
        rc, stdout, stderr = await _run([*run_as, *psql, "-d", db, "-v", "ON_ERROR_STOP=1", "-c", query], 120)
        return rc, stdout.strip() if rc == 0 else (stderr.strip() or f"psql exited with {rc}")

    started = False
    try:
        rc, _, err = await _run(
            [
                *run_as,
                pg_ctl,
                "start",
                "-w",
                "-t",
                str(int(wait_s)),
                "-D",
                str(target),
                "-l",
                str(log),
                "-o",
                opts,
            ],
            wait_s + 30,
        )
        started = True
        if rc != 0:
            out.failures.append(f"PostgreSQL did not start on the restored data: {err.strip()} {_tail(log)}")
            return out
        deadline = time.monotonic() + wait_s
        while True:
            rc, got = await sql("SELECT pg_is_in_recovery()")
            if rc == 0 and got == "f":
                break
            if time.monotonic() > deadline:
                out.failures.append(f"recovery did not end within {_secs(wait_s)} s: {got} {_tail(log)}")
                return out
            await asyncio.sleep(0.2)
        out.recovered = True
        rc, got = await sql("SELECT extract(epoch FROM pg_last_xact_replay_timestamp())")
        if rc == 0 and got:
            out.replayed_ns = int(float(got) * 1e9)
        for p in sp.probes:
            rc, got = await sql(p.sql, p.database)
            ok = rc == 0 and got == p.expect
            out.probes.append({"sql": p.sql, "expect": p.expect, "got": got, "ok": ok})
            if not ok:
                out.failures.append(f"probe {p.sql!r} gave {got!r}, expected {p.expect!r}")
    finally:
        if started and (target / "postmaster.pid").exists():
            await _run([*run_as, pg_ctl, "stop", "-m", "immediate", "-w", "-D", str(target)], 120)
        if sock.parent != sdir:
            await asyncio.to_thread(shutil.rmtree, sock, True)
    return out


def _prepare_postgres(target: Path, sdir: Path) -> tuple[list[str], Path]:
    """The command prefix to run as the data directory's owner (root: ``runuser``; PostgreSQL refuses to run
    as root, so a root-owned restore is given to `postgres`), and a socket directory that user owns."""
    sock = sdir / "s"
    if len(str(sock)) > 90:  # a unix socket path is at most 107 bytes, ".s.PGSQL.<port>" included
        sock = Path(tempfile.mkdtemp(prefix="drsvc-drill-", dir="/tmp"))
    else:
        sock.mkdir(mode=0o700)
    if os.geteuid() != 0:
        return [], sock
    st = os.stat(target)
    uid, gid = st.st_uid, st.st_gid
    if uid == 0:
        pw = pwd.getpwnam("postgres")
        uid, gid = pw.pw_uid, pw.pw_gid
        for dirpath, dirs, files in os.walk(target):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(dirpath, name), uid, gid)
        os.chown(target, uid, gid)
    for d in (sdir, sock):
        os.chown(d, uid, gid)
    return ["runuser", "-u", pwd.getpwuid(uid).pw_name, "--"], sock


async def _run(args: list[str], limit_s: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "", f"{args[0]} timed out after {_secs(limit_s)} s"
    return proc.returncode or 0, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path, n: int = 5) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "(log: " + " | ".join(lines) + ")" if lines else ""


def _secs(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"
