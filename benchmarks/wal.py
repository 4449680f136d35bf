"""Per-call time of `drsvc wal-push` (archive_command) and `drsvc wal-fetch` (restore_command).

    python -m benchmarks.wal [--segments 60] [--work /tmp/bench-wal]

PostgreSQL calls these one at a time, so one process per segment, in sequence, is what is timed (each
call from spawn to exit, as PostgreSQL's archiver sees it):

- wal-push, new: a fresh 16 MiB segment each call: copied, fsync'd, linked, directory fsync'd.
- wal-push, again: the same segments once more (PostgreSQL retrying after a crash): compared, not copied.
- wal-fetch, cache hit: the segment is in the prefetch directory and moved into place.
- wal-fetch, miss: opened from a local site (imports, config, key slot, read, verify, decompress).
- python -c pass: the interpreter alone, with this venv's site (the floor of any per-call path).
- daemon: ingest: the daemon's side of wal-push, in one process: read, compress, seal, spool (fsync'd).

Compiled bytecode is kept in a directory of its own (PYTHONPYCACHEPREFIX) and warmed first: an installed
drsvc has its .pyc files, and PYTHONDONTWRITEBYTECODE would otherwise make every call compile its modules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from drsvc import wal
from drsvc.app import App
from drsvc.core import pgwal
from drsvc.core.config import load_config
from drsvc.core.crypto import ScryptParams
from replicator import replicate

SEG = 16 * 1024 * 1024
DRSVC = str(Path(sys.executable).with_name("drsvc"))


def segment() -> bytes:
    """A 16 MiB segment: a long page header, 2 MiB of varied bytes, zeros (a segment switched early)."""
    header = pgwal.LONG_HEADER.pack(0xD110, pgwal.XLP_LONG_HEADER, 1, 0, 0, 7000000000000000001, SEG, 8192)
    body = os.urandom(2 * 1024 * 1024)
    return header + body + bytes(SEG - len(header) - len(body))


def timed(args: list[str], env: dict[str, str], unlink: Path | None = None) -> float:
    if unlink is not None:  # PostgreSQL removes RECOVERYXLOG before it asks for the next file
        unlink.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def summary(name: str, seconds: list[float]) -> dict[str, float | str]:
    ordered = sorted(seconds)
    return {
        "case": name,
        "calls": len(seconds),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
        "per_s": round(len(seconds) / sum(seconds), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=60)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-wal"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "pg_wal").mkdir(parents=True)
    config = work / "drsvc.toml"
    config.write_text(
        '[state]\ndir = "state"\n[tenants.t.key.passphrase]\nvalue = "bench passphrase"\n'
        '[sites.local]\ntype = "local"\npath = "site"\n'
        f'[sources.pg]\ntenant = "t"\ntype = "postgres"\npath = "{work}/pgdata"\nsites = ["local"]\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    names = [pgwal.segment_name(1, i + 1, SEG) for i in range(args.segments)]
    for name in names:
        (work / "pg_wal" / name).write_bytes(segment())
    warm = work / "warm"
    warm.mkdir()
    (warm / pgwal.segment_name(1, 999, SEG)).write_bytes(segment())
    push = [DRSVC, "-c", str(config), "wal-push", "pg"]
    for _ in range(3):  # compile the bytecode of both paths, fill the page cache
        subprocess.run([*push, str(next(warm.iterdir()))], env=env, check=False)
        subprocess.run(
            [DRSVC, "-c", str(config), "wal-fetch", "pg", names[0], str(work / "x")],
            env=env,
            stderr=subprocess.DEVNULL,
        )
    shutil.rmtree(work / "state")

    results = [
        summary("python -c pass (the floor)", [timed([sys.executable, "-c", "pass"], env) for _ in names]),
        summary("wal-push, new segment", [timed([*push, str(work / "pg_wal" / n)], env) for n in names]),
        summary("wal-push, pushed before", [timed([*push, str(work / "pg_wal" / n)], env) for n in names]),
    ]

    async def spool_and_ship() -> float:
        async with App(load_config(config), workers=2) as app:
            await app.init_tenant("t", ScryptParams())
            started = time.perf_counter()
            assert len(await wal.ingest_wal(app, "pg")) == len(names)
            took = time.perf_counter() - started
            await replicate(app.spool, [app.store("local")])
            return took

    ingest = asyncio.run(spool_and_ship())
    results.append(
        {
            "case": "daemon: ingest (seal, spool)",
            "calls": len(names),
            "p50_ms": "",
            "p99_ms": "",
            "per_s": round(len(names) / ingest, 1),
        }
    )
    restore_wal = work / "restore" / "pg_wal"
    cache = restore_wal / pgwal.PREFETCH_DIR
    cache.mkdir(parents=True)
    for n in names:
        shutil.copyfile(work / "pg_wal" / n, cache / n)
    fetch = [DRSVC, "-c", str(config), "wal-fetch", "--prefetch", "0", "pg"]
    dest = restore_wal / "RECOVERYXLOG"
    hits = [timed([*fetch, n, str(dest)], env, dest) for n in names]
    results.append(summary("wal-fetch, prefetched", hits))
    misses = [timed([*fetch, n, str(dest)], env, dest) for n in names[:20]]
    results.append(summary("wal-fetch, from the site", misses))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'case':28} {'calls':>5} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8}")
    for r in results:
        print(f"{r['case']:28} {r['calls']:>5} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['per_s']:>8}")


if __name__ == "__main__":
    main()
