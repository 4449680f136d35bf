"""drsvc restore SOURCE --at latest|TIME --to DIR [--site NAME]."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from drsvc.app import App
from drsvc.cli.render import emit_json, err, out, parse_time, size, when
from drsvc.core.config import load_config
from drsvc.core.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("restore", help="restore a source to a point in time")
    p.add_argument("source")
    p.add_argument("--at", default="latest", help="'latest', ISO 8601 time, or @epoch-seconds")
    p.add_argument("--to", required=True, type=Path, help="target directory (absent or empty)")
    p.add_argument("--site", help="preferred site (others are used only as fallback)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    try:
        at = parse_time(args.at)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--at") from None
    async with App(load_config(args.config)) as app:
        r = await app.restore(args.source, args.to, at, args.site)
    if args.json:
        emit_json(
            {
                "source": r.source,
                "snapshot": r.snapshot.id,
                "recovery_point": when(r.recovery_point_ns),
                "rpo_achieved_s": r.rpo_achieved_s,
                "target": r.target,
                "site": r.site,
                "files": r.files,
                "dirs": r.dirs,
                "symlinks": r.symlinks,
                "bytes": r.bytes,
                "seconds": round(r.seconds, 3),
                "fallbacks": [f.__dict__ for f in r.fallbacks],
            }
        )
        return 0
    for f in r.fallbacks:
        err(f"warning: site {f.site}: {f.key}: {f.error}; read from another site")
    out(f"restored {r.source} snapshot {r.snapshot.id[:16]} into {r.target}")
    out(f"  {r.files} files, {r.dirs} dirs, {r.symlinks} symlinks, {size(r.bytes)}, every blob verified")
    out(
        f"  recovery point: {when(r.recovery_point_ns)}"
        + (
            f" (requested {when(at)}, achieved RPO {r.rpo_achieved_s:.0f}s)"
            if at is not None and r.rpo_achieved_s is not None
            else ""
        )
    )
    out(
        f"  from site {r.site}; {len(r.fallbacks)} fallbacks; took {r.seconds:.2f}s "
        f"({size(r.bytes / max(r.seconds, 1e-9))}/s)"
    )
    return 0
