"""Replication throughput: drsvc to 1, 2 and 3 SeaweedFS sites beside rclone and restic to one, in one run.

    python -m benchmarks.replication [--scale 1.0] [--data /tmp/bench-data] [--work /tmp/bench-replication]

Generates a fresh dataset (the same generator, seed and scale as `benchmarks.run`) and starts three
throw-away SeaweedFS sites (`benchmarks.anchors.seaweed_s3`, one `weed mini` process each, own ports and
data directory). Then, on the same tree:

- drsvc, for N = 1, 2, 3: a fresh config and state directory, a freshly initialised tenant in buckets that
  no earlier run used (``drsvc-n<N>`` on each of the first N sites, so nothing is deduplicated across runs),
  the source listing those N sites with ``min_copies = N``; ``drsvc snapshot data --json`` returns once
  the snapshot is stored at all N sites (its ``protected`` is checked).
- ``rclone copy SRC sw:rclone-bench --transfers 4`` to site 1 (an S3 remote configured by environment).
- restic (defaults) to a fresh repository on site 1 with a fresh cache.

Each command runs through `benchmarks.anchors.run_measured` (wall time, peak PSS summed over its process
tree every 50 ms). MB/s = bytes of the source tree / wall seconds (10^6 bytes per MB); it is source
throughput, whatever number of sites it was shipped to. Prints a table and the targets with pass/fail;
writes JSON to benchmarks/results/replication.json. Every weed is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.anchors import (
    ResticRepo,
    S3Target,
    memory,
    restic_backup,
    restic_init,
    restic_version,
    run_measured,
    seaweed_s3,
)
from benchmarks.run import bucket_bytes, drsvc

MiB = 1024 * 1024
SITES = 3
RCLONE_BUCKET = "rclone-bench"
RESTIC_BUCKET = "restic-bench"
PSS_TARGET_MIB = 150.0


def write_config(work: Path, data: Path, sites: list[S3Target], n: int) -> Path:
    """drsvc config for N sites: its own state dir, bucket drsvc-n<N> on each of the first N sites."""
    cfg = work / f"drsvc-n{n}.toml"
    state = work / f"drsvc-n{n}-state"
    text = f'[state]\ndir = "{state}"\n[tenants.bench.key.passphrase]\nvalue = "drsvc-bench"\n'
    names = []
    for i, s3 in enumerate(sites[:n], 1):
        names.append(f"s{i}")
        text += (
            f'[sites.s{i}]\ntype = "s3"\nendpoint = "{s3.endpoint}"\nbucket = "drsvc-n{n}"\n'
            "secure = false\ncreate_bucket = true\n"
            f'access_key = {{ value = "{s3.access_key}" }}\nsecret_key = {{ value = "{s3.secret_key}" }}\n'
        )
    text += (
        f'[sources.data]\ntenant = "bench"\ntype = "tree"\npath = "{data}"\n'
        f"sites = {json.dumps(names)}\nmin_copies = {n}\n"
    )
    cfg.write_text(text)
    return cfg


def run_drsvc(work: Path, data: Path, sites: list[S3Target], n: int, src_bytes: int) -> dict[str, Any]:
    cfg = write_config(work, data, sites, n)
    _, m_init = drsvc(cfg, "init", "bench")
    bucket = f"drsvc-n{n}"
    before = [bucket_bytes(s3, bucket) for s3 in sites[:n]]
    out, m = drsvc(cfg, "snapshot", "data", "--json")
    if not out.get("protected") or len(out.get("sites_holding", [])) != n:
        raise RuntimeError(f"drsvc to {n} sites: not protected: {out}")
    growth = [bucket_bytes(s3, bucket) - b for s3, b in zip(sites[:n], before, strict=True)]
    stats = out["stats"]
    return {
        "tool": "drsvc",
        "sites": n,
        "seconds": round(m.seconds, 2),
        "mb_per_s": round(src_bytes / 1e6 / m.seconds, 1),
        **memory(m),
        "init_seconds": round(m_init.seconds, 2),
        "self_seconds": out.get("seconds"),
        "bytes_total": int(stats["bytes_total"]),
        "bytes_stored": int(stats["bytes_stored"]),
        "site_growth_bytes": growth,
        "site_reports": out.get("sites"),
        "protected": out["protected"],
    }


def rclone_env(s3: S3Target, work: Path) -> dict[str, str]:
    # rclone 1.60 fails with "LoadCustomCABundleError ... unsupported transport" if AWS_CA_BUNDLE is set;
    # the sites are plain http, so no CA bundle is needed
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(
        RCLONE_CONFIG=str(work / "rclone.conf"),  # absent: the remote comes only from the variables below
        RCLONE_CONFIG_SW_TYPE="s3",
        RCLONE_CONFIG_SW_PROVIDER="SeaweedFS",
        RCLONE_CONFIG_SW_ENDPOINT=f"http://{s3.endpoint}",
        RCLONE_CONFIG_SW_ACCESS_KEY_ID=s3.access_key,
        RCLONE_CONFIG_SW_SECRET_ACCESS_KEY=s3.secret_key,
        RCLONE_CONFIG_SW_FORCE_PATH_STYLE="true",
    )
    return env


def rclone_version() -> str:
    return subprocess.run(["rclone", "version"], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )[0]


def run_rclone(work: Path, data: Path, s3: S3Target, src_bytes: int) -> dict[str, Any]:
    before = bucket_bytes(s3, RCLONE_BUCKET)
    m = run_measured(
        ["rclone", "copy", str(data), f"sw:{RCLONE_BUCKET}", "--transfers", "4"], rclone_env(s3, work)
    )
    if m.returncode != 0:
        raise RuntimeError(f"rclone copy exited {m.returncode}: {m.stderr.decode()[-2000:]}")
    return {
        "tool": "rclone",
        "sites": 1,
        "seconds": round(m.seconds, 2),
        "mb_per_s": round(src_bytes / 1e6 / m.seconds, 1),
        **memory(m),
        "site_growth_bytes": [bucket_bytes(s3, RCLONE_BUCKET) - before],
    }


def run_restic(work: Path, data: Path, s3: S3Target, src_bytes: int) -> dict[str, Any]:
    target = S3Target(s3.endpoint, RESTIC_BUCKET, s3.access_key, s3.secret_key)
    repo = ResticRepo(s3=target, cache_dir=work / "restic-cache")
    init = restic_init(repo)
    b = restic_backup(repo, data)
    return {
        "tool": "restic",
        "sites": 1,
        "seconds": b["seconds"],
        "mb_per_s": round(src_bytes / 1e6 / b["seconds"], 1),
        **{k: b[k] for k in ("peak_rss_mib", "peak_pss_mib", "peak_tree_rss_mib", "peak_tree_procs")},
        "init_seconds": init["seconds"],
        "bytes_processed": b["bytes_processed"],
        "added_bytes": b["added_bytes"],
        "site_growth_bytes": [b["repo_growth_bytes"]],
    }


def _fresh(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    return p


def run(data: Path, work: Path, scale: float) -> dict[str, Any]:
    _fresh(data)
    _fresh(work).mkdir(parents=True)
    gen = dataset.generate(data, scale)
    src_bytes = sum(p.stat().st_size for _, p in dataset.iter_files(data))
    print(f"dataset: {src_bytes / MiB:.1f} MiB in {gen['seconds']} s", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:  # on exit each weed gets SIGTERM, 2 s, then SIGKILL, by its PID
        sites = [
            stack.enter_context(seaweed_s3(work / f"weed{i}", bucket=RCLONE_BUCKET)) for i in range(SITES)
        ]
        print(f"sites: {', '.join(s.endpoint for s in sites)}", file=sys.stderr)
        for n in range(1, SITES + 1):
            rows.append(run_drsvc(work, data, sites, n, src_bytes))
            print(f"drsvc {n} sites: {rows[-1]}", file=sys.stderr)
        rows.append(run_rclone(work, data, sites[0], src_bytes))
        print(f"rclone: {rows[-1]}", file=sys.stderr)
        rows.append(run_restic(work, data, sites[0], src_bytes))
        print(f"restic: {rows[-1]}", file=sys.stderr)
        endpoints = [s.endpoint for s in sites]
    return {
        "scale": scale,
        "cores": os.cpu_count(),
        "restic_version": restic_version(),
        "rclone_version": rclone_version(),
        "dataset_bytes": src_bytes,
        "dataset_files": gen["files"],
        "site_endpoints": endpoints,
        "rows": rows,
    }


def table(res: dict[str, Any]) -> tuple[list[list[Any]], list[tuple[str, str, bool]]]:
    rows = res["rows"]
    restic = next(r for r in rows if r["tool"] == "restic")
    out = []
    for r in rows:
        per_site = sum(r["site_growth_bytes"]) / len(r["site_growth_bytes"]) / MiB
        ratio = round(r["mb_per_s"] / restic["mb_per_s"], 2) if restic["mb_per_s"] else None
        out.append(
            [r["tool"], r["sites"], r["seconds"], r["mb_per_s"], r["peak_pss_mib"], round(per_site, 1), ratio]
        )
    d2 = next(r for r in rows if r["tool"] == "drsvc" and r["sites"] == 2)
    x2 = round(d2["mb_per_s"] / restic["mb_per_s"], 2)
    pss = max(r["peak_pss_mib"] for r in rows if r["tool"] == "drsvc")
    targets = [
        ("drsvc to 2 sites MB/s >= restic to 1 site", f"{x2}x", x2 >= 1.0),
        (f"drsvc peak PSS, process tree <= {PSS_TARGET_MIB:.0f} MiB", f"{pss} MiB", pss <= PSS_TARGET_MIB),
    ]
    return out, targets


NOTES = (
    "notes: MB/s = source tree bytes / wall seconds of the whole command (10^6 B/MB), however many sites.",
    "  drsvc and restic compress, encrypt and deduplicate; rclone copies each file as-is (it neither",
    "  compresses, encrypts nor deduplicates), so its stored MiB is the raw tree.",
    "  stored MiB/site = growth of the tool's bucket per site. Peak PSS is the tool's process tree only",
    "  (the weed servers are separate processes and not counted). All sites are weed on this host.",
)


def render(res: dict[str, Any], rows: list[list[Any]], targets: list[tuple[str, str, bool]]) -> str:
    heads = ["tool", "sites", "seconds", "MB/s", "peak PSS MiB", "stored MiB/site", "vs restic 1 site"]
    widths = [6, 5, 8, 7, 12, 15, 16]
    fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [
        f"dataset {res['dataset_bytes'] / MiB:.1f} MiB, scale {res['scale']}, {res['cores']} cores, "
        f"{res['restic_version'].split(' compiled')[0]}, {res['rclone_version']}, "
        f"{len(res['site_endpoints'])} SeaweedFS sites (one weed each)",
        "",
        fmt.format(*heads),
        "-+-".join("-" * w for w in widths),
    ]
    for row in rows:
        lines.append(fmt.format(*(str(v) for v in row)))
    lines += ["", *NOTES, ""]
    lines += [f"{'target':<44} | {'actual':>10} | result", f"{'-' * 44}-+-{'-' * 10}-+-------"]
    for name, actual, ok in targets:
        lines.append(f"{name:<44} | {actual:>10} | {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.replication", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench-data"))
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/bench-replication"), help="sites, configs, caches"
    )
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "replication.json")
    a = ap.parse_args(argv)
    missing = [t for t in ("restic", "rclone") if shutil.which(t) is None]
    if missing:
        print(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})", file=sys.stderr)
        return 2
    res = run(a.data, a.work, a.scale)
    rows, targets = table(res)
    res["table"] = [
        dict(
            zip(
                ("tool", "sites", "seconds", "mb_per_s", "peak_pss_mib", "stored_mib_per_site", "vs_restic"),
                r,
                strict=True,
            )
        )
        for r in rows
    ]
    res["targets"] = [{"target": n, "actual": v, "pass": ok} for n, v, ok in targets]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res, rows, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
