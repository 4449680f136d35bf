"""drsvc against restic on the benchmark dataset, one run, same dataset states for both tools.

    python -m benchmarks.run [--scale 1.0] [--data /tmp/bench-data] [--work /tmp/bench-run] [--no-s3]

Steps: generate a fresh dataset; drsvc init + full snapshot to a local site, restic init + full backup to a
local repository (same tree); ``dataset mutate --round 1``; both incrementals; both restores of the latest
state into empty directories. Then the S3 case: a throw-away SeaweedFS (`benchmarks.anchors.seaweed_s3`)
on loopback, and a full snapshot of the (mutated) tree by each tool to ONE S3 bucket, drsvc with a fresh
state directory and tenant repository (nothing deduplicated against the local run), restic into a fresh
repository with a fresh cache; weed is stopped afterwards.

Each tool runs as a subprocess (`benchmarks.anchors.run_measured`): wall time of the whole command, the
process's own peak RSS (``os.wait4``), and the peak sums of PSS and RSS over its process tree (the process
plus all descendants, e.g. drsvc's forkserver and worker processes), sampled every 50 ms. Prints a table
(metric | drsvc | restic | ratio) and the targets with pass/fail; writes JSON to benchmarks/results/run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.anchors import (
    Measured,
    ResticRepo,
    S3Target,
    memory,
    restic_backup,
    restic_init,
    restic_restore,
    restic_version,
    run_measured,
    seaweed_s3,
)

MiB = 1024 * 1024
DRSVC = str(Path(sys.executable).parent / "drsvc")


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for _, p in dataset.iter_files(root)) if root.exists() else 0


def write_config(work: Path, data: Path) -> Path:
    cfg = work / "drsvc.toml"
    cfg.write_text(
        f'[state]\ndir = "{work / "drsvc-state"}"\n'
        '[tenants.bench.key.passphrase]\nvalue = "drsvc-bench"\n'
        f'[sites.local]\ntype = "local"\npath = "{work / "drsvc-site"}"\n'
        f'[sources.data]\ntenant = "bench"\ntype = "tree"\npath = "{data}"\nsites = ["local"]\n'
    )
    return cfg


DRSVC_BUCKET = "drsvc-bench"
RESTIC_BUCKET = "restic-bench"


def write_s3_config(work: Path, data: Path, s3: S3Target) -> Path:
    """A second config: its own state directory, one S3 site (bucket DRSVC_BUCKET), the same data tree."""
    cfg = work / "drsvc-s3.toml"
    cfg.write_text(
        f'[state]\ndir = "{work / "drsvc-s3-state"}"\n'
        '[tenants.bench.key.passphrase]\nvalue = "drsvc-bench"\n'
        f'[sites.s3]\ntype = "s3"\nendpoint = "{s3.endpoint}"\nbucket = "{DRSVC_BUCKET}"\n'
        "secure = false\ncreate_bucket = true\n"
        f'access_key = {{ value = "{s3.access_key}" }}\nsecret_key = {{ value = "{s3.secret_key}" }}\n'
        f'[sources.data]\ntenant = "bench"\ntype = "tree"\npath = "{data}"\nsites = ["s3"]\n'
    )
    return cfg


def bucket_bytes(s3: S3Target, bucket: str) -> int:
    from minio import Minio

    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure)
    if not client.bucket_exists(bucket):
        return 0
    return sum(int(o.size or 0) for o in client.list_objects(bucket, recursive=True))


def drsvc(cfg: Path, *args: str) -> tuple[dict[str, Any], Measured]:
    """Run drsvc; (parsed --json output or {}, the measurement)."""
    m = run_measured([DRSVC, "-c", str(cfg), *args])
    if m.returncode != 0:
        raise RuntimeError(f"drsvc {' '.join(args)} exited {m.returncode}: {m.stderr.decode()[-2000:]}")
    out = json.loads(m.stdout) if "--json" in args else {}
    return out, m


def drsvc_snapshot(cfg: Path, stored: Callable[[], int]) -> dict[str, Any]:
    """Snapshot source `data`; `stored()` gives the bytes the site holds (before and after)."""
    before = stored()
    out, m = drsvc(cfg, "snapshot", "data", "--json")
    stats = out["stats"]
    return {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "bytes_stored": int(stats["bytes_stored"]),
        "site_growth_bytes": stored() - before,
        "bytes_total": int(stats["bytes_total"]),
        "mb_per_s": round(int(stats["bytes_total"]) / 1e6 / m.seconds, 1),
        "self_seconds": out.get("seconds"),
        "files_unchanged": stats.get("files_unchanged"),
    }


def drsvc_restore(cfg: Path, target: Path) -> dict[str, Any]:
    out, m = drsvc(cfg, "restore", "data", "--to", str(target), "--json")
    restored = _dir_bytes(target)
    return {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "bytes_restored": restored,
        "mb_per_s": round(restored / 1e6 / m.seconds, 1),
        "self_seconds": out.get("seconds"),
    }


def _fresh(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    return p


def run(data: Path, work: Path, scale: float, s3: bool = True) -> dict[str, Any]:
    _fresh(data)
    _fresh(work).mkdir(parents=True)
    gen = dataset.generate(data, scale)
    print(f"dataset: {gen['total_bytes'] / MiB:.1f} MiB in {gen['seconds']} s", file=sys.stderr)

    cfg = write_config(work, data)
    site = work / "drsvc-site"
    repo = ResticRepo(local=work / "restic-repo", cache_dir=work / "restic-cache")
    d: dict[str, Any] = {}
    r: dict[str, Any] = {}
    _, m = drsvc(cfg, "init", "bench")
    d["init"] = {"seconds": round(m.seconds, 2), **memory(m)}
    r["init"] = restic_init(repo)

    d["full"] = drsvc_snapshot(cfg, lambda: _dir_bytes(site))
    print(f"drsvc full: {d['full']}", file=sys.stderr)
    r["full"] = restic_backup(repo, data)
    print(f"restic full: {r['full']}", file=sys.stderr)

    mut = dataset.mutate(data, 1)
    real = int(mut["real_change_bytes"])
    print(f"mutate round 1: real change {real} B", file=sys.stderr)

    d["incremental"] = drsvc_snapshot(cfg, lambda: _dir_bytes(site))
    print(f"drsvc incremental: {d['incremental']}", file=sys.stderr)
    r["incremental"] = restic_backup(repo, data)
    print(f"restic incremental: {r['incremental']}", file=sys.stderr)

    d["restore"] = drsvc_restore(cfg, _fresh(work / "restore-drsvc"))
    print(f"drsvc restore: {d['restore']}", file=sys.stderr)
    restore_r = _fresh(work / "restore-restic")
    restore_r.mkdir(parents=True)
    r["restore"] = restic_restore(repo, restore_r)
    print(f"restic restore: {r['restore']}", file=sys.stderr)

    d["site_bytes"] = _dir_bytes(site)
    r["repo_bytes"] = repo.stored_bytes()
    if s3:
        run_s3(data, work, d, r)
    return {
        "scale": scale,
        "cores": os.cpu_count(),
        "restic_version": restic_version(),
        "dataset_bytes": gen["total_bytes"],
        "real_change_bytes": real,
        "mutation": mut,
        "drsvc": d,
        "restic": r,
    }


def run_s3(data: Path, work: Path, d: dict[str, Any], r: dict[str, Any]) -> None:
    """Full snapshot of `data` to one S3 site by each tool: fresh drsvc state, fresh restic repo and cache."""
    with seaweed_s3(work / "weed", bucket=RESTIC_BUCKET) as s3:
        cfg = write_s3_config(work, data, s3)
        _, m = drsvc(cfg, "init", "bench")
        d["s3_init"] = {"seconds": round(m.seconds, 2), **memory(m)}
        d["s3_full"] = drsvc_snapshot(cfg, lambda: bucket_bytes(s3, DRSVC_BUCKET))
        print(f"drsvc S3 full: {d['s3_full']}", file=sys.stderr)
        repo = ResticRepo(s3=s3, cache_dir=work / "restic-cache-s3")
        r["s3_init"] = restic_init(repo)
        r["s3_full"] = restic_backup(repo, data)
        print(f"restic S3 full: {r['s3_full']}", file=sys.stderr)
        d["s3_endpoint"] = r["s3_endpoint"] = s3.endpoint


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


STEPS = ("full", "incremental", "restore", "s3_full")


def _max(side: dict[str, Any], key: str) -> float:
    return float(max(side[k][key] for k in STEPS if k in side))


def table(res: dict[str, Any]) -> tuple[list[tuple[str, Any, Any, Any]], list[tuple[str, str, bool]]]:
    d, r, real = res["drsvc"], res["restic"], res["real_change_bytes"]
    d_inc_stored = d["incremental"]["bytes_stored"]
    r_inc_stored = r["incremental"]["repo_growth_bytes"]
    rows: list[tuple[str, Any, Any, Any]] = []

    def row(name: str, dv: float, rv: float) -> None:
        rows.append((name, dv, rv, _ratio(dv, rv)))

    def mem(step: str, label: str) -> None:
        row(f"{label} peak PSS MiB (tree)", d[step]["peak_pss_mib"], r[step]["peak_pss_mib"])
        row(f"{label} peak RSS MiB (process)", d[step]["peak_rss_mib"], r[step]["peak_rss_mib"])

    row("full seconds", d["full"]["seconds"], r["full"]["seconds"])
    row("full MB/s", d["full"]["mb_per_s"], r["full"]["mb_per_s"])
    row(
        "full stored MiB",
        round(d["full"]["bytes_stored"] / MiB, 1),
        round(r["full"]["repo_growth_bytes"] / MiB, 1),
    )
    mem("full", "full")
    row("incr seconds", d["incremental"]["seconds"], r["incremental"]["seconds"])
    row("incr stored bytes", d_inc_stored, r_inc_stored)
    row("incr stored / real change", round(d_inc_stored / real, 2), round(r_inc_stored / real, 2))
    mem("incremental", "incr")
    row("restore seconds", d["restore"]["seconds"], r["restore"]["seconds"])
    row("restore MB/s", d["restore"]["mb_per_s"], r["restore"]["mb_per_s"])
    mem("restore", "restore")
    row("total stored MiB", round(d["site_bytes"] / MiB, 1), round(r["repo_bytes"] / MiB, 1))
    if "s3_full" in d:
        row("S3 full seconds", d["s3_full"]["seconds"], r["s3_full"]["seconds"])
        row("S3 full MB/s", d["s3_full"]["mb_per_s"], r["s3_full"]["mb_per_s"])
        row(
            "S3 full stored MiB",
            round(d["s3_full"]["site_growth_bytes"] / MiB, 1),
            round(r["s3_full"]["repo_growth_bytes"] / MiB, 1),
        )
        mem("s3_full", "S3 full")
    d_pss = _max(d, "peak_pss_mib")
    row("max peak PSS MiB (tree)", d_pss, _max(r, "peak_pss_mib"))
    row("max peak RSS MiB (tree sum)", _max(d, "peak_tree_rss_mib"), _max(r, "peak_tree_rss_mib"))
    row("max peak RSS MiB (process)", _max(d, "peak_rss_mib"), _max(r, "peak_rss_mib"))
    row("max processes in tree", int(_max(d, "peak_tree_procs")), int(_max(r, "peak_tree_procs")))

    full_x = _ratio(d["full"]["mb_per_s"], r["full"]["mb_per_s"]) or 0.0
    inc_x = _ratio(d["incremental"]["seconds"], r["incremental"]["seconds"]) or 0.0
    stored_x = round(d_inc_stored / real, 2)
    rest_x = _ratio(d["restore"]["mb_per_s"], r["restore"]["mb_per_s"]) or 0.0
    targets = [
        ("full MB/s >= 2x restic", f"{full_x}x", full_x >= 2),
        ("incremental time <= 0.5x restic", f"{inc_x}x", inc_x <= 0.5),
        ("incremental bytes stored <= 2x real change", f"{stored_x}x", stored_x <= 2),
        ("restore MB/s >= 2x restic", f"{rest_x}x", rest_x >= 2),
    ]
    if "s3_full" in d:
        s3_x = _ratio(d["s3_full"]["mb_per_s"], r["s3_full"]["mb_per_s"]) or 0.0
        targets.append(("S3 full MB/s (one site) >= 1.3x restic", f"{s3_x}x", s3_x >= 1.3))
    targets.append(("peak PSS, process tree <= 150 MiB", f"{d_pss} MiB", d_pss <= 150))
    return rows, targets


def render(
    res: dict[str, Any], rows: list[tuple[str, Any, Any, Any]], targets: list[tuple[str, str, bool]]
) -> str:
    lines = [
        f"dataset {res['dataset_bytes'] / MiB:.1f} MiB, real change {res['real_change_bytes']} B, "
        f"scale {res['scale']}, {res['cores']} cores, {res['restic_version']}",
        "",
        f"{'metric':<32} | {'drsvc':>12} | {'restic':>12} | {'ratio':>6}",
        f"{'-' * 32}-+-{'-' * 12}-+-{'-' * 12}-+-{'-' * 6}",
    ]
    for name, dv, rv, ratio in rows:
        lines.append(f"{name:<32} | {dv!s:>12} | {rv!s:>12} | {ratio!s:>6}")
    lines += ["", f"{'target':<44} | {'actual':>10} | result", f"{'-' * 44}-+-{'-' * 10}-+-------"]
    for name, actual, ok in targets:
        lines.append(f"{name:<44} | {actual:>10} | {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench-data"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-run"), help="site, repo, caches, restores")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "run.json")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True, help="the S3 case (weed)")
    a = ap.parse_args(argv)
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic)", file=sys.stderr)
        return 2
    res = run(a.data, a.work, a.scale, a.s3)
    rows, targets = table(res)
    res["table"] = [{"metric": n, "drsvc": dv, "restic": rv, "ratio": x} for n, dv, rv, x in rows]
    res["targets"] = [{"target": n, "actual": v, "pass": ok} for n, v, ok in targets]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res, rows, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
