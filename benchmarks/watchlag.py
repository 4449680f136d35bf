"""Watched-tree lag (issue 6): from a change in a `tree` source with ``watch = true`` to the moment the daemon
reports it protected at min_copies = 2 SeaweedFS sites, under a steady pace of file changes.

    python -m benchmarks.watchlag [--seconds 60] [--scale 0.3] [--work /tmp/bench-watchlag]
                                  [--run NAME ...] [--json benchmarks/results/watchlag.json]

Two throw-away SeaweedFS sites (one ``weed mini`` process each, loopback, free ports, an ``-s3.config``
identity, ``-master.volumeSizeLimitMB=1024 -volume.max=200``; SIGTERM, then SIGKILL after 2 s) serve every
run. Each run has its own config (``<work>/<run>/drsvc.toml``: one `tree` source with ``watch = true`` on
both sites, min_copies = 2, the default ``interval`` of 1 h), state directory, tenant and bucket, and a
fresh tree from ``benchmarks.dataset`` (``--scale``; run ``large`` adds 9 times as many small text files,
so it has about 10 times the files for twice the bytes). The daemon runs in this process (``App`` and
``Supervisor.start()``, as ``drsvc run`` builds them). Once the first snapshot is protected, a mutator
process changes the tree for ``--seconds``: every 0.5-1 s one file is modified (rewritten or appended),
created or renamed, 1 KiB to 4 MiB (log-uniform), and once, half-way, a burst of 200 small changes as fast
as it can. It stamps each change with the wall time after ``close()`` (or ``rename()``) returned.

The lag of a change at time a is T - a, where T is the wall time of the first advance of the source's
``protected_until`` to a value >= a (a snapshot's time is when its walk began: a change closed before it is
in it). The daemon is not changed: its methods are wrapped (instance attributes, one timestamp, then the
original): ``App.snapshot_to_spool`` (start, end, the record), ``spool.put`` (the record spooled),
each site's ``Shipper._ship_one`` (PUT start) and ``outbox.ack`` (PUT returned), ``Supervisor._protected``
(each advance), ``update_protection`` and ``changed`` (the watcher's calls). A change's lag splits into
stages that add up to it, against the first snapshot whose walk began after it:

- **busy**: a snapshot that began before the change was still running (one snapshot at a time).
- **debounce**: -> that snapshot was started (0.5 s of quiet, at most 3 s after the first change).
- **snapshot**: -> its record was spooled: prepare (dedup index from the sites, parent), walk the whole tree
  (stat every file), read and seal what changed, index, record.
- **ship**: -> the second site acknowledged the record (it ships after the snapshot's packs and index).
- **protect**: -> protected_until covers the change.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.anchors import (
    S3Target,
    process_tree,
    seaweed_s3,
)
from benchmarks.loglag import _machine_busy, _spawn_wait, _until, _weed_cpu, pct

KiB = 1024
MiB = 1024 * KiB
SITES = 2
SOURCE = "tree"
STAGES = ("busy", "debounce", "snapshot", "ship", "protect")
RUNS = {"base": 0, "large": 9}  # run name -> extra small text files per text file of the dataset
BURST = 200  # changes in the burst, half-way through the run
PACE = (0.5, 1.0)  # seconds between two steady changes (uniform)
SIZES = (1 * KiB, 4 * MiB)  # a change's size (log-uniform)


# ---------------------------------------------------------------------------------------------------------
# the sites


# ---------------------------------------------------------------------------------------------------------
# the tree and the mutator (its own process: its pacing and its CPU do not share the daemon's GIL)


def make_tree(root: Path, scale: float, extra_per_text: int) -> dict[str, Any]:
    """``benchmarks.dataset`` at `scale`, plus `extra_per_text` more small text files per text file (the
    dataset's own generators, other names and seeds), spread over the same directories."""
    summary = dataset.generate(root, scale)
    extra = extra_per_text * summary["files"]["text"]
    extra_bytes = 0
    if extra:
        seed = dataset.DEFAULT_SEED + 1
        pools = dataset._build_pools(seed)
        r = random.Random(f"{seed}:layout")
        dirs = dataset._dirs(r)
        for i in range(extra):
            kind = dataset._kind_of(r)
            rel = f"{r.choice(dirs[kind])}/{dataset._text_name(r, kind, 1_000_000 + i)}"
            fr = random.Random(f"{seed}:text:{rel}")
            data = dataset._text_body(fr, pools, kind, dataset._text_size(fr, kind))
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            extra_bytes += len(data)
    files = sum(summary["files"].values()) + extra
    dirs_n = sum(1 for _ in os.walk(root))
    return {
        "files": files,
        "dirs": dirs_n,
        "bytes": summary["total_bytes"] + extra_bytes,
        "extra_text_files": extra,
        "seconds": round(summary["seconds"], 1),
    }


def _content(rnd: random.Random, size: int, tag: str) -> bytes:
    """`size` bytes of log-like text with random ids (zstd level 3: about 2x smaller)."""
    head = f"# watchlag {tag}\n".encode()
    body = rnd.randbytes(max(0, size - len(head)) // 2 + 1).hex().encode()
    lines = b"\n".join(body[i : i + 99] for i in range(0, len(body), 99))
    return (head + lines)[:size]


def _size(rnd: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rnd.uniform(math.log(lo), math.log(hi))))


def mutator(root: Path, seconds: float, seed: int, out: Path) -> dict[str, Any]:
    """Change the tree for `seconds`: one change every PACE s, and a BURST half-way. Each change goes to
    `out` (JSON) as [wall ns after close/rename, kind, path, bytes]."""
    rnd = random.Random(seed)
    files = [rel for rel, _ in dataset.iter_files(root) if dataset.file_class(rel) != "db"]
    files = [rel for rel in files if not rel.startswith(".")]
    dirs = sorted({rel.rpartition("/")[0] for rel in files})
    changes: list[tuple[int, str, str, int]] = []
    n = 0

    def write(kind: str, rel: str, data: bytes, mode: str) -> None:
        with open(root / rel, mode) as f:
            f.write(data)
        changes.append((time.time_ns(), kind, rel, len(data)))

    def one(kind: str, lo: int, hi: int) -> tuple[str, Any]:
        """Prepare a change (before its due time); returns (kind, args) for `apply`."""
        nonlocal n
        n += 1
        size = _size(rnd, lo, hi)
        if kind == "modify":
            rel = rnd.choice(files)
            append = rnd.random() < 0.5
            return ("append" if append else "rewrite"), (rel, _content(rnd, size, f"{n}"))
        if kind == "create":
            rel = f"{rnd.choice(dirs)}/watchlag-{n}.txt"
            files.append(rel)
            return "create", (rel, _content(rnd, size, f"{n}"))
        i = rnd.randrange(len(files))
        old = files[i]
        new = f"{rnd.choice(dirs)}/renamed-{n}-{old.rpartition('/')[2]}"
        files[i] = new
        return "rename", (old, new)

    def apply(kind: str, args: Any, burst: bool = False) -> None:
        label = f"burst-{kind}" if burst else kind
        if kind == "rename":
            old, new = args
            os.rename(root / old, root / new)
            changes.append((time.time_ns(), label, new, (root / new).stat().st_size))
        else:
            write(label, args[0], args[1], "ab" if kind == "append" else "wb")

    kinds = ("modify", "create", "rename")
    late_max = burst_s = 0.0
    burst_at = seconds / 2
    burst_done = False
    start = time.monotonic()
    due = start
    while True:
        due += rnd.uniform(*PACE)
        if due - start > seconds:
            break
        if not burst_done and due - start >= burst_at:
            burst_done = True
            prepared = [one(rnd.choices(kinds, (6, 4, 0))[0], 1 * KiB, 64 * KiB) for _ in range(BURST)]
            t0 = time.monotonic()
            for kind, args in prepared:
                apply(kind, args, burst=True)
            burst_s = time.monotonic() - t0
            continue
        kind, args = one(rnd.choices(kinds, (5, 3, 2))[0], *SIZES)
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        else:
            late_max = max(late_max, now - due)
        apply(kind, args)
    out.write_text(json.dumps(changes))
    steady = [c for c in changes if not c[1].startswith("burst")]
    return {
        "changes": len(changes),
        "steady": len(steady),
        "burst": len(changes) - len(steady),
        "burst_seconds": round(burst_s, 3) if burst_done else None,
        "bytes": sum(c[3] for c in changes),
        "seconds": round(time.monotonic() - start, 2),
        "late_max_s": round(late_max, 4),
    }


# ---------------------------------------------------------------------------------------------------------
# probes


@dataclass
class Snap:
    """One snapshot, wall ns."""

    call_ns: int  # App.snapshot_to_spool called
    time_ns: int = 0  # the record's time: the walk began (changes closed before it are in it)
    finished_ns: int = 0  # the record's finished_ns: walk, reads and packs done
    spooled_ns: int = 0  # the record's spool.put returned
    end_ns: int = 0  # snapshot_to_spool returned (the parent cache saved)
    key: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    partial: bool = False
    warnings: int = 0
    ok: bool = True

    def acked(self, acks: dict[str, dict[str, int]], copies: int) -> int:
        a = sorted(acks.get(self.key, {}).values())
        return a[copies - 1] if len(a) >= copies else 0


@dataclass
class Probe:
    snaps: list[Snap] = field(default_factory=list)
    advances: list[tuple[int, float]] = field(default_factory=list)  # (wall ns, protected_until s)
    changed: list[int] = field(default_factory=list)  # wall ns of each watcher call
    puts: dict[str, int] = field(default_factory=dict)  # key -> wall ns the spool.put returned
    ship_start: dict[str, dict[str, int]] = field(default_factory=dict)
    acks: dict[str, dict[str, int]] = field(default_factory=dict)
    seq_key: dict[int, str] = field(default_factory=dict)
    updates: list[tuple[int, int]] = field(default_factory=list)
    dedup_load: list[tuple[int, int]] = field(default_factory=list)  # DedupIndex.load (start, end)
    find_parent: list[tuple[int, int]] = field(default_factory=list)


@contextmanager
def _prepare_probe(probe: Probe) -> Iterator[None]:
    """Time ``DedupIndex.load`` and ``find_parent`` as ``snapshot.run`` calls them (module attributes of this
    process, put back on exit: they only take timestamps)."""
    import snapshot.run as run

    orig_load, orig_parent = getattr(run, "DedupIndex"), getattr(run, "find_parent")  # noqa: B009

    class TimedIndex(orig_load):  # type: ignore[valid-type,misc]
        @classmethod
        async def load(cls, *args: Any, **kw: Any) -> Any:
            t0 = time.time_ns()
            try:
                return await orig_load.load(*args, **kw)
            finally:
                probe.dedup_load.append((t0, time.time_ns()))

    async def find_parent(*args: Any, **kw: Any) -> Any:
        t0 = time.time_ns()
        try:
            return await orig_parent(*args, **kw)
        finally:
            probe.find_parent.append((t0, time.time_ns()))

    setattr(run, "DedupIndex", TimedIndex)  # noqa: B010
    setattr(run, "find_parent", find_parent)  # noqa: B010
    try:
        yield
    finally:
        setattr(run, "DedupIndex", orig_load)  # noqa: B010
        setattr(run, "find_parent", orig_parent)  # noqa: B010


def _install(sup: Any, probe: Probe) -> None:
    """Wrap the daemon's methods (instance attributes: the classes and other instances are untouched)."""
    app = sup.app
    orig_snap = app.snapshot_to_spool

    async def snapshot_to_spool(source: str, *args: Any, **kw: Any) -> Any:
        s = Snap(time.time_ns())
        probe.snaps.append(s)
        try:
            result = await orig_snap(source, *args, **kw)
        except BaseException:
            s.ok, s.end_ns = False, time.time_ns()
            raise
        s.end_ns = time.time_ns()
        rec = result.record
        s.time_ns, s.finished_ns, s.key = rec.time_ns, rec.finished_ns, result.key
        s.stats, s.partial, s.warnings = dict(rec.stats), rec.partial, len(result.warnings)
        s.spooled_ns = probe.puts.get(result.key, s.end_ns)
        return result

    app.snapshot_to_spool = snapshot_to_spool  # Supervisor.snapshot looks it up on the App each time

    spool = app.spool
    orig_put = spool.put

    def put(key: str, data: bytes, *args: Any, **kw: Any) -> int:
        seq: int = orig_put(key, data, *args, **kw)
        probe.puts[key] = time.time_ns()
        return seq

    spool.put = put
    outbox = spool.outbox
    orig_ack = outbox.ack

    def ack(seq: int, site: str) -> bool:  # a worker thread, once the site's PUT returned
        t = time.time_ns()
        key = probe.seq_key.get(seq)
        if key is not None:
            probe.acks.setdefault(key, {})[site] = t
        done: bool = orig_ack(seq, site)
        return done

    outbox.ack = ack

    orig_protected = sup._protected
    state = sup.sources[SOURCE]

    async def protected(name: str, until: float) -> None:
        if name == SOURCE and until > state.protected_until:
            probe.advances.append((time.time_ns(), until))
        await orig_protected(name, until)

    sup._protected = protected

    orig_changed = sup.changed

    def changed(source: str) -> None:
        probe.changed.append(time.time_ns())
        orig_changed(source)

    sup.changed = changed  # start_watchers binds it (functools.partial) when the daemon starts

    for site, loop in sup.sites.items():
        orig_ship = loop.shipper._ship_one

        async def ship_one(p: Any, _site: str = site, _orig: Any = orig_ship) -> int:
            probe.seq_key[p.seq] = p.key
            probe.ship_start.setdefault(p.key, {})[_site] = time.time_ns()
            n: int = await _orig(p)
            return n

        loop.shipper._ship_one = ship_one

    orig_update = sup.update_protection

    async def update_protection() -> None:
        t0 = time.time_ns()
        await orig_update()
        probe.updates.append((t0, time.time_ns()))

    sup.update_protection = update_protection


# ---------------------------------------------------------------------------------------------------------
# CPU and the run


def _cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each process, from /proc/PID/stat."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tck
    return out


def _daemon_cpu() -> tuple[float, float]:
    """(this process, its other descendants but the weeds): the daemon and its data worker processes."""
    me = os.getpid()
    weeds = set(_weed_cpu())
    others = [p for p in process_tree(me) if p != me and p not in weeds]
    return _cpu([me]).get(me, 0.0), sum(_cpu(others).values())


def write_config(work: Path, tree: Path, sites: Sequence[S3Target], bucket: str) -> Path:
    """drsvc config: one watched tree source on both sites, min_copies = 2 (`drsvc run -c` accepts it)."""
    text = f'[state]\ndir = "{work / "state"}"\n[tenants.bench.key.passphrase]\nvalue = "drsvc-bench"\n'
    names = []
    for i, s3 in enumerate(sites, 1):
        names.append(f"s{i}")
        text += (
            f'[sites.s{i}]\ntype = "s3"\nendpoint = "{s3.endpoint}"\nbucket = "{bucket}"\n'
            "secure = false\ncreate_bucket = true\n"
            f'access_key = {{ value = "{s3.access_key}" }}\nsecret_key = {{ value = "{s3.secret_key}" }}\n'
        )
    text += (
        f'[sources.{SOURCE}]\ntenant = "bench"\ntype = "tree"\npath = "{tree}"\nwatch = true\n'
        f"sites = {json.dumps(names)}\nmin_copies = {len(names)}\n"
    )
    cfg = work / "drsvc.toml"
    cfg.write_text(text)
    return cfg


def _stat_walk(root: Path) -> int:
    """A plain walk that lists every directory and stats every entry, for reference: the files seen."""
    n = 0
    todo = [str(root)]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                else:
                    n += 1
    return n


def _digest(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for rel, p in dataset.iter_files(root):
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            while block := f.read(MiB):
                h.update(block)
        out[rel] = (p.stat().st_size, h.hexdigest())
    return out


async def run_one(
    name: str, n: int, work: Path, sites: Sequence[S3Target], a: argparse.Namespace
) -> dict[str, Any]:
    from drsvc.app import App
    from drsvc.core.config import load_config
    from drsvc.metrics import Metrics
    from drsvc.supervisor import DEBOUNCE, WATCH_MAX_DELAY, Supervisor

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tree = work / "tree"
    made = await asyncio.to_thread(make_tree, tree, a.scale, RUNS[name])
    print(f"{name}: tree of {made['files']} files, {made['bytes'] / 1e6:.0f} MB", file=sys.stderr)
    config_path = write_config(work, tree, sites, f"watchlag-{n}")
    config = load_config(config_path)
    metrics = Metrics()
    app = App(config, observer=Supervisor.request_observer(metrics))  # as drsvc run builds it
    await app.init_tenant("bench")
    sup = Supervisor(app, metrics)
    probe = Probe()
    _install(sup, probe)
    result: dict[str, Any] = {
        "run": name,
        "tree": made,
        "config": str(config_path),
        "debounce_s": DEBOUNCE,
        "watch_max_delay_s": WATCH_MAX_DELAY,
        "interval_s": config.sources[SOURCE].next_due(0.0),
    }
    st = sup.sources[SOURCE]
    t0 = time.monotonic()
    stack = ExitStack()
    stack.enter_context(_prepare_probe(probe))
    await sup.start()
    try:
        result["watching"] = st.watch_failed is None
        result["watches"] = sum(w.watches for w in sup._watchers)
        result["first_snapshot_protected_s"] = round(
            await _until(lambda: st.protected_until > 0, 600, "the first snapshot"), 2
        )
        first = len(probe.snaps)
        await asyncio.sleep(1.0)
        changes_path = work / "changes.json"
        argv = [sys.executable, "-m", "benchmarks.watchlag", "_mutator", str(tree), str(a.seconds)]
        argv += [str(6 + n), str(changes_path)]
        weed0, busy0, wall0 = _weed_cpu(), _machine_busy(), time.monotonic()
        me0, kids0 = _daemon_cpu()
        code, out, usage = await asyncio.to_thread(_spawn_wait, argv)
        if code != 0:
            raise RuntimeError(f"mutator exited {code}")
        wrote = json.loads(out)
        wrote["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
        changes = [tuple(c) for c in json.loads(changes_path.read_text())]
        last = max(c[0] for c in changes) / 1e9
        drain = await _until(lambda: st.protected_until >= last, 300, "the last change to be protected")
        me1, kids1 = _daemon_cpu()
        weed1, busy1, wall1 = _weed_cpu(), _machine_busy(), time.monotonic()
        wall = wall1 - wall0
        result["mutator"] = wrote
        result["drain_after_mutator_s"] = round(drain, 3)
        result["cpu"] = {
            "wall_s": round(wall, 2),
            "daemon_cores": round((me1 - me0 + kids1 - kids0) / wall, 3),
            "daemon_main_cores": round((me1 - me0) / wall, 3),
            "daemon_workers_cores": round((kids1 - kids0) / wall, 3),
            "weed_cores_each": [round((weed1.get(p, 0.0) - c) / wall, 3) for p, c in sorted(weed0.items())],
            "mutator_cores": round(wrote["cpu_s"] / wall, 3),
            "machine_busy_cores": round((busy1 - busy0) / wall, 3),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        }
        result.update(analyse(probe, changes, first, sorted(sup.sites)))
    finally:
        await sup.stop(config.daemon.drain_timeout)
        stack.close()
    t2 = time.monotonic()
    n_stat = await asyncio.to_thread(_stat_walk, tree)
    result["plain_stat_walk_s"] = {"files": n_stat, "seconds": round(time.monotonic() - t2, 3)}
    try:  # the newest snapshot, restored from one site, is the tree as the mutator left it
        out_dir = work / "restored"
        t1 = time.monotonic()
        await app.restore(SOURCE, out_dir, None, "s2")
        same = await asyncio.to_thread(_digest, tree) == await asyncio.to_thread(_digest, out_dir)
        result["restore_check"] = {"identical": same, "seconds": round(time.monotonic() - t1, 2)}
        await asyncio.to_thread(shutil.rmtree, out_dir)
    finally:
        await app.close()
    result["run_seconds"] = round(time.monotonic() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------------------
# analysis


def dist(xs: Sequence[float]) -> dict[str, float]:
    s = sorted(xs)
    if not s:
        return {}
    return {
        "min": round(s[0], 3),
        "p50": round(pct(s, 50), 3),
        "p90": round(pct(s, 90), 3),
        "p99": round(pct(s, 99), 3),
        "max": round(s[-1], 3),
        "mean": round(sum(s) / len(s), 3),
        "n": len(s),
    }


def _within(spans: Sequence[tuple[int, int]], snaps: Sequence[Snap]) -> dict[str, float]:
    """Durations of the spans that began during one of `snaps`' prepare phase."""
    out = []
    for a, b in spans:
        if any(s.call_ns <= a <= s.time_ns for s in snaps):
            out.append((b - a) / 1e9)
    return dist(out)


def analyse(
    probe: Probe, changes: Sequence[tuple[Any, ...]], first: int, sites: Sequence[str]
) -> dict[str, Any]:
    copies = len(sites)
    snaps = [s for s in probe.snaps[first:] if s.ok and s.time_ns]
    starts = [s.time_ns for s in snaps]
    walls = [w for w, _ in probe.advances]
    untils = [u for _, u in probe.advances]
    lags: dict[str, list[float]] = {"all": [], "steady": [], "burst": []}
    by_kind: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {k: [] for k in STAGES}  # steady changes
    burst_stages: dict[str, list[float]] = {k: [] for k in STAGES}
    unplaced = 0
    for t, kind, _rel, _size in changes:
        j = bisect.bisect_left(untils, t / 1e9)
        k = bisect.bisect_left(starts, t)
        if j == len(untils) or k == len(snaps):
            unplaced += 1
            continue
        covered = walls[j]
        lag = (covered - t) / 1e9
        lags["all"].append(lag)
        lags["burst" if kind.startswith("burst") else "steady"].append(lag)
        by_kind.setdefault(kind.removeprefix("burst-") if kind.startswith("burst") else kind, []).append(lag)
        s = snaps[k]
        running = [r for r in snaps[:k] if r.call_ns <= t < r.end_ns]
        r_end = running[-1].end_ns if running else t
        ack2 = s.acked(probe.acks, copies) or covered
        into = burst_stages if kind.startswith("burst") else stages
        into["busy"].append(max(0, min(r_end, s.call_ns) - t) / 1e9)
        into["debounce"].append(max(0, s.call_ns - max(t, r_end)) / 1e9)
        into["snapshot"].append((s.spooled_ns - max(t, s.call_ns)) / 1e9)
        into["ship"].append((ack2 - s.spooled_ns) / 1e9)
        into["protect"].append((covered - ack2) / 1e9)

    def per_snap(f: Any) -> dict[str, float]:
        return dist([f(s) for s in snaps])

    quarter = max(1, len(snaps) // 4)
    prep = [(s.time_ns - s.call_ns) / 1e9 for s in snaps]
    st = [s.stats for s in snaps]
    span = (snaps[-1].end_ns - snaps[0].call_ns) / 1e9 if len(snaps) > 1 else 0.0
    busy = sum((s.end_ns - s.call_ns) / 1e9 for s in snaps)
    return {
        "changes": len(changes),
        "changes_unplaced": unplaced,
        "lag_s": {k: dist(v) for k, v in lags.items()},
        "lag_by_kind_s": {k: dist(v) for k, v in sorted(by_kind.items())},
        "stage_s": {k: dist(v) for k, v in stages.items()},
        "burst_stage_s": {k: dist(v) for k, v in burst_stages.items()},
        "snapshots": len(snaps),
        "snapshots_failed": sum(1 for s in probe.snaps[first:] if not s.ok),
        "snapshots_partial": sum(1 for s in snaps if s.partial),
        "snapshot_busy_share": round(busy / span, 3) if span else 0.0,
        "snapshot_s": per_snap(lambda s: (s.end_ns - s.call_ns) / 1e9),
        "snapshot_phase_s": {
            "prepare": dist(prep),  # open the repository, load the dedup index (lists the sites), parent
            "prepare_dedup_load": _within(probe.dedup_load, snaps),
            "prepare_find_parent": _within(probe.find_parent, snaps),
            "walk_read_seal": per_snap(lambda s: (s.finished_ns - s.time_ns) / 1e9),
            "index_record": per_snap(lambda s: (s.spooled_ns - s.finished_ns) / 1e9),
            "parent_cache": per_snap(lambda s: (s.end_ns - s.spooled_ns) / 1e9),
            "ship_record_to_2nd_ack": per_snap(
                lambda s: ((s.acked(probe.acks, copies) or s.spooled_ns) - s.spooled_ns) / 1e9
            ),
        },
        "prepare_trend_s": {  # grows with the number of index objects at the sites (one per snapshot)
            "first_quarter_mean": round(sum(prep[:quarter]) / quarter, 3) if prep else None,
            "last_quarter_mean": round(sum(prep[-quarter:]) / quarter, 3) if prep else None,
        },
        "snapshot_stats_mean": {
            k: round(sum(x.get(k, 0) for x in st) / max(1, len(st)), 1)
            for k in ("files", "files_read", "files_unchanged", "bytes_read", "bytes_stored", "blobs_new")
        },
        "watcher_calls": len(probe.changed),
        "protection_updates": len(probe.updates),
        "protection_update_s": dist([(b - a) / 1e9 for a, b in probe.updates]),
    }


# ---------------------------------------------------------------------------------------------------------
# report


def report(res: dict[str, Any]) -> str:
    lines = [
        f"watched-tree lag: {res['seconds']:g} s of changes (one every {PACE[0]}-{PACE[1]} s, "
        f"{SIZES[0] // KiB} KiB-{SIZES[1] // MiB} MiB, + a burst of {BURST}), {SITES} SeaweedFS sites, "
        f"min_copies {SITES}, {res['cores']} cores",
        "",
        f"{'run':<6} {'files':>6} {'MB':>5} {'chg':>4} {'p50 s':>6} {'p90 s':>6} {'p99 s':>6} {'max s':>6} "
        f"{'burst max':>9} {'snaps':>5} {'snap s':>6} {'busy':>5} {'cores':>5} {'weed':>9} {'other':>5}",
    ]
    for r in res["runs"]:
        lag, b, cpu = r["lag_s"]["steady"], r["lag_s"]["burst"], r["cpu"]
        weed = "+".join(f"{c:.2f}" for c in cpu["weed_cores_each"])
        ours = cpu["daemon_cores"] + sum(cpu["weed_cores_each"]) + cpu["mutator_cores"]
        other = max(0.0, cpu["machine_busy_cores"] - ours)
        lines.append(
            f"{r['run']:<6} {r['tree']['files']:>6} {r['tree']['bytes'] / 1e6:>5.0f} {lag['n']:>4} "
            f"{lag['p50']:>6.2f} {lag['p90']:>6.2f} {lag['p99']:>6.2f} {lag['max']:>6.2f} "
            f"{b.get('max', math.nan):>9.2f} {r['snapshots']:>5} {r['snapshot_s']['mean']:>6.2f} "
            f"{r['snapshot_busy_share']:>5.2f} {cpu['daemon_cores']:>5.2f} {weed:>9} {other:>5.2f}"
        )
    lines += [
        "",
        "lag of the steady changes (chg): closed -> protected_until covers it; burst max: the slowest of the",
        f"burst's {BURST} changes; snap s: mean snapshot duration; busy: share of the",
        "time a snapshot was running; cores: CPU of the daemon (this process + its worker processes) / wall;",
        "weed: each SeaweedFS process; other: the rest of the machine's busy CPU.",
        "",
        "stages of each steady change's lag, p50 / p90 s (busy -> debounce -> snapshot -> ship -> protect)",
    ]
    for r in res["runs"]:
        parts = [f"{k} {v['p50']:.2f}/{v['p90']:.2f}" for k, v in r["stage_s"].items() if v]
        lines.append(f"{r['run']:<6} " + ", ".join(parts))
    lines += ["", "per snapshot, p50 / p90 s"]
    for r in res["runs"]:
        parts = [f"{k} {v['p50']:.3f}/{v['p90']:.3f}" for k, v in r["snapshot_phase_s"].items() if v]
        t = r["prepare_trend_s"]
        lines.append(
            f"{r['run']:<6} " + ", ".join(parts) + f"; prepare mean first/last quarter "
            f"{t['first_quarter_mean']}/{t['last_quarter_mean']}"
        )
    for r in res["runs"]:
        w = r["plain_stat_walk_s"]
        lines.append(
            f"{r['run']:<6} a plain scandir+stat walk of the {w['files']} files: {w['seconds']:.3f} s"
        )
    lines += ["", "checks"]
    for r in res["runs"]:
        lines.append(
            f"{r['run']:<6} unplaced {r['changes_unplaced']}, failed {r['snapshots_failed']}, partial "
            f"{r['snapshots_partial']}, restore of the newest snapshot identical: "
            f"{r.get('restore_check', {}).get('identical')}"
        )
    return "\n".join(lines)


NOTES = [
    "lag of a change: the wall time of the first advance of the source's protected_until to a value >= the "
    "change's stamp (taken after close() or rename() returned in the mutator process), minus the stamp.",
    "protected_until advances to a snapshot's time (when its walk began) once min_copies = 2 sites hold "
    "its record; the record ships after the snapshot's packs and index (a barrier), so an acknowledged "
    "record means the whole snapshot is at that site.",
    "stage_s (steady changes) and burst_stage_s split each lag against the first snapshot whose walk "
    "began after the change: busy (a snapshot already running), debounce (until the scheduler started "
    "the snapshot), snapshot (until its record was spooled), ship (until the second site acknowledged "
    "the record), protect (until protected_until covered the change).",
    "snapshot phases: prepare = snapshot_to_spool called -> the walk began (open the repository, list and "
    "load the dedup index at both sites, the parent); walk_read_seal = the walk of the whole tree, reading "
    "and sealing changed files; index_record = the index and record written to the spool.",
    "cores: user+system CPU seconds per wall second from the mutator's start to the drain's end; daemon = "
    "this process (event loop, threads, probes) plus its data worker processes; weeds excluded.",
    "the daemon is not changed: its methods are wrapped as instance attributes (a timestamp, then the "
    "original); the default interval (1 h) means every snapshot in the window is watcher-driven.",
    "restore_check: after the daemon stopped, the newest snapshot restored from site s2 equals the tree "
    "(size and BLAKE2b of every file).",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mutator"]:
        root, seconds, seed, out = argv[1:5]
        print(json.dumps(mutator(Path(root), float(seconds), int(seed), Path(out))))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.watchlag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="changes per run (default 60)")
    ap.add_argument("--scale", type=float, default=0.3, help="dataset scale (default 0.3: ~150 MB)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-watchlag"))
    ap.add_argument("--run", action="append", choices=sorted(RUNS), help="default: base and large")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "watchlag.json")
    a = ap.parse_args(argv)
    names = a.run or list(RUNS)
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        sites = [
            stack.enter_context(seaweed_s3(a.work / f"weed{i}", "watchlag")) for i in range(1, SITES + 1)
        ]
        print(f"sites: {', '.join(s.endpoint for s in sites)}", file=sys.stderr)
        for i, name in enumerate(names, 1):
            r = asyncio.run(run_one(name, i, a.work / f"run{i}-{name}", sites, a))
            runs.append(r)
            lag = r["lag_s"]["all"]
            print(
                f"{name}: p50 {lag['p50']} s, p90 {lag['p90']} s, p99 {lag['p99']} s, max {lag['max']} s, "
                f"{r['snapshots']} snapshots",
                file=sys.stderr,
            )
    res = {
        "argv": ["python", "-m", "benchmarks.watchlag", *argv],
        "cores": os.cpu_count(),
        "seconds": a.seconds,
        "scale": a.scale,
        "pace_s": PACE,
        "change_bytes": SIZES,
        "burst_changes": BURST,
        "sites": SITES,
        "total_seconds": round(time.monotonic() - t0, 1),
        "notes": NOTES,
        "runs": runs,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))
    ok = all(r["changes_unplaced"] == 0 and r.get("restore_check", {}).get("identical") for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
