"""drsvc drill --plan FILE [--json] [--report-dir DIR] [--no-evidence]: a scripted disaster-recovery drill.

Restores every source of the plan from each of its sites alone, verifies it, measures RPO and RTO against
the targets (drsvc.drill), writes the JSON and HTML report and seals it at the sites as evidence.

Exit codes: 0 every scenario passed; 6 (EXIT_DRILL_FAILED) a target was missed or a scenario failed (the
report names each miss); 2 a bad plan or config (the key is named).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from drsvc.app import App
from drsvc.cli.main import EXIT_DRILL_FAILED, EXIT_OK
from drsvc.cli.progress import ProgressReporter
from drsvc.cli.render import emit_json, err, out, size
from drsvc.core.config import load_config
from drsvc.drill import load_plan, run_drill


def register(sub: Any) -> None:
    p = sub.add_parser("drill", help="run a DR drill plan: restore from each site alone, verify, judge")
    p.add_argument("--plan", required=True, type=Path, help="the drill plan (TOML)")
    p.add_argument(
        "--report-dir", type=Path, help="where the JSON and HTML reports go (default: [drill] dir)"
    )
    p.add_argument("--no-evidence", action="store_true", help="do not store the sealed report at the sites")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    plan = load_plan(args.plan, config)
    with ProgressReporter.for_cli(as_json=args.json) as bar:
        async with App(config) as app:
            outcome = await run_drill(
                app, plan, bar, report_dir=args.report_dir, store_evidence=not args.no_evidence
            )
    rep = outcome.report
    if args.json:
        emit_json({**rep, "files": outcome.files, "evidence": outcome.evidence})
    else:
        for sc in rep["scenarios"]:
            out(_line(sc))
            for f in sc["fallbacks"]:
                out(f"      fallback: site {f['site']}: {f['key']}: {f['error']}")
            for failure in sc["failures"]:
                out(f"      {failure}")
        level = rep["level"]
        out(f"GB/T 20988-2007 level {level['gbt20988']} ({level['name']}): {level['reason']}")
        out(f"drill {rep['plan']} ({rep['id']}): {rep['verdict'].upper()}, {len(rep['misses'])} misses")
        for name, path in outcome.files.items():
            out(f"  {name} report: {path}")
        for where, result in outcome.evidence.items():
            out(f"  evidence at {where}: {result}")
    if outcome.passed:
        return EXIT_OK
    if not args.json:
        for miss in rep["misses"]:
            err(f"miss: {miss}")
    return EXIT_DRILL_FAILED


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g} s" if v < 1000 else f"{v:.0f} s"


def _line(sc: dict[str, Any]) -> str:
    rto = _secs(sc["rto_s"]) + (f" (target {_secs(sc['rto_target_s'])})" if sc["rto_target_s"] else "")
    rpo = _secs(sc["rpo_s"]) + (f" (target {_secs(sc['rpo_target_s'])})" if sc["rpo_target_s"] else "")
    alone = "" if sc.get("isolated", True) else ", needed the other sites"
    return (
        f"{sc['verdict'].upper():4} {sc['source']} @ {sc['site']} {sc['point']}: RTO {rto}, RPO {rpo}, "
        f"{sc['files']} files, {size(sc['bytes'])}, {len(sc['fallbacks'])} fallbacks{alone}"
    )
