"""Prune: drsvc against ``restic forget`` + ``restic prune`` on the same histories, in one run.

    python -m benchmarks.prune [--scale 0.5] [--rounds 20] [--syn-blobs 1000000] [--syn-restic-blobs N]
                               [--data /tmp/bench-prune-data] [--work /tmp/bench-prune]
                               [--cases history,synthetic] [--profile]

Two cases (see benchmarks/README.md, "Prune"):

- ``history``: a fresh benchmark dataset; ``dataset mutate --round i`` for i = 1..20, each followed by one
  ``drsvc snapshot`` and one ``restic backup``. Then the same 10 snapshots (the 1st, 3rd, ..., 19th) are
  forgotten on both sides: their drsvc records are deleted at the site, ``restic forget ID...``. Then
  drsvc's prune (grace 0, the exclusive mode; ``repack_waste`` from the config default) and
  ``restic prune`` (its defaults) are timed.
- ``synthetic``: at least a million blobs. A deterministic history of 10 snapshots of tiny files (64 random
  bytes each, one blob per file): the drsvc repository is built directly (packs, trees, indexes and records
  sealed with drsvc.core, laid out as `snapshot` would), restic backs up the same file trees from disk.
  Then the even-numbered snapshots (half) are forgotten on both sides and both prunes are timed.

Each prune is a measured subprocess (`benchmarks.anchors.run_measured`): wall time, the process's own peak
RSS and the peak PSS / RSS of its process tree. drsvc's prune runs through ``python -m benchmarks.prune
run-drsvc-prune CONFIG TENANT``, which calls ``drsvc.prune.prune_tenant`` as a CLI would and prints its
report with the seconds spent in each phase. Afterwards ``drsvc check --read-data``, a restore of the newest
snapshot compared with the source tree, and ``restic check --read-data`` must pass. With ``--profile`` the
drsvc site is copied before the measured prune and the copy is pruned again under cProfile; the top
functions go into the JSON file. Prints a table and the targets with PASS/FAIL; writes
benchmarks/results/prune.json.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import functools
import hashlib
import inspect
import json
import os
import pstats
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.anchors import (
    Measured,
    ResticRepo,
    memory,
    restic_backup,
    restic_init,
    restic_version,
    run_measured,
)
from benchmarks.run import drsvc, drsvc_snapshot, write_config

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
DRSVC = str(Path(sys.executable).parent / "drsvc")
TENANT = "bench"
SOURCE = "data"
SITE = "local"
PHASES = (
    "list_sites",
    "read_records",
    "read_markers",
    "read_indexes",
    "walk",
    "account",
    "still_needed",
    "repack",
    "sweep",
    "replace_markers",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for _, p in dataset.iter_files(root)) if root.exists() else 0


def fresh(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    return p


# ---------------------------------------------------------------------------------------------------------
# The measured drsvc prune (runs in the child process)


def _timed_phases(cls: type, seconds: dict[str, float]) -> None:
    """Wrap the phase methods of drsvc.prune._Run to add their wall time to `seconds` (missing ones are
    skipped: the breakdown is informative, the total comes from the parent's clock)."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed

    for name in PHASES:
        fn = getattr(cls, name, None)
        if callable(fn):
            setattr(cls, name, wrap(name, fn))


def run_drsvc_prune(config: Path, tenant: str, profile: Path | None) -> dict[str, Any]:
    """`drsvc prune` as the CLI would run it (allocator tuned, one App), grace 0, the config's repack_waste.

    With `profile`, cProfile records the run into that file; asyncio.to_thread then runs its function
    inline (cProfile sees only the thread it runs in), so the profile shows the decoding and hashing too.
    """
    from drsvc import prune
    from drsvc.app import App
    from drsvc.core.config import load_config
    from drsvc.memory import tune_allocator

    tune_allocator()
    phases: dict[str, float] = {}
    _timed_phases(prune._Run, phases)

    async def go() -> prune.PruneReport:
        async with App(load_config(config)) as app:
            # grace 0 as an int: with the float 0.0, `t + grace * NS <= now_ns` compares a float rounded to
            # 256 ns with now_ns, and about half the runs then delete nothing (see the README)
            return await prune.prune_tenant(app, tenant, grace=0)

    if profile is None:
        report = asyncio.run(go())
    else:
        import cProfile

        async def inline(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        asyncio.to_thread = inline
        prof = cProfile.Profile()
        prof.enable()
        report = asyncio.run(go())
        prof.disable()
        prof.dump_stats(profile)
    return {**report.as_dict(), "phases": {k: round(v, 3) for k, v in phases.items()}}


def drsvc_prune(cfg: Path, profile: Path | None = None) -> tuple[dict[str, Any], Measured]:
    argv = [sys.executable, "-m", "benchmarks.prune", "run-drsvc-prune", str(cfg), TENANT]
    if profile is not None:
        argv += ["--profile", str(profile)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    m = run_measured(argv, env)
    if m.returncode != 0:
        raise RuntimeError(f"drsvc prune exited {m.returncode}: {m.stderr.decode()[-3000:]}")
    out: dict[str, Any] = json.loads(m.stdout)
    if out["waiting"]:
        raise RuntimeError(f"drsvc prune with grace 0 left {out['waiting']} packs condemned: {out}")
    return out, m


def profile_summary(path: Path, top: int = 30) -> dict[str, Any]:
    """The functions with the most own time and the most cumulative time, as shares of the total."""
    st = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0

    def name(f: tuple[str, int, str]) -> str:
        file, line, fn = f
        if file == "~":
            return fn
        parts = Path(file).parts
        short = "/".join(parts[-2:]) if len(parts) >= 2 else file
        return f"{short}:{line}({fn})"

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


def profiled_copy(cfg: Path, work: Path, label: str) -> Path:
    """A copy of the config's site and state directory, with a config pointing at the copies."""
    site, state = work / "drsvc-site", work / "drsvc-state"
    site_c, state_c = fresh(work / f"profile-{label}-site"), fresh(work / f"profile-{label}-state")
    shutil.copytree(site, site_c, symlinks=True)
    if state.exists():
        shutil.copytree(state, state_c, symlinks=True)
    text = cfg.read_text().replace(str(site), str(site_c)).replace(str(state), str(state_c))
    cfg_c = work / f"profile-{label}.toml"
    cfg_c.write_text(text)
    return cfg_c


# ---------------------------------------------------------------------------------------------------------
# Shared steps


async def _record_ids(cfg: Path) -> list[str]:
    from drsvc.app import App
    from drsvc.core.config import load_config

    async with App(load_config(cfg)) as app:
        records, _ = await app.snapshots(SOURCE)
    return [r.id for r in records]  # oldest first


async def _delete_records(cfg: Path, ids: list[str]) -> None:
    """Forget: delete these snapshot records at every site of the source (what `drsvc forget` does for the
    records its retention policy selects; the packs stay until prune)."""
    from drsvc.app import App
    from drsvc.core.config import load_config
    from drsvc.core.layout import Handle, Kind

    config = load_config(cfg)
    async with App(config) as app:
        repo = await app.open_repo(TENANT)
        tag = repo.keys.source_tag(SOURCE)
        for site in config.source(SOURCE).sites:
            store = app.store(site)
            for rid in ids:
                await store.delete(repo.layout.key(Handle(Kind.SNAPSHOT, rid, tag)))


def drsvc_forget(cfg: Path, every_other: bool = True) -> dict[str, Any]:
    ids = asyncio.run(_record_ids(cfg))
    chosen = ids[0::2] if every_other else ids
    t0 = time.perf_counter()
    asyncio.run(_delete_records(cfg, chosen))
    left = asyncio.run(_record_ids(cfg))
    if set(left) != set(ids) - set(chosen):
        raise RuntimeError(f"drsvc forget: {len(left)} records left, expected {len(ids) - len(chosen)}")
    return {"snapshots_before": len(ids), "forgotten": chosen, "seconds": round(time.perf_counter() - t0, 2)}


def restic_ids(repo: ResticRepo) -> list[str]:
    m = repo.run("snapshots", "--json")
    snaps = json.loads(m.stdout)
    return [s["id"] for s in sorted(snaps, key=lambda s: s["time"])]


def restic_forget(repo: ResticRepo) -> dict[str, Any]:
    ids = restic_ids(repo)
    chosen = ids[0::2]
    m = repo.run("forget", *chosen)
    left = restic_ids(repo)
    if set(left) != set(ids) - set(chosen):
        raise RuntimeError(f"restic forget: {len(left)} snapshots left, expected {len(ids) - len(chosen)}")
    return {"snapshots_before": len(ids), "forgotten": chosen, "seconds": round(m.seconds, 2)}


_RESTIC_STATS = re.compile(
    r"^(used|unused|total|to repack|this removes|to delete|total prune|remaining|unused size after prune):"
    r"\s+(.*)$"
)


def restic_max_unused() -> str:
    out = run_measured(["restic", "prune", "--help"]).stdout.decode()
    m = re.search(r"--max-unused.*\(default \"([^\"]+)\"\)", out)
    return m.group(1) if m else "?"


def restic_prune(repo: ResticRepo) -> dict[str, Any]:
    before = repo.stored_bytes()
    m = repo.run("prune")
    after = repo.stored_bytes()
    stats = {}
    for line in m.stdout.decode().splitlines():
        got = _RESTIC_STATS.match(line.strip())
        if got:
            stats[got.group(1)] = got.group(2).strip()
    return {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "repo_bytes_before": before,
        "repo_bytes_after": after,
        "freed_bytes": before - after,
        "max_unused": restic_max_unused(),
        "restic_stats": stats,
    }


def measured_drsvc_prune(cfg: Path, site: Path, work: Path, label: str, profile: bool) -> dict[str, Any]:
    cfg_p = profiled_copy(cfg, work, label) if profile else None
    before = dir_bytes(site)
    report, m = drsvc_prune(cfg)
    after = dir_bytes(site)
    out: dict[str, Any] = {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "repo_bytes_before": before,
        "repo_bytes_after": after,
        "freed_bytes": before - after,
        "report": report,
    }
    log(
        f"drsvc prune ({label}): {out['seconds']} s, peak PSS {out['peak_pss_mib']} MiB, "
        f"freed {out['freed_bytes'] / MiB:.1f} MiB; phases {report.get('phases')}"
    )
    if cfg_p is not None:
        prof = work / f"profile-{label}.pstats"
        preport, pm = drsvc_prune(cfg_p, prof)
        out["profile"] = {
            "seconds": round(pm.seconds, 2),
            "phases": preport["phases"],
            **profile_summary(prof),
            "pstats": str(prof),
        }
        log(f"profiled drsvc prune ({label}) on a copy: {pm.seconds:.1f} s, see the JSON file")
        for r in out["profile"]["by_tottime"][:12]:
            log(f"  {r['tot_pct']:5.1f}% own {r['cum_pct']:5.1f}% cum  {r['calls']:>9}  {r['function']}")
    return out


def trees_equal(a: Path, b: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Differences between two trees (names and file contents); empty if equal."""
    fa = {rel: p for rel, p in dataset.iter_files(a) if rel not in skip}
    fb = {rel: p for rel, p in dataset.iter_files(b) if rel not in skip}
    diffs = [f"only in {a}: {r}" for r in sorted(fa.keys() - fb.keys())]
    diffs += [f"only in {b}: {r}" for r in sorted(fb.keys() - fa.keys())]
    for rel in sorted(fa.keys() & fb.keys()):
        if not filecmp.cmp(fa[rel], fb[rel], shallow=False):
            diffs.append(f"differs: {rel}")
    return diffs


def drsvc_check(cfg: Path, read_data: bool) -> dict[str, Any]:
    """`drsvc check` (with --read-data: every pack downloaded and verified): ok, counts, first problems."""
    argv = [DRSVC, "-c", str(cfg), "check", TENANT, "--json"]
    m = run_measured(argv + (["--read-data"] if read_data else []))
    try:
        sites = json.loads(m.stdout)
    except ValueError:
        sites = []
    problems = [p for s in sites for p in s.get("problems", [])]
    out: dict[str, Any] = {
        "ok": m.returncode == 0 and bool(sites) and not problems,
        "read_data": read_data,
        "seconds": round(m.seconds, 2),
        "snapshots": [s.get("snapshots") for s in sites],
        "blobs": [s.get("blobs") for s in sites],
        "problem_count": len(problems),
        "problems": problems[:50],
    }
    if m.returncode != 0 and not sites:
        out["stderr"] = m.stderr.decode()[-2000:]
    return out


def verify_drsvc(cfg: Path, restore_to: Path, expect: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """After the prune: check --read-data, and a restore of the newest snapshot equals `expect`."""
    check = drsvc_check(cfg, read_data=True)
    out: dict[str, Any] = {"check_read_data_ok": check["ok"], "check": check}
    fresh(restore_to)
    r = run_measured([DRSVC, "-c", str(cfg), "restore", SOURCE, "--to", str(restore_to), "--json"])
    out["restore_seconds"] = round(r.seconds, 2)
    if r.returncode != 0:
        out["restore_ok"] = False
        out["restore_error"] = r.stderr.decode()[-2000:]
    else:
        diffs = trees_equal(expect, restore_to, skip)
        out["restore_ok"] = not diffs
        out["restore_diffs"] = diffs[:20]
    shutil.rmtree(restore_to, ignore_errors=True)
    log(
        f"drsvc verify: check --read-data ok {check['ok']} ({check['problem_count']} problems, "
        f"{check['seconds']} s), restore ok {out['restore_ok']} ({out['restore_seconds']} s)"
    )
    return out


def verify_restic(repo: ResticRepo) -> dict[str, Any]:
    m = run_measured(["restic", "check", "--read-data"], repo.env())
    out: dict[str, Any] = {"check_read_data_ok": m.returncode == 0, "check_seconds": round(m.seconds, 2)}
    if m.returncode != 0:
        out["check_output"] = (m.stdout + m.stderr).decode()[-2000:]
    log(f"restic verify: {out}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Case 1: the benchmark dataset after 20 incremental snapshots, half of them forgotten


def history_case(data: Path, work: Path, scale: float, rounds: int, profile: bool) -> dict[str, Any]:
    t_case = time.perf_counter()
    fresh(data)
    fresh(work).mkdir(parents=True)
    gen = dataset.generate(data, scale)
    log(f"history: dataset {gen['total_bytes'] / MiB:.1f} MiB in {gen['seconds']} s")
    cfg = write_config(work, data)
    site = work / "drsvc-site"
    repo = ResticRepo(local=work / "restic-repo", cache_dir=work / "restic-cache")
    drsvc(cfg, "init", TENANT)
    restic_init(repo)
    snaps: list[dict[str, Any]] = []
    real = 0
    for i in range(1, rounds + 1):
        mut = dataset.mutate(data, i)
        real += int(mut["real_change_bytes"])
        d = drsvc_snapshot(cfg, lambda: dir_bytes(site))
        r = restic_backup(repo, data)
        snaps.append(
            {
                "round": i,
                "real_change_bytes": mut["real_change_bytes"],
                "drsvc_seconds": d["seconds"],
                "drsvc_bytes_stored": d["bytes_stored"],
                "restic_seconds": r["seconds"],
                "restic_repo_growth_bytes": r["repo_growth_bytes"],
            }
        )
        log(f"history round {i}: drsvc {d['seconds']} s, restic {r['seconds']} s")
    res: dict[str, Any] = {
        "scale": scale,
        "rounds": rounds,
        "dataset_bytes": gen["total_bytes"],
        "dataset_bytes_after": dir_bytes(data) - (data / dataset.MANIFEST).stat().st_size,
        "real_change_bytes_total": real,
        "snapshots": snaps,
    }
    res["drsvc_forget"] = drsvc_forget(cfg)
    res["restic_forget"] = restic_forget(repo)
    res["drsvc_check_before"] = drsvc_check(cfg, read_data=False)
    log(f"drsvc check before the prune: ok {res['drsvc_check_before']['ok']}")
    res["drsvc"] = measured_drsvc_prune(cfg, site, work, "history", profile)
    res["restic"] = restic_prune(repo)
    log(f"restic prune (history): {res['restic']}")
    res["drsvc_verify"] = verify_drsvc(cfg, work / "restore-drsvc", data, skip=(dataset.MANIFEST,))
    res["restic_verify"] = verify_restic(repo)
    res["case_seconds"] = round(time.perf_counter() - t_case, 1)
    return res


# ---------------------------------------------------------------------------------------------------------
# Case 2: a synthetic history of tiny files, at least a million blobs


@dataclass(frozen=True)
class SynPlan:
    """Snapshot k adds `per_snapshot` new files of 64 random bytes under ``s<k>/d<m>/f<j>`` (1000 a
    directory). A file is transient (it exists in snapshot k only) or durable (from k to the last
    snapshot): every file of snapshots k = 0 mod 4, 40% (j mod 5 < 2) of k = 2 mod 4, half (even j) of odd
    k. The even snapshots are forgotten, so the new files of k = 0 mod 4 become unused entirely (whole
    packs), 40% of k = 2 mod 4 (partly used packs: over drsvc's default repack_waste, restic repacks them
    as well), and the trees of the forgotten records. Directories left empty are removed."""

    blobs: int
    snapshots: int = 10
    per_dir: int = 1000
    seed: str = "drsvc-prune-bench"

    @property
    def per_snapshot(self) -> int:
        return -(-self.blobs // self.snapshots)

    def transient(self, k: int, j: int) -> bool:
        if k % 4 == 0:
            return True
        if k % 4 == 2:
            return j % 5 < 2
        return j % 2 == 0

    def content(self, k: int, j: int) -> bytes:
        return hashlib.blake2b(f"{self.seed}:{k}:{j}".encode(), digest_size=64).digest()

    def dirs(self) -> int:
        return -(-self.per_snapshot // self.per_dir)

    def files(self, m: int) -> range:
        return range(m * self.per_dir, min(self.per_snapshot, (m + 1) * self.per_dir))

    @staticmethod
    def path(k: int, m: int, j: int | None = None) -> str:
        d = f"s{k:02d}/d{m:04d}"
        return d if j is None else f"{d}/f{j:08d}"


@dataclass
class _SynBuilder:
    """Writes the drsvc repository of a SynPlan straight into a local site directory."""

    plan: SynPlan
    site: Path
    repo: Any  # drsvc.core.repository.Repository
    base_ns: int
    packs: list[Any] = field(default_factory=list)  # PackIndex of the current snapshot
    trees_written: set[bytes] = field(default_factory=set)
    durable_dirs: dict[tuple[int, int], tuple[bytes, bytes] | None] = field(default_factory=dict)
    durable_s: dict[int, tuple[bytes, bytes] | None] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"data_blobs": 0, "tree_blobs": 0, "packs": 0})

    def __post_init__(self) -> None:
        import zstandard

        from drsvc.core.crypto import BlobType
        from drsvc.core.format import PackWriter

        self.cctx = zstandard.ZstdCompressor(level=self.repo.params.compression_level)
        self.id_fn = self.repo.keys.content_id_function()
        self.BlobType = BlobType
        self.PackWriter = PackWriter
        self.data_w = self._writer()
        self.tree_w = self._writer()

    def _writer(self) -> Any:
        from drsvc.core.repository import new_id

        return self.PackWriter(self.repo.keys, new_id())

    def _put(self, key: str, data: bytes) -> None:
        p = self.site / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def _finish(self, w: Any) -> None:
        from drsvc.core.format import PackIndex
        from drsvc.core.layout import Handle, Kind

        data = w.finish()
        self._put(self.repo.layout.key(Handle(Kind.PACK, w.name)), data)
        self.packs.append(PackIndex(w.name, w.cipher.salt, tuple(w.entries)))
        self.stats["packs"] += 1

    def _add(self, which: str, btype: Any, blob_id: bytes, payload: bytes, raw: int) -> None:
        w = self.data_w if which == "data" else self.tree_w
        w.add(btype, blob_id, payload, raw)
        if w.size >= self.repo.params.pack_size:  # as snapshot's Packer: finish a pack once it is full
            self._finish(w)
            if which == "data":
                self.data_w = self._writer()
            else:
                self.tree_w = self._writer()

    def _tree(self, nodes: list[Any]) -> tuple[bytes, bytes]:
        from drsvc.core import format

        raw = format.encode_tree(nodes)
        return self.id_fn(raw), raw

    def _store_tree(self, t: tuple[bytes, bytes]) -> bytes:
        from drsvc.core import format

        tid, raw = t
        if tid not in self.trees_written:
            self.trees_written.add(tid)
            self._add("tree", self.BlobType.TREE, tid, format.encode_payload(raw, self.cctx), len(raw))
            self.stats["tree_blobs"] += 1
        return tid

    def _time(self, k: int) -> int:
        return self.base_ns + k * 3600 * 1_000_000_000

    def _dir_node(self, name: str, k: int, tid: bytes) -> Any:
        from drsvc.core.format import DIR, Node

        return Node(name=name.encode(), kind=DIR, mode=0o755, mtime_ns=self._time(k), subtree=tid)

    def snapshot(self, k: int, parent: str | None) -> str:
        from drsvc.core import crypto, format
        from drsvc.core.crypto import ObjectType
        from drsvc.core.format import FILE, Node
        from drsvc.core.layout import Handle, Kind
        from drsvc.core.repository import new_id
        from snapshot.tree import INDEX_BLOBS_PER_OBJECT

        plan, t = self.plan, self._time(k)
        s_nodes = []
        for m in range(plan.dirs()):
            full, durable = [], []
            for j in plan.files(m):
                content = plan.content(k, j)
                bid = self.id_fn(content)
                self._add("data", self.BlobType.DATA, bid, bytes([format.CODEC_RAW]) + content, len(content))
                self.stats["data_blobs"] += 1
                node = Node(
                    name=f"f{j:08d}".encode(), kind=FILE, mode=0o644, mtime_ns=t, size=64, content=(bid,)
                )
                full.append(node)
                if not plan.transient(k, j):
                    durable.append(node)
            s_nodes.append(self._dir_node(f"d{m:04d}", k, self._store_tree(self._tree(full))))
            self.durable_dirs[(k, m)] = self._tree(durable) if durable else None
        full_s = self._tree(s_nodes)
        # the durable version of s<k>, as later snapshots will see it (its trees are written when used)
        dur_nodes = [
            self._dir_node(f"d{m:04d}", k, d[0])
            for m in range(plan.dirs())
            if (d := self.durable_dirs[(k, m)]) is not None
        ]
        self.durable_s[k] = self._tree(dur_nodes) if dur_nodes else None
        root_nodes = []
        for kk in range(k):
            ds = self.durable_s[kk]
            if ds is None:
                continue
            for m in range(plan.dirs()):
                dd = self.durable_dirs[(kk, m)]
                if dd is not None:
                    self._store_tree(dd)
            root_nodes.append(self._dir_node(f"s{kk:02d}", kk, self._store_tree(ds)))
        root_nodes.append(self._dir_node(f"s{k:02d}", k, self._store_tree(full_s)))
        root = self._store_tree(self._tree(root_nodes))
        for w in (self.data_w, self.tree_w):  # a snapshot ends with its open packs spooled
            if w.entries:
                self._finish(w)
        self.data_w, self.tree_w = self._writer(), self._writer()

        index_names: list[str] = []
        batch: list[Any] = []
        count = 0
        for p in [*self.packs, None]:
            if p is not None:
                batch.append(p)
                count += len(p.blobs)
            if batch and (p is None or count >= INDEX_BLOBS_PER_OBJECT):
                name = new_id()
                sealed = crypto.seal_object(
                    self.repo.keys, ObjectType.INDEX, name, format.encode_index(batch)
                )
                self._put(self.repo.layout.key(Handle(Kind.INDEX, name)), sealed)
                index_names.append(name)
                batch, count = [], 0
        self.packs = []
        rec = format.SnapshotRecord(
            id=new_id(),
            tenant=self.repo.tenant,
            source=SOURCE,
            time_ns=t,
            tree=root,
            parent=parent,
            host=socket.gethostname(),
            finished_ns=t + 1_000_000_000,
            index=tuple(index_names),
            root=Node(name=b".", kind=format.DIR, mode=0o755, mtime_ns=t, subtree=root),
        )
        sealed = crypto.seal_object(self.repo.keys, ObjectType.SNAPSHOT, rec.id, format.encode_snapshot(rec))
        self._put(
            self.repo.layout.key(Handle(Kind.SNAPSHOT, rec.id, self.repo.keys.source_tag(SOURCE))), sealed
        )
        return rec.id


async def _build_drsvc_synthetic(cfg: Path, site: Path, plan: SynPlan) -> dict[str, Any]:
    from drsvc.app import App
    from drsvc.core.config import load_config

    async with App(load_config(cfg)) as app:
        repo = await app.open_repo(TENANT)
    b = _SynBuilder(plan, site, repo, time.time_ns() - (plan.snapshots + 1) * 3600 * 1_000_000_000)
    parent = None
    for k in range(plan.snapshots):
        parent = await asyncio.to_thread(b.snapshot, k, parent)
    return b.stats


def _materialize(plan: SynPlan, tree: Path, k: int) -> None:
    """Turn the on-disk tree into snapshot k's: drop snapshot k-1's transient files, add k's files."""
    if k > 0:
        for m in range(plan.dirs()):
            d = tree / plan.path(k - 1, m)
            for j in plan.files(m):
                if plan.transient(k - 1, j):
                    (d / f"f{j:08d}").unlink()
            if not any(d.iterdir()):
                d.rmdir()
        s = tree / f"s{k - 1:02d}"
        if not any(s.iterdir()):
            s.rmdir()
    for m in range(plan.dirs()):
        d = tree / plan.path(k, m)
        d.mkdir(parents=True)
        for j in plan.files(m):
            with open(d / f"f{j:08d}", "wb") as f:
                f.write(plan.content(k, j))


def synthetic_case(work: Path, blobs: int, with_restic: bool, profile: bool) -> dict[str, Any]:
    t_case = time.perf_counter()
    plan = SynPlan(blobs)
    fresh(work).mkdir(parents=True)
    tree = work / "tree"
    tree.mkdir()
    cfg = write_config(work, tree)
    site = work / "drsvc-site"
    drsvc(cfg, "init", TENANT)
    t0 = time.perf_counter()
    built = asyncio.run(_build_drsvc_synthetic(cfg, site, plan))
    res: dict[str, Any] = {
        "blobs_planned": plan.per_snapshot * plan.snapshots,
        "snapshots": plan.snapshots,
        "drsvc_build": {
            **built,
            "seconds": round(time.perf_counter() - t0, 1),
            "site_bytes": dir_bytes(site),
        },
    }
    log(f"synthetic {blobs}: drsvc repository built: {res['drsvc_build']}")
    repo = ResticRepo(local=work / "restic-repo", cache_dir=work / "restic-cache")
    if with_restic:
        restic_init(repo)
        rounds = []
        for k in range(plan.snapshots):
            t0 = time.perf_counter()
            _materialize(plan, tree, k)
            made = time.perf_counter() - t0
            r = restic_backup(repo, tree)
            rounds.append(
                {"files_seconds": round(made, 1), "restic_seconds": r["seconds"], "files": r["files_new"]}
            )
            log(f"synthetic {blobs}: snapshot {k}: files {made:.1f} s, restic backup {r['seconds']} s")
        res["restic_build"] = {"rounds": rounds, "repo_bytes": repo.stored_bytes()}
    else:  # the newest snapshot's tree, for the restore check
        for k in range(plan.snapshots):
            _materialize(plan, tree, k)
    res["drsvc_forget"] = drsvc_forget(cfg)
    if with_restic:
        res["restic_forget"] = restic_forget(repo)
    res["drsvc_check_before"] = drsvc_check(cfg, read_data=False)
    log(f"drsvc check before the prune: ok {res['drsvc_check_before']['ok']}")
    res["drsvc"] = measured_drsvc_prune(cfg, site, work, f"synthetic-{blobs}", profile)
    if with_restic:
        res["restic"] = restic_prune(repo)
        log(f"restic prune (synthetic {blobs}): {res['restic']}")
    res["drsvc_verify"] = verify_drsvc(cfg, work / "restore-drsvc", tree)
    if with_restic:
        res["restic_verify"] = verify_restic(repo)
    res["case_seconds"] = round(time.perf_counter() - t_case, 1)
    return res


# ---------------------------------------------------------------------------------------------------------
# Table


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


Row = tuple[str, Any, Any, Any]
Target = tuple[str, str, bool]


def case_rows(label: str, c: dict[str, Any]) -> tuple[list[Row], list[Target]]:
    d, r = c["drsvc"], c.get("restic")
    rows: list[Row] = []

    def row(name: str, dv: Any, rv: Any = None) -> None:
        ratio = _ratio(dv, rv) if isinstance(dv, int | float) and isinstance(rv, int | float) else None
        rows.append((f"{label} {name}", dv, "-" if rv is None else rv, "-" if ratio is None else ratio))

    def get(key: str) -> Any:
        return None if r is None else r[key]

    rep = d["report"]
    row("blobs (drsvc index)", rep["blobs"])
    row("prune seconds", d["seconds"], get("seconds"))
    row("peak PSS MiB (tree)", d["peak_pss_mib"], get("peak_pss_mib"))
    row("peak RSS MiB (tree sum)", d["peak_tree_rss_mib"], get("peak_tree_rss_mib"))
    row("peak RSS MiB (process)", d["peak_rss_mib"], get("peak_rss_mib"))
    row("repo MiB before", round(d["repo_bytes_before"] / MiB, 1), _mib(get("repo_bytes_before")))
    row("repo MiB after", round(d["repo_bytes_after"] / MiB, 1), _mib(get("repo_bytes_after")))
    row("freed MiB", round(d["freed_bytes"] / MiB, 1), _mib(get("freed_bytes")))
    row("packs deleted / repacked", f"{rep['deleted']} / {rep['repacked']}")
    targets: list[Target] = []
    ok_d = c["drsvc_verify"]["check_read_data_ok"] and c["drsvc_verify"]["restore_ok"]
    ok_before = c["drsvc_check_before"]["ok"]
    targets.append((f"{label}: drsvc check before prune (history valid)", str(ok_before), ok_before))
    if r is not None:
        tx = _ratio(d["seconds"], r["seconds"]) or 0.0
        targets.append((f"{label}: prune time <= 0.5x restic", f"{tx}x", tx <= 0.5))
        dp, rp = d["peak_pss_mib"], r["peak_pss_mib"]
        targets.append((f"{label}: prune peak PSS <= restic", f"{dp}/{rp}", dp <= rp))
        ok_r = c["restic_verify"]["check_read_data_ok"]
        targets.append(
            (f"{label}: after prune: drsvc check+restore, restic check", f"{ok_d}/{ok_r}", ok_d and ok_r)
        )
    else:
        targets.append((f"{label}: after prune: drsvc check --read-data + restore", str(ok_d), ok_d))
    return rows, targets


def _mib(v: int | None) -> float | None:
    return None if v is None else round(v / MiB, 1)


def render(res: dict[str, Any], rows: list[Row], targets: list[Target]) -> str:
    lines = [
        f"prune benchmark: {res['cores']} cores, {res['restic_version']}, restic prune --max-unused "
        f"{res['restic_max_unused']} (default), drsvc grace 0, repack_waste {res['drsvc_repack_waste']}",
        "",
        f"{'metric':<44} | {'drsvc':>12} | {'restic':>12} | {'ratio':>6}",
        f"{'-' * 44}-+-{'-' * 12}-+-{'-' * 12}-+-{'-' * 6}",
    ]
    for name, dv, rv, ratio in rows:
        lines.append(f"{name:<44} | {dv!s:>12} | {rv!s:>12} | {ratio!s:>6}")
    lines += ["", f"{'target':<64} | {'actual':>12} | result", f"{'-' * 64}-+-{'-' * 12}-+-------"]
    for name, actual, ok in targets:
        lines.append(f"{name:<64} | {actual:>12} | {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["run-drsvc-prune"]:
        rp = argparse.ArgumentParser(prog="python -m benchmarks.prune run-drsvc-prune")
        rp.add_argument("config", type=Path)
        rp.add_argument("tenant")
        rp.add_argument("--profile", type=Path)
        ra = rp.parse_args(args[1:])
        print(json.dumps(run_drsvc_prune(ra.config, ra.tenant, ra.profile)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.5, help="history case dataset scale (1.0 = ~500 MiB)")
    ap.add_argument("--rounds", type=int, default=20, help="history case: mutate rounds, one snapshot each")
    ap.add_argument("--syn-blobs", type=int, default=1_000_000, help="synthetic case: data blobs (files)")
    ap.add_argument(
        "--syn-restic-blobs",
        type=int,
        default=None,
        help="synthetic case with restic at this count (default: --syn-blobs; 0: no restic)",
    )
    ap.add_argument(
        "--data", type=Path, default=Path("/tmp/bench-prune-data"), help="history dataset (not shared)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-prune"), help="sites, repos, caches")
    ap.add_argument("--cases", default="history,synthetic")
    ap.add_argument("--profile", action="store_true", help="also profile drsvc's prune on a copy (cProfile)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "prune.json")
    a = ap.parse_args(args)
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic)", file=sys.stderr)
        return 2
    from drsvc.core.config import PruneConfig

    cases = {c.strip() for c in a.cases.split(",") if c.strip()}
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "cores": os.cpu_count(),
        "restic_version": restic_version(),
        "restic_max_unused": restic_max_unused(),
        "drsvc_repack_waste": PruneConfig().repack_waste,
        "cases": {},
    }
    rows: list[Row] = []
    targets: list[Target] = []

    def add(label: str, c: dict[str, Any]) -> None:
        res["cases"][label] = c
        r, t = case_rows(label, c)
        rows.extend(r)
        targets.extend(t)

    if "history" in cases:
        add("history", history_case(a.data, a.work / "history", a.scale, a.rounds, a.profile))
    if "synthetic" in cases:
        restic_n = a.syn_blobs if a.syn_restic_blobs is None else a.syn_restic_blobs
        for n in dict.fromkeys(x for x in (restic_n, a.syn_blobs) if x):
            label = f"synthetic {n // 1000}k"
            add(label, synthetic_case(a.work / f"synthetic-{n}", n, n == restic_n, a.profile))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["table"] = [{"metric": n, "drsvc": dv, "restic": rv, "ratio": x} for n, dv, rv, x in rows]
    res["targets"] = [{"target": n, "actual": v, "pass": ok} for n, v, ok in targets]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res, rows, targets))
    print(f"\n(benchmark took {res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
