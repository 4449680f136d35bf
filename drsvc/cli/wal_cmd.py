"""drsvc wal-push SOURCE PATH, drsvc wal-fetch SOURCE NAME PATH: PostgreSQL's archive and restore commands.

    archive_command = 'drsvc -c /etc/drsvc/drsvc.toml wal-push SOURCE %p'
    restore_command = 'drsvc -c /etc/drsvc/drsvc.toml wal-fetch SOURCE %f %p'     (written by drsvc restore)

Both normally run in ``wal_fast`` before the CLI is loaded; these handlers take the calls it leaves: wal-fetch
of a file not in the prefetch cache (open the repository, fetch from any site, verify), and odd command
lines. Exit codes of wal-fetch, as PostgreSQL reads them: 0 the file is at PATH; 1 no reachable site has it
(the end of the archive, for PostgreSQL); 126 it could not be read (sites unreachable, every copy corrupt,
a broken config): above 125, PostgreSQL stops recovery instead of ending it with data missing.
`wal-prefetch` (not listed) is the detached process that fills the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from drsvc import wal
from drsvc.app import App
from drsvc.cli import wal_fast
from drsvc.core.config import load_config
from drsvc.core.durable import write_file
from drsvc.core.pgwal import is_segment
from restore.wal import WalMissing

EXIT_MISSING = 1


def register(sub: Any) -> None:
    p = sub.add_parser("wal-push", help="archive_command: make a WAL file durable in the spool")
    p.add_argument("source", help="a postgres source")
    p.add_argument("path", help="the file, as PostgreSQL's %%p names it")
    p.set_defaults(handler=run_push)

    f = sub.add_parser("wal-fetch", help="restore_command: fetch a WAL file from any site, verified")
    f.add_argument("source", help="a postgres source")
    f.add_argument("name", help="the WAL file's name (%%f)")
    f.add_argument("path", help="where to write it (%%p)")
    f.add_argument("--cache", help="prefetch directory (default: drsvc-prefetch beside PATH)")
    f.add_argument(
        "--prefetch",
        type=int,
        default=wal_fast.DEFAULT_PREFETCH,
        help=f"segments to fetch ahead in the background (default {wal_fast.DEFAULT_PREFETCH}; 0: none)",
    )
    f.add_argument(
        "--only-site",
        metavar="NAME",
        help="read this site alone, never another (a drill's recovery with the other sites deemed lost)",
    )
    f.set_defaults(handler=run_fetch)

    q = sub.add_parser("wal-prefetch")  # no help: internal, started by wal-fetch
    q.add_argument("source")
    q.add_argument("after")
    q.add_argument("--seg-size", type=int, required=True)
    q.add_argument("--count", type=int, required=True)
    q.add_argument("--cache", type=Path, required=True)
    q.add_argument("--lock-fd", type=int, required=True)
    q.add_argument("--only-site")
    q.set_defaults(handler=run_prefetch)


async def run_push(args: argparse.Namespace) -> int:
    return wal_fast.run_push(args.config, args.source, args.path)


async def run_fetch(args: argparse.Namespace) -> int:
    cached = wal_fast.fetch_cached(
        args.config, args.source, args.name, args.path, args.cache, args.prefetch, args.only_site
    )
    if cached is not None:
        return cached
    try:
        async with App(load_config(args.config)) as app:
            got = await wal.fetch_wal(app, args.source, args.name, only_site=args.only_site)
        write_file(Path(args.path), got.data, fsync=False)  # PostgreSQL reads it now; a crash fetches again
    except WalMissing:
        return EXIT_MISSING  # quietly: PostgreSQL asks for files past the end of the archive all the time
    except Exception as exc:  # whatever it is, recovery must stop rather than end early
        print(f"drsvc wal-fetch: error: {exc}", file=sys.stderr)
        return wal_fast.EXIT_ABORT_RECOVERY
    if args.prefetch > 0 and is_segment(args.name):
        cache = wal_fast.cache_dir(args.path, args.cache)
        try:
            wal_fast.start_prefetch(
                args.config, args.source, args.name, len(got.data), args.prefetch, cache, args.only_site
            )
        except OSError:
            pass  # costs speed only: the file is in place
    return 0


async def run_prefetch(args: argparse.Namespace) -> int:
    """Fill the cache while holding the lock `wal-fetch` passed down (it goes when this process exits)."""
    async with App(load_config(args.config)) as app:
        await wal.prefetch_wal(
            app, args.source, args.after, args.seg_size, args.count, args.cache, only_site=args.only_site
        )
    return 0
