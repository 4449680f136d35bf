"""drsvc restore SOURCE --at latest|TIME --to DIR [--site NAME] [--json].

Progress goes to stderr while the restore runs (a bar on a terminal, plain lines otherwise, nothing with
--json); the result goes to stdout afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from drsvc.app import App
from drsvc.cli.main import EXIT_INTEGRITY
from drsvc.cli.progress import ProgressReporter
from drsvc.cli.render import emit_json, err, out, size, when
from drsvc.core.config import load_config, parse_point
from drsvc.core.errors import ConfigError
from restore.logreplay import LogRestoreResult
from restore.postgres import PostgresRestoreResult


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
        at = parse_point(args.at)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--at") from None
    config = load_config(args.config)
    with ProgressReporter.for_cli(as_json=args.json, label=f"restore {args.source}") as progress:
        async with App(config) as app:
            r = await app.restore(args.source, args.to, at, args.site, progress=progress)
    if isinstance(r, LogRestoreResult):
        return _log_result(r, at, args.json)
    if isinstance(r, PostgresRestoreResult):
        return _postgres_result(r, at, args.json)
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


def _log_result(r: LogRestoreResult, at: int | None, as_json: bool) -> int:
    """A log source's restore: checkpoint plus segments. A gap in the change log restores what precedes it
    and exits EXIT_INTEGRITY, naming what is missing."""
    if as_json:
        emit_json(
            {
                "source": r.source,
                "kind": "log",
                "recovery_point": when(r.recovery_point_ns),
                "rpo_achieved_s": r.rpo_achieved_s,
                "reached_latest": r.reached_latest,
                "checkpoint": r.checkpoint,
                "stream": r.stream,
                "segments": r.segments,
                "target": r.target,
                "site": r.site,
                "files": r.files,
                "bytes": r.bytes,
                "seconds": round(r.seconds, 3),
                "gap": r.gap.describe() if r.gap else None,
                "fallbacks": [f.__dict__ for f in r.fallbacks],
                "warnings": r.warnings,
            }
        )
        return EXIT_INTEGRITY if r.gap else 0
    for f in r.fallbacks:
        err(f"warning: site {f.site}: {f.key}: {f.error}; read from another site")
    for w in r.warnings:
        err(f"warning: {w}")
    start = f"checkpoint {r.checkpoint[:16]}" if r.checkpoint else "the start of the stream"
    out(f"restored {r.source} into {r.target}: {start} plus {r.segments} change-log segments")
    out(f"  {r.files} files, {size(r.bytes)}, every segment and blob verified")
    rpo = f" (requested {when(at)}, achieved RPO {r.rpo_achieved_s:.1f}s)" if at is not None else ""
    latest = "; the latest protected point" if r.reached_latest else ""
    out(f"  recovery point: {when(r.recovery_point_ns)}{rpo}{latest}")
    out(f"  from site {r.site}; {len(r.fallbacks)} fallbacks; took {r.seconds:.2f}s")
    if r.gap:
        err(f"error: the change log has a gap: {r.gap.describe()}; restored up to just before it")
        return EXIT_INTEGRITY
    return 0


def _postgres_result(r: PostgresRestoreResult, at: int | None, as_json: bool) -> int:
    """A postgres source's restore: the base backup laid down with recovery settings; PostgreSQL started on
    the target replays the WAL (fetched by `drsvc wal-fetch`) to the recovery point."""
    b, w = r.base, r.wal
    point = r.recovery_point_ns
    if as_json:
        emit_json(
            {
                "source": b.source,
                "kind": "postgres",
                "base_backup": b.snapshot.id,
                "base_backup_time": when(b.snapshot.time_ns),
                "target": b.target,
                "site": b.site,
                "recovery_target_time": when(w.target_ns) if w.target_ns is not None else None,
                "recovery_point": when(point) if point is not None else None,
                "rpo_achieved_s": r.rpo_achieved_s,
                "past_end": w.past_end,
                "wal": {"start": w.start, "stop": w.stop, "end": w.end, "gap": w.gap},
                "restore_command": r.restore_command,
                "warnings": w.warnings,
                "fallbacks": [f.__dict__ for f in b.fallbacks],
            }
        )
        return EXIT_INTEGRITY if w.gap else 0
    for f in b.fallbacks:
        err(f"warning: site {f.site}: {f.key}: {f.error}; read from another site")
    for warning in w.warnings:
        err(f"warning: {warning}")
    out(f"restored {b.source} base backup {b.snapshot.id[:16]} ({when(b.snapshot.time_ns)}) into {b.target}")
    out(f"  {b.files} files, {size(b.bytes)}, every blob verified; from site {b.site}, took {b.seconds:.2f}s")
    out(f"  WAL from {w.start} to {w.end} in the archive; replay with: {r.restore_command}")
    if w.target_ns is not None:
        out(f"  recovery_target_time = {when(w.target_ns)}: start PostgreSQL on the target to recover to it")
    else:
        out(f"  no target time: PostgreSQL replays every archived WAL segment (the end: {w.end})")
    if w.past_end and at is not None:
        rpo = f", achieved RPO {r.rpo_achieved_s:.1f}s" if r.rpo_achieved_s is not None else ""
        out(f"  requested {when(at)} is past the end of the archive{rpo}")
    if w.gap:
        err(f"error: WAL segment {w.gap} is missing at every site: replay stops before it")
        return EXIT_INTEGRITY
    return 0
