"""drsvc scrub and drsvc check --read-data beside restic check --read-data: MB/s of packs read and verified.

    python -m benchmarks.scrub [--scale 2.0] [--runs 3] [--data /tmp/bench-scrub-data]
                               [--work /tmp/bench-scrub] [--no-s3] [--no-drop-caches] [--no-warm]
                               [--profile] [--json PATH]

Setup (as `benchmarks.run`): a fresh dataset; ``drsvc init`` + one full snapshot to a local-directory site,
``restic init`` + one full backup to a local repository. Then, each as a subprocess through
`benchmarks.anchors.run_measured` (wall time, process-tree peak PSS):

- ``drsvc scrub --tenant bench --read-share 1 --no-repair --json``: every pack (and every index, record,
  key slot) at the site is read and verified, nothing is written to the site;
- ``drsvc check bench --read-data --json``: every pack the indexes name is read and verified;
- ``restic check --read-data``: every pack of the repository is read and verified.

"cold": before each command the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, for
every tool alike, or for none when that is not possible); "warm": the same command again at once, its
repository now in the page cache. ``--runs`` rounds of all that (interleaved); the table shows the run
with the median seconds and the highest memory of any run. MB/s = bytes of packs (drsvc: the files under
the site's ``<tenant>/data/``; restic: the files under the repository's ``data/``) / wall seconds, and
source MB/s = bytes of the source tree / wall seconds (10^6 bytes per MB). Unless --no-s3, the same
against one throw-away SeaweedFS S3 site (`benchmarks.anchors.seaweed_s3`) with a fresh drsvc state and
tenant and a fresh restic repository.
With --profile, drsvc scrub and check run once more (not measured) under cProfile with asyncio.to_thread
inline, and the top functions go to the JSON file and stderr. Writes benchmarks/results/scrub.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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
    restic_version,
    run_measured,
    seaweed_s3,
)
from benchmarks.run import (
    DRSVC,
    DRSVC_BUCKET,
    RESTIC_BUCKET,
    drsvc,
    drsvc_snapshot,
    write_config,
    write_s3_config,
)

MiB = 1024 * 1024
TENANT = "bench"  # the tenant benchmarks.run's configs name
ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("drsvc_scrub", "drsvc_check", "restic_check")
MODES = ("cold", "warm")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fresh(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    return p


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for _, p in dataset.iter_files(root)) if root.exists() else 0


def _cached_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1])
    return -1


def drop_caches() -> str | None:
    """sync, then drop the page cache, dentries and inodes; None if done, else why it could not be."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        return f"{DROP_CACHES}: {exc.strerror or exc}"
    return None


def check_data(data: Path, source_bytes: int) -> None:
    """The tree still holds what was backed up (nothing else wrote into the --data directory meanwhile)."""
    now = _dir_bytes(data)
    if now != source_bytes:
        raise RuntimeError(f"{data} changed during the run: {now} bytes, {source_bytes} backed up")


def bucket_bytes(s3: S3Target, bucket: str, prefix: str) -> int:
    from minio import Minio

    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure)
    return sum(int(o.size or 0) for o in client.list_objects(bucket, prefix=prefix, recursive=True))


# ---------------------------------------------------------------------------------------------------------
# The measured commands


def _scrub_argv(cfg: Path) -> list[str]:
    return [DRSVC, "-c", str(cfg), "scrub", "--tenant", TENANT, "--read-share", "1", "--no-repair", "--json"]


def _check_argv(cfg: Path) -> list[str]:
    return [DRSVC, "-c", str(cfg), "check", TENANT, "--read-data", "--json"]


def _result(m: Measured, pack_bytes: int, source_bytes: int) -> dict[str, Any]:
    return {
        "seconds": round(m.seconds, 2),
        "pack_bytes": pack_bytes,
        "mb_per_s": round(pack_bytes / 1e6 / m.seconds, 1),
        "source_mb_per_s": round(source_bytes / 1e6 / m.seconds, 1),
        **memory(m),
    }


def _fail(what: str, m: Measured) -> RuntimeError:
    return RuntimeError(
        f"{what} exited {m.returncode}: {m.stdout.decode(errors='replace')[-2000:]}"
        f"{m.stderr.decode(errors='replace')[-2000:]}"
    )


def measure_scrub(cfg: Path, pack_bytes: int, source_bytes: int) -> dict[str, Any]:
    m = run_measured(_scrub_argv(cfg))
    if m.returncode != 0:
        raise _fail("drsvc scrub", m)
    (rep,) = json.loads(m.stdout)
    if rep["findings"] or rep["unrecoverable"]:
        raise RuntimeError(f"drsvc scrub found something on a fresh repository: {rep}")
    return {
        **_result(m, pack_bytes, source_bytes),
        "bytes_verified": rep["bytes_verified"],  # packs + indexes, records, key slots, config
        "copies_read": rep["copies_read"],
        "objects": rep["objects"],
        "self_seconds": round(rep["finished"] - rep["started"], 2),
    }


def measure_check(cfg: Path, pack_bytes: int, source_bytes: int) -> dict[str, Any]:
    m = run_measured(_check_argv(cfg))
    if m.returncode != 0:
        raise _fail("drsvc check --read-data", m)
    (site,) = json.loads(m.stdout)
    if site["problems"] or site["bytes_read"] != pack_bytes:
        raise RuntimeError(f"drsvc check read {site['bytes_read']} of {pack_bytes} pack bytes: {site}")
    return {**_result(m, pack_bytes, source_bytes), "bytes_read": site["bytes_read"], "packs": site["packs"]}


def measure_restic(repo: ResticRepo, pack_bytes: int, source_bytes: int) -> dict[str, Any]:
    m = run_measured(["restic", "check", "--read-data"], repo.env())
    if m.returncode != 0:
        raise _fail("restic check --read-data", m)
    tail = m.stdout.decode(errors="replace").strip().splitlines()[-1:]
    return {**_result(m, pack_bytes, source_bytes), "restic_said": tail[0] if tail else ""}


def measure_all(
    cases: Mapping[str, Callable[[], dict[str, Any]]], drop: bool, warm: bool, runs: int
) -> dict[str, dict[str, Any]]:
    """`runs` rounds; in each, every case cold (page cache dropped first, if `drop`), then, if `warm`, the
    same command again at once. Per case and mode: the run with the median seconds, every run's seconds and
    the highest memory of any run."""
    modes = MODES if warm else MODES[:1]
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i in range(runs):
        for name, fn in cases.items():
            for mode in modes:
                cached = None
                if mode == "cold" and drop:
                    why = drop_caches()
                    if why is not None:
                        raise RuntimeError(f"dropping the page cache worked before, now: {why}")
                    cached = _cached_kib()
                r = fn()
                if cached is not None:
                    r["cached_kib_after_drop"] = cached
                got.setdefault((name, mode), []).append(r)
                log(
                    f"  run {i + 1}/{runs} {name} {mode}: {r['seconds']} s, {r['mb_per_s']} MB/s packs, "
                    f"{r['peak_pss_mib']} MiB PSS"
                )
    out: dict[str, dict[str, Any]] = {name: {} for name in cases}
    for (name, mode), rs in got.items():
        by_time = sorted(rs, key=lambda r: float(r["seconds"]))
        out[name][mode] = {
            **by_time[(len(by_time) - 1) // 2],
            "all_seconds": [r["seconds"] for r in rs],
            "max_peak_pss_mib": max(r["peak_pss_mib"] for r in rs),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Profiling (a child process: `python -m benchmarks.scrub _profile OUT -- DRSVC-ARGS...`)


def profile_cli(out: Path, argv: Sequence[str]) -> int:
    """Run the drsvc CLI in this process under cProfile, asyncio.to_thread inline (cProfile sees only the
    thread it runs in, so the verification done in threads shows too). Store reads stay in their pools."""
    import cProfile

    from drsvc.cli.main import main as drsvc_main

    async def inline(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    asyncio.to_thread = inline
    prof = cProfile.Profile()
    prof.enable()
    try:
        rc = drsvc_main(list(argv))
    finally:
        prof.disable()
        prof.dump_stats(out)
    return rc


def profile_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """The functions with the most own and the most cumulative time, as shares of the profiled total."""
    st = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = st.stats  # type: ignore[attr-defined]
    total = float(st.total_tt) or 1.0  # type: ignore[attr-defined]

    def name(f: tuple[str, int, str]) -> str:
        file, line, fn = f
        if file == "~":
            return fn
        parts = Path(file).parts
        return f"{'/'.join(parts[-2:])}:{line}({fn})"

    def rows(key: int) -> list[dict[str, Any]]:
        best = sorted(raw.items(), key=lambda kv: kv[1][key], reverse=True)[:top]
        return [
            {
                "function": name(f),
                "calls": v[1],
                "tottime": round(v[2], 3),
                "cumtime": round(v[3], 3),
                "tot_pct": round(100 * v[2] / total, 1),
                "cum_pct": round(100 * v[3] / total, 1),
            }
            for f, v in best
        ]

    return {"total_seconds": round(total, 3), "by_tottime": rows(2), "by_cumtime": rows(3)}


def profile(label: str, drsvc_argv: list[str], work: Path) -> dict[str, Any]:
    prof = work / f"profile-{label}.pstats"
    argv = [sys.executable, "-m", "benchmarks.scrub", "_profile", str(prof), "--", *drsvc_argv[1:]]
    t0 = time.perf_counter()
    # cwd `work` and ROOT last: a PYTHONPATH given to the benchmark still decides where drsvc comes from
    path = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if x)
    env = dict(os.environ, PYTHONPATH=path)
    p = subprocess.run(argv, capture_output=True, env=env, cwd=work, check=False)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"profiled {label} exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    summary = profile_summary(prof)
    log(f"profiled {label} (to_thread inline, not a measurement): {seconds:.1f} s; by own time:")
    for r in summary["by_tottime"][:15]:
        log(f"  {r['tot_pct']:5.1f}% own {r['cum_pct']:5.1f}% cum {r['calls']:>8}  {r['function']}")
    return {"wall_seconds": round(seconds, 2), "pstats": str(prof), **summary}


# ---------------------------------------------------------------------------------------------------------


def run(
    data: Path, work: Path, scale: float, s3: bool, drop: bool, warm: bool, runs: int, prof: bool
) -> dict[str, Any]:
    t_start = time.perf_counter()
    _fresh(data)
    _fresh(work).mkdir(parents=True)
    gen = dataset.generate(data, scale)
    log(f"dataset: {gen['total_bytes'] / MiB:.1f} MiB in {gen['seconds']} s")

    cfg = write_config(work, data)
    site = work / "drsvc-site"
    repo = ResticRepo(local=work / "restic-repo", cache_dir=work / "restic-cache")
    drsvc(cfg, "init", TENANT)
    snap = drsvc_snapshot(cfg, lambda: _dir_bytes(site))
    restic_init(repo)
    backup = restic_backup(repo, data)
    source = int(snap["bytes_total"])
    d_packs = _dir_bytes(site / TENANT / "data")
    assert repo.local is not None
    r_packs = _dir_bytes(repo.local / "data")
    log(f"drsvc snapshot {snap['seconds']} s, restic backup {backup['seconds']} s")
    log(f"packs: drsvc {d_packs / MiB:.1f} MiB, restic {r_packs / MiB:.1f} MiB; local site:")
    local = measure_all(
        {
            "drsvc_scrub": lambda: measure_scrub(cfg, d_packs, source),
            "drsvc_check": lambda: measure_check(cfg, d_packs, source),
            "restic_check": lambda: measure_restic(repo, r_packs, source),
        },
        drop,
        warm,
        runs,
    )
    res: dict[str, Any] = {
        "scale": scale,
        "cores": os.cpu_count(),
        "restic_version": restic_version(),
        "dataset_bytes": gen["total_bytes"],
        "source_bytes": source,
        "page_cache_dropped": drop,
        "runs": runs,
        "setup": {"drsvc_snapshot": snap, "restic_backup": backup},
        "local": {"drsvc_pack_bytes": d_packs, "restic_pack_bytes": r_packs, **local},
    }
    check_data(data, source)
    if s3:
        res["s3"] = run_s3(data, work, source, drop, warm, runs)
    check_data(data, source)
    if prof:
        res["profile"] = {
            "drsvc_scrub": profile("drsvc_scrub", _scrub_argv(cfg), work),
            "drsvc_check": profile("drsvc_check", _check_argv(cfg), work),
        }
    res["benchmark_seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def run_s3(data: Path, work: Path, source: int, drop: bool, warm: bool, runs: int) -> dict[str, Any]:
    """The same on one SeaweedFS S3 site: a fresh drsvc state and tenant, a fresh restic repository."""
    with seaweed_s3(work / "weed", bucket=RESTIC_BUCKET) as s3:
        cfg = write_s3_config(work, data, s3)
        drsvc(cfg, "init", TENANT)
        drsvc_snapshot(cfg, lambda: 0)
        repo = ResticRepo(s3=s3, cache_dir=work / "restic-cache-s3")
        restic_init(repo)
        restic_backup(repo, data)
        d_packs = bucket_bytes(s3, DRSVC_BUCKET, f"{TENANT}/data/")
        r_packs = bucket_bytes(s3, RESTIC_BUCKET, "data/")
        log(f"S3 {s3.endpoint}: packs drsvc {d_packs / MiB:.1f} MiB, restic {r_packs / MiB:.1f} MiB")
        out = measure_all(
            {
                "drsvc_scrub": lambda: measure_scrub(cfg, d_packs, source),
                "drsvc_check": lambda: measure_check(cfg, d_packs, source),
                "restic_check": lambda: measure_restic(repo, r_packs, source),
            },
            drop,
            warm,
            runs,
        )
        return {"endpoint": s3.endpoint, "drsvc_pack_bytes": d_packs, "restic_pack_bytes": r_packs, **out}


# ---------------------------------------------------------------------------------------------------------
# Table


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


Row = tuple[str, Any, Any, Any, Any, Any]


def table(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for target in ("local", "s3"):
        if target not in res:
            continue
        t = res[target]
        rows.append(
            (
                f"{target}: pack MiB",
                round(t["drsvc_pack_bytes"] / MiB, 1),
                round(t["drsvc_pack_bytes"] / MiB, 1),
                round(t["restic_pack_bytes"] / MiB, 1),
                None,
                None,
            )
        )
        for mode in MODES:
            if mode not in t["restic_check"]:
                continue
            for key, label in (
                ("seconds", "seconds"),
                ("mb_per_s", "MB/s packs"),
                ("source_mb_per_s", "MB/s source"),
                ("max_peak_pss_mib", "peak PSS MiB (tree)"),
                ("max_peak_rss_mib", "peak RSS MiB (process)"),
            ):
                s, c, r = (t[tool][mode][key] for tool in TOOLS)
                rows.append((f"{target} {mode}: {label}", s, c, r, _ratio(s, r), _ratio(c, r)))
    return rows


def render(res: dict[str, Any], rows: list[Row]) -> str:
    dropped = "page cache dropped before each cold run" if res["page_cache_dropped"] else "caches NOT dropped"
    lines = [
        f"dataset {res['dataset_bytes'] / MiB:.1f} MiB, scale {res['scale']}, {res['cores']} cores, "
        f"{res['restic_version']}; median of {res['runs']} runs; {dropped}; "
        f"benchmark took {res['benchmark_seconds']} s",
        "",
        f"{'metric':<36} | {'drsvc scrub':>11} | {'drsvc check':>11} | {'restic check':>12} | "
        f"{'scrub/restic':>12} | {'check/restic':>12}",
        f"{'-' * 36}-+-{'-' * 11}-+-{'-' * 11}-+-{'-' * 12}-+-{'-' * 12}-+-{'-' * 12}",
    ]
    for name, s, c, r, xs, xc in rows:
        lines.append(
            f"{name:<36} | {s!s:>11} | {c!s:>11} | {r!s:>12} | {'' if xs is None else xs!s:>12} | "
            f"{'' if xc is None else xc!s:>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_profile"]:  # the child of `profile`: _profile OUT -- DRSVC-ARGS...
        return profile_cli(Path(args[1]), args[3:] if args[2:3] == ["--"] else args[2:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scrub", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=2.0, help="1.0 is about 500 MiB (default 2.0)")
    ap.add_argument("--runs", type=int, default=3, help="rounds of measurements; the median is shown")
    ap.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/bench-scrub-data"),
        help="the dataset (its own default: other benchmarks regenerate /tmp/bench-data at other scales)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scrub"), help="sites, repositories, caches")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scrub.json")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True, help="the S3 case (weed)")
    ap.add_argument(
        "--drop-caches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop the page cache before each cold run (needs root; skipped for all tools if it fails)",
    )
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True, help="also warm runs")
    ap.add_argument("--profile", action="store_true", help="also profile drsvc scrub and check (cProfile)")
    a = ap.parse_args(args)
    if shutil.which("restic") is None:
        log("restic is not installed (apt-get install restic)")
        return 2
    drop = a.drop_caches
    if drop and (why := drop_caches()) is not None:
        log(f"cannot drop the page cache ({why}): no tool gets it dropped")
        drop = False
    res = run(a.data, a.work, a.scale, a.s3, drop, a.warm, a.runs, a.profile)
    rows = table(res)
    res["table"] = [
        {
            "metric": n,
            "drsvc_scrub": s,
            "drsvc_check": c,
            "restic_check": r,
            "scrub_ratio": xs,
            "check_ratio": xc,
        }
        for n, s, c, r, xs, xc in rows
    ]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
