"""Change-log lag (issue 6): from an append on the source to the moment the daemon reports it protected at
min_copies = 2 SeaweedFS sites, under a steady append load.

    python -m benchmarks.loglag [--seconds 60] [--rate 5000000] [--record 4096] [--work /tmp/bench-loglag]
                                [--run SPEC ...] [--sweep] [--json benchmarks/results/loglag.json]

Two throw-away SeaweedFS sites (`benchmarks.anchors.seaweed_s3`, one `weed mini` process each) serve every
run. Each run has its own config (``<work>/<run>/drsvc.toml``: one `log` source on both sites, min_copies =
2), state directory, tenant and bucket. The daemon runs in this process (``Supervisor.start()``, as
``drsvc run`` does, with the App built the same way). A writer process appends `--record` byte records to
one file at `--rate` bytes/s for `--seconds`, paced against absolute due times, and stamps each append with
the wall time after ``write()`` returned.

The lag of an append at time a is T - a, where T is the wall time of the first advance of the source's
``protected_until`` to a value >= a. The daemon is not changed: its private methods are wrapped (instance
attributes) to take timestamps, then call the original:

- ``Supervisor._protected`` (each advance of protected_until), ``spool.put`` (start, end: seal done, then
  fsync'd), ``Supervisor._segment_spooled`` (the SpooledSegment, from the cutting thread),
  ``Supervisor._track_segment`` (the loop tracks it), each site's ``Shipper._ship_one`` (PUT start),
  ``outbox.ack`` (the PUT returned), ``Supervisor.update_protection`` and ``tick`` (start, end; which tracked
  segments left the list), ``LogStreamer._cut_sync`` (each cut).

Each append is placed in its segment by byte offset (the segments' data_bytes, cumulated), which splits its
lag into stages: read (append -> the segment's last event stamp, taken after the read), seal + spool (->
``spool.put`` returned, fsync'd), ship (-> the PUT to the second site returned), protect (-> protected_until
covers it). An append that protected_until covers BEFORE its segment is at both sites is an early claim;
``lag_at_sites_s`` is the lag had protection waited for it.

A run SPEC is ``defaults`` or comma-separated ``sync=S``, ``tick=S`` (the config's sync_interval and
daemon.tick) and three EXPERIMENTS, which change the daemon's behaviour inside this process only and are not
the product: ``tick_only`` (the shippers' ``on_ack`` unset, so protection is evaluated on the tick alone,
as before the daemon evaluated it on acknowledgements) and ``poll`` (the LogStreamer made with
``inotify=False``, as where inotify cannot see the writes, e.g. NFS: it polls every min(sync_interval,
0.25) s), and ``min_cut=S`` (the cutting thread sleeps so that a cut begins at most every S seconds: fewer,
larger segments). ``--sweep`` adds the experiments to the two runs of issue 6 (``defaults`` and ``sync=0.1``).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.anchors import S3Target, process_tree, seaweed_s3

MiB = 1024 * 1024
SITES = 2
TARGETS = {"default": 0.5, "sync 0.1 s": 0.15}  # p99 seconds (issue 6)
LITESTREAM = {
    "litestream 0.5 defaults, 1 site": 1.02,
    "litestream 0.5 100 ms, 1 site": 0.15,
}  # issue 6, p99 s
STAGES = ("read", "seal_spool", "ship", "protect")


# ---------------------------------------------------------------------------------------------------------
# the writer (its own process: its pacing and its CPU do not share the daemon's GIL)


def _record(i: int, size: int, rnd: random.Random) -> bytes:
    """About 30 log lines, exactly `size` bytes: text with random ids (zstd -1: ~4.6x smaller)."""
    out: list[str] = []
    n = 0
    j = 0
    while n < size:
        line = (
            f"2025-06-01T12:{(i // 60000) % 60:02d}:{(i // 1000) % 60:02d}.{i % 1000:03d}{j:03d}Z INFO "
            f"api request id={rnd.getrandbits(64):016x} user={rnd.randrange(10**6)} "
            f"path=/v1/items/{rnd.randrange(10**5)} status={rnd.choice((200, 200, 200, 201, 404))} "
            f"ms={rnd.randrange(1000)}\n"
        )
        out.append(line)
        n += len(line)
        j += 1
    data = "".join(out).encode()[: size - 1]
    return data + b"\n"


def writer(path: Path, rate: float, seconds: float, size: int, times_out: Path) -> dict[str, Any]:
    """Append `size`-byte records to `path` at `rate` bytes/s for `seconds`; the wall time (ns) after each
    write() returned goes to `times_out` (int64 array). Record i is due at start + i * size / rate."""
    count = max(1, int(rate * seconds / size))
    step = size / rate
    rnd = random.Random(6)
    times = array.array("q")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    late_max = 0.0
    try:
        start = time.monotonic()
        for i in range(count):
            data = _record(i, size, rnd)  # made before its due time
            due = start + i * step
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                late_max = max(late_max, now - due)
            if os.write(fd, data) != size:
                raise RuntimeError("short write")
            times.append(time.time_ns())
        wall = time.monotonic() - start
    finally:
        os.close(fd)
    times_out.write_bytes(times.tobytes())
    return {
        "records": count,
        "bytes": count * size,
        "seconds": round(wall, 3),
        "rate_bytes_per_s": round(count * size / wall),
        "late_max_s": round(late_max, 4),
    }


# ---------------------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class RunSpec:
    name: str
    sync_interval: float | None = None  # None: the config default (1 s)
    tick: float | None = None  # None: the config default (daemon.tick, 1 s)
    tick_only: bool = False  # EXPERIMENT: the shippers' on_ack unset, protection only on the tick
    poll: bool = False  # EXPERIMENT: the streamer polls (inotify=False, as where inotify is unavailable)
    min_cut: float = 0.0  # EXPERIMENT: a cut starts at most this often (its thread sleeps before it)

    @classmethod
    def parse(cls, spec: str) -> RunSpec:
        sync: float | None = None
        tick: float | None = None
        min_cut = 0.0
        flags = {"tick_only": False, "poll": False}
        for part in (p.strip() for p in spec.split(",")):
            if part in ("", "defaults"):
                continue
            key, _, value = part.partition("=")
            if key == "sync" and value:
                sync = float(value)
            elif key == "tick" and value:
                tick = float(value)
            elif key == "min_cut" and value:
                min_cut = float(value)
            elif key in flags and not value:
                flags[key] = True
            else:
                raise SystemExit(
                    f"run spec {spec!r}: defaults, or sync=S, tick=S, tick_only, poll, min_cut=S"
                )
        return cls(spec.strip() or "defaults", sync, tick, min_cut=min_cut, **flags)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")

    @property
    def experiment(self) -> bool:
        return self.tick_only or self.poll or self.min_cut > 0

    @property
    def target_class(self) -> str:
        return "sync 0.1 s" if self.sync_interval is not None and self.sync_interval <= 0.1 else "default"


DEFAULT_RUNS = ("defaults", "sync=0.1")
SWEEP_RUNS = (
    "tick_only",
    "tick_only,tick=0.25",
    "tick_only,tick=0.1",
    "tick_only,tick=0.05",
    "poll",
    "poll,sync=0.1",
    "min_cut=0.05",
    "min_cut=0.1",
)


def write_config(work: Path, logs: Path, sites: Sequence[S3Target], bucket: str, spec: RunSpec) -> Path:
    """drsvc config: one log source on both sites, min_copies = 2 (a file `drsvc run -c` accepts as well)."""
    text = f'[state]\ndir = "{work / "state"}"\n[tenants.bench.key.passphrase]\nvalue = "drsvc-bench"\n'
    if spec.tick is not None:
        text += f"[daemon]\ntick = {spec.tick}\n"
    names = []
    for i, s3 in enumerate(sites, 1):
        names.append(f"s{i}")
        text += (
            f'[sites.s{i}]\ntype = "s3"\nendpoint = "{s3.endpoint}"\nbucket = "{bucket}"\n'
            "secure = false\ncreate_bucket = true\n"
            f'access_key = {{ value = "{s3.access_key}" }}\nsecret_key = {{ value = "{s3.secret_key}" }}\n'
        )
    text += (
        f'[sources.logs]\ntenant = "bench"\ntype = "log"\npath = "{logs}"\n'
        f"sites = {json.dumps(names)}\nmin_copies = {len(names)}\n"
    )
    if spec.sync_interval is not None:
        text += f"sync_interval = {spec.sync_interval}\n"
    cfg = work / "drsvc.toml"
    cfg.write_text(text)
    return cfg


@dataclass
class SegTimes:
    """Timestamps (wall ns) of one change-log segment on its way to protection."""

    seq: int
    key: str
    first_ns: int
    last_ns: int  # its last event's stamp, taken after the read
    data_bytes: int
    size: int
    spooled_ns: int  # SpooledSegment.spooled_ns: after spool.put and the position save
    put_start_ns: int = 0
    put_end_ns: int = 0
    tracked_ns: int = 0  # _track_segment ran on the event loop
    ship_start_ns: dict[str, int] = field(default_factory=dict)
    ack_ns: dict[str, int] = field(default_factory=dict)  # the site's PUT returned (its outbox ack begins)
    left_tracked_ns: int = 0  # end of the protection update after which it was no longer tracked

    def acked(self, copies: int) -> int:
        """When the `copies`-th site acknowledged it (0: never)."""
        acks = sorted(self.ack_ns.values())
        return acks[copies - 1] if len(acks) >= copies else 0


@dataclass
class Probe:
    """Timestamps from wrappers around the daemon's methods (they only record, then call the original).
    Keyed by store key: the shipper may start a segment's PUT before the streamer's callback has run."""

    advances: list[tuple[int, float]] = field(default_factory=list)  # (wall ns, protected_until s)
    segs: list[SegTimes] = field(default_factory=list)
    puts: dict[str, tuple[int, int]] = field(default_factory=dict)
    tracked_ns: dict[str, int] = field(default_factory=dict)
    ship_start: dict[str, dict[str, int]] = field(default_factory=dict)
    acks: dict[str, dict[str, int]] = field(default_factory=dict)
    seq_key: dict[int, str] = field(default_factory=dict)
    left_tracked: dict[str, int] = field(default_factory=dict)
    tracked_live: set[str] = field(default_factory=set)
    ticks: list[tuple[int, int]] = field(default_factory=list)
    updates: list[tuple[int, int]] = field(default_factory=list)  # protection updates (tick or ack)
    cuts: list[tuple[int, int]] = field(default_factory=list)
    ship_failures: int = 0

    def segments(self) -> list[SegTimes]:
        for s in self.segs:
            s.put_start_ns, s.put_end_ns = self.puts.get(s.key, (0, 0))
            s.tracked_ns = self.tracked_ns.get(s.key, 0)
            s.ship_start_ns = self.ship_start.get(s.key, {})
            s.ack_ns = self.acks.get(s.key, {})
            s.left_tracked_ns = self.left_tracked.get(s.key, 0)
        return sorted(self.segs, key=lambda s: s.seq)


def _install(sup: Any, probe: Probe, source: str) -> None:
    """Wrap the supervisor's methods (instance attributes: the class and other instances are untouched)."""
    spool = sup.app.spool
    orig_put = spool.put

    def put(key: str, data: bytes, *args: Any, **kw: Any) -> int:
        t0 = time.time_ns()
        seq: int = orig_put(key, data, *args, **kw)
        probe.puts[key] = (t0, time.time_ns())
        return seq

    spool.put = put
    outbox = spool.outbox
    orig_ack = outbox.ack

    def ack(seq: int, site: str) -> bool:  # a worker thread, once the site's PUT returned
        t = time.time_ns()  # before the commit: protection may read the row before this thread runs again
        key = probe.seq_key.get(seq)
        if key is not None:
            probe.acks.setdefault(key, {})[site] = t
        all_sites: bool = orig_ack(seq, site)
        return all_sites

    outbox.ack = ack

    orig_spooled = sup._segment_spooled

    def segment_spooled(seg: Any) -> None:  # the cutting thread, after spool.put and the position save
        if seg.source == source:
            t = SegTimes(
                seg.seq, seg.key, seg.first_ns, seg.last_ns, seg.data_bytes, seg.size, seg.spooled_ns
            )
            probe.segs.append(t)
        orig_spooled(seg)

    sup._segment_spooled = segment_spooled  # LogStreamer gets it as on_segment in start_streamers

    orig_track = sup._track_segment

    def track_segment(seg: Any) -> None:
        probe.tracked_ns[seg.key] = time.time_ns()
        probe.tracked_live.add(seg.key)
        orig_track(seg)

    sup._track_segment = track_segment

    orig_protected = sup._protected
    state = sup.sources[source]

    async def protected(name: str, until: float) -> None:
        if name == source and until > state.protected_until:
            probe.advances.append((time.time_ns(), until))  # the original sets it before its first await
        await orig_protected(name, until)

    sup._protected = protected

    for site, loop in sup.sites.items():
        orig_ship = loop.shipper._ship_one

        async def ship_one(p: Any, _site: str = site, _orig: Any = orig_ship) -> int:
            probe.seq_key[p.seq] = p.key
            probe.ship_start.setdefault(p.key, {})[_site] = time.time_ns()
            try:
                n: int = await _orig(p)
            except BaseException:
                probe.ship_failures += 1
                raise
            return n

        loop.shipper._ship_one = ship_one

    def wrap_timed(name: str, into: list[tuple[int, int]], leave: bool) -> None:
        orig = getattr(sup, name)

        async def timed() -> None:
            t0 = time.time_ns()
            await orig()
            t1 = time.time_ns()
            into.append((t0, t1))
            if leave:  # tracked segments that are no longer in Supervisor.tracked
                now_tracked = {t.key for t in sup.tracked}
                for key in [k for k in probe.tracked_live if k not in now_tracked]:
                    probe.tracked_live.discard(key)
                    probe.left_tracked[key] = t1

        setattr(sup, name, timed)

    if hasattr(sup, "update_protection"):  # tick and the ack-driven task both call it
        wrap_timed("update_protection", probe.updates, True)
        wrap_timed("tick", probe.ticks, False)
    else:
        wrap_timed("tick", probe.ticks, True)


def _instrument_streamer(streamer: Any, probe: Probe, min_cut: float) -> None:
    orig = streamer._cut_sync
    last = [0.0]

    def cut_sync(*args: Any) -> bool:
        if min_cut > 0:  # EXPERIMENT: hold the cut until `min_cut` after the previous one began
            time.sleep(max(0.0, last[0] + min_cut - time.monotonic()))
            last[0] = time.monotonic()
        t0 = time.time_ns()
        try:
            more: bool = orig(*args)
            return more
        finally:
            probe.cuts.append((t0, time.time_ns()))

    streamer._cut_sync = cut_sync


def _weed_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each `weed` process below this one."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in process_tree(os.getpid()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
        except OSError:
            continue
        if comm == "weed":
            out[pid] = (int(fields[11]) + int(fields[12])) / tck
    return out


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _disks() -> tuple[float, float, float]:
    """Over the machine's whole disks (/proc/diskstats): bytes written, flushes, seconds busy (io_ticks)."""
    written = flushes = busy = 0.0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) >= 14 and re.fullmatch(r"(?:[sv]|xv)d[a-z]+|nvme\d+n\d+", f[2]):
            written += int(f[9]) * 512
            busy += int(f[12]) / 1000
            flushes += int(f[18]) if len(f) >= 20 else 0
    return written, flushes, busy


def _written_by(pids: Sequence[int]) -> int:
    """write_bytes of /proc/PID/io (bytes these processes caused to be written to storage)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _spawn_wait(argv: list[str]) -> tuple[int, bytes, resource.struct_rusage]:
    """Run argv (in a worker thread): exit code, stdout and its rusage (os.wait4)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return proc.returncode, out, usage


async def _until(cond: Callable[[], bool], seconds: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > seconds:
            raise RuntimeError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def run_one(
    spec: RunSpec, work: Path, sites: Sequence[S3Target], bucket: str, a: argparse.Namespace
) -> dict[str, Any]:
    from drsvc.app import App
    from drsvc.core.config import load_config
    from drsvc.metrics import Metrics
    from drsvc.supervisor import Supervisor

    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    logfile = logs / "app.log"
    logfile.write_bytes(b"boot\n")
    base = logfile.stat().st_size
    config_path = write_config(work, logs, sites, bucket, spec)
    config = load_config(config_path)
    source = "logs"
    metrics = Metrics()
    app = App(config, observer=Supervisor.request_observer(metrics))  # as drsvc run builds it
    await app.init_tenant("bench")
    sup = Supervisor(app, metrics)
    probe = Probe()
    _install(sup, probe, source)
    if spec.tick_only:  # EXPERIMENT: as before the daemon evaluated protection on acks
        for loop in sup.sites.values():
            loop.shipper.on_ack = None
    if spec.poll:  # EXPERIMENT: the streamer polls every min(sync_interval, 0.25) s instead of inotify
        from unittest import mock

        from drsvc import supervisor as supmod
        from snapshot.logtail import LogStreamer

        class Polling(LogStreamer):
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **{**kw, "inotify": False})

        with mock.patch.object(supmod, "LogStreamer", Polling):
            await sup.start()
    else:
        await sup.start()
    streamer = sup.streamers[source]
    _instrument_streamer(streamer, probe, spec.min_cut)
    st = sup.sources[source]
    result: dict[str, Any] = {
        "run": spec.name,
        "experiment": spec.experiment,
        "sync_interval": config.sources[source].sync_interval,
        "tick": config.daemon.tick,
        "config": str(config_path),
    }
    try:
        result["start_to_protected_s"] = round(await _until(lambda: st.protected_until > 0, 120, "start"), 3)
        await asyncio.sleep(1.0)  # let the first tick after the checkpoint settle
        times_path = work / "append-times.bin"
        argv = [sys.executable, "-m", "benchmarks.loglag", "_writer", str(logfile), str(a.rate)]
        argv += [str(a.seconds), str(a.record), str(times_path)]
        cpu0, weed0, busy0, wall0 = _self_cpu(), _weed_cpu(), _machine_busy(), time.monotonic()
        disk0, ours0 = _disks(), _written_by([os.getpid(), *weed0])
        code, out, usage = await asyncio.to_thread(_spawn_wait, argv)
        if code != 0:
            raise RuntimeError(f"writer exited {code}")
        wrote = json.loads(out)
        wrote["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
        times = array.array("q")
        times.frombytes(times_path.read_bytes())
        last = times[-1] / 1e9
        drain = await _until(lambda: st.protected_until >= last, 120, "the last append to be protected")
        cpu1, weed1, busy1, wall1 = _self_cpu(), _weed_cpu(), _machine_busy(), time.monotonic()
        disk1, ours1 = _disks(), _written_by([os.getpid(), *weed0])
        result["writer"] = wrote
        result["drain_after_writer_s"] = round(drain, 3)
        wall = wall1 - wall0
        result["cpu"] = {
            "wall_s": round(wall, 2),
            "daemon_cpu_s": round(cpu1 - cpu0, 2),
            "daemon_cores": round((cpu1 - cpu0) / wall, 3),
            "weed_cores_each": [round((weed1.get(p, 0.0) - c) / wall, 3) for p, c in sorted(weed0.items())],
            "writer_cores": round(wrote["cpu_s"] / wall, 3),
            # everything on the machine, these processes included: other load shows as the difference
            "machine_busy_cores": round((busy1 - busy0) / wall, 3),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            # of this process since it started: every run of one invocation shares it
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        result["disk"] = {  # the machine's disks; ours: this process, the weeds and the writer's appends
            "machine_write_mb_per_s": round((disk1[0] - disk0[0]) / 1e6 / wall, 2),
            "ours_write_mb_per_s": round((ours1 - ours0 + wrote["bytes"]) / 1e6 / wall, 2),
            "machine_flushes_per_s": round((disk1[1] - disk0[1]) / wall, 1),
            "machine_busy_share": round((disk1[2] - disk0[2]) / wall, 3),
        }
        result["streamer"] = {"mode": streamer.mode, "warnings": list(streamer.warnings)}
        result.update(analyse(probe, times, base, a.record, sorted(sup.sites), spec))
    finally:
        await sup.stop(config.daemon.drain_timeout)
        await app.close()
    return result


# ---------------------------------------------------------------------------------------------------------
# analysis


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted `xs` (q in 0..100)."""
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def dist(xs: Sequence[float]) -> dict[str, float]:
    s = sorted(xs)
    if not s:
        return {}
    return {
        "min": round(s[0], 4),
        "p50": round(pct(s, 50), 4),
        "p99": round(pct(s, 99), 4),
        "max": round(s[-1], 4),
        "mean": round(sum(s) / len(s), 4),
    }


def analyse(
    probe: Probe, times: Sequence[int], base: int, record: int, sites: Sequence[str], spec: RunSpec
) -> dict[str, Any]:
    segs = probe.segments()
    ends: list[int] = []
    off = base
    for s in segs:
        off += s.data_bytes
        ends.append(off)
    walls = [w for w, _ in probe.advances]
    untils = [u for _, u in probe.advances]
    copies = len(sites)
    lags: list[float] = []
    lags_at_sites: list[float] = []  # the lag had protection waited for the append's segment at the sites
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    early: list[float] = []  # protected_until covered the append before its segment was at `copies` sites
    early_cause = {"stamp_after_read": 0, "segment_not_at_sites": 0}
    unplaced = 0
    for i, a in enumerate(times):
        j = bisect.bisect_left(untils, a / 1e9)
        if j == len(untils):
            unplaced += 1
            continue
        covered = walls[j]
        lags.append((covered - a) / 1e9)
        k = bisect.bisect_left(ends, base + (i + 1) * record)
        if k == len(segs):
            unplaced += 1
            continue
        s = segs[k]
        ack = s.acked(copies)
        lags_at_sites.append((max(covered, ack or covered) - a) / 1e9)
        if ack == 0 or ack > covered:
            early.append(((ack or covered) - covered) / 1e9)
            # the advance that covered it was for an earlier segment whose last stamp is after this append
            earlier = k > 0 and untils[j] * 1e9 < s.first_ns
            early_cause["stamp_after_read" if earlier else "segment_not_at_sites"] += 1
        stages["read"].append((s.last_ns - a) / 1e9)
        stages["seal_spool"].append((s.put_end_ns - s.last_ns) / 1e9)
        stages["ship"].append(((ack or covered) - s.put_end_ns) / 1e9)
        stages["protect"].append((covered - (ack or covered)) / 1e9)
    # segments that left Supervisor.tracked before they were at `copies` sites (so a later segment's
    # protection could pass over them)
    dropped = [
        s for s in segs if s.left_tracked_ns and (s.acked(copies) == 0 or s.left_tracked_ns < s.acked(copies))
    ]
    per_seg = {
        "encode_seal": dist([(s.put_start_ns - s.last_ns) / 1e9 for s in segs if s.put_start_ns]),
        "spool_put_fsync": dist([(s.put_end_ns - s.put_start_ns) / 1e9 for s in segs if s.put_start_ns]),
        "position_save": dist([(s.spooled_ns - s.put_end_ns) / 1e9 for s in segs if s.put_end_ns]),
        "queue_before_put": dist(
            [(min(s.ship_start_ns.values()) - s.put_end_ns) / 1e9 for s in segs if s.ship_start_ns]
        ),
        "put_each_site": dist(
            [(s.ack_ns[x] - s.ship_start_ns[x]) / 1e9 for s in segs for x in s.ack_ns if x in s.ship_start_ns]
        ),
        "ack2_to_protected": dist(
            [
                (walls[j] - s.acked(copies)) / 1e9
                for s in segs
                if s.acked(copies) and (j := bisect.bisect_left(untils, s.last_ns / 1e9)) < len(walls)
            ]
        ),
    }
    cut_s = [(b - a) / 1e9 for a, b in probe.cuts]
    tick_s = [(b - a) / 1e9 for a, b in probe.ticks]
    n = len(segs)
    out: dict[str, Any] = {
        "appends": len(times),
        "appends_unplaced": unplaced,
        "lag_s": dist(lags),
        "lag_at_sites_s": dist(lags_at_sites),
        "stage_s": {k: dist(v) for k, v in stages.items()},
        "segment_stage_s": per_seg,
        "segments": n,
        "segments_per_s": round(n / max(1e-9, (segs[-1].spooled_ns - segs[0].spooled_ns) / 1e9), 1)
        if n > 1
        else 0,
        "segment_data_kib_mean": round(sum(s.data_bytes for s in segs) / max(1, n) / 1024, 1),
        "segment_sealed_kib_mean": round(sum(s.size for s in segs) / max(1, n) / 1024, 1),
        "cuts": len(probe.cuts),
        "cut_s": dist(cut_s),
        "ticks": len(probe.ticks),
        "tick_duration_s": dist(tick_s),
        "protection_updates": len(probe.updates),
        "protection_update_s": dist([(b - a) / 1e9 for a, b in probe.updates]),
        "protection_advances": len(probe.advances),
        "ship_failures": probe.ship_failures,
        "early_claims": {
            "appends": len(early),
            "share": round(len(early) / max(1, len(times)), 5),
            "by_cause": early_cause,
            "claimed_before_at_sites_s": dist(early),
        },
        "segments_dropped_from_tracking": len(dropped),
        "sample_segments": sample(segs, walls, untils, sites, copies),
    }
    target = TARGETS[spec.target_class]
    p99 = out["lag_s"].get("p99", math.inf)
    out["target"] = {"class": spec.target_class, "p99_le_s": target, "pass": bool(p99 <= target)}
    return out


def sample(
    segs: Sequence[SegTimes], walls: Sequence[int], untils: Sequence[float], sites: Sequence[str], copies: int
) -> list[dict[str, Any]]:
    """~10 segments spread over the run, times in ms after the segment's first event."""
    if not segs:
        return []
    step = max(1, len(segs) // 10)
    rows = []
    for s in segs[step // 2 :: step][:10]:
        j = bisect.bisect_left(untils, s.last_ns / 1e9)
        t0 = s.first_ns

        def ms(t: int, t0: int = t0) -> float | None:
            return round((t - t0) / 1e6, 1) if t else None

        rows.append(
            {
                "seq": s.seq,
                "data_kib": round(s.data_bytes / 1024, 1),
                "sealed_kib": round(s.size / 1024, 1),
                "last_event": ms(s.last_ns),
                "spool_put_start": ms(s.put_start_ns),
                "spool_put_end": ms(s.put_end_ns),
                "spooled": ms(s.spooled_ns),
                "tracked": ms(s.tracked_ns),
                **{f"put_start_{x}": ms(s.ship_start_ns.get(x, 0)) for x in sites},
                **{f"ack_{x}": ms(s.ack_ns.get(x, 0)) for x in sites},
                "protected": ms(walls[j]) if j < len(walls) else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# report


def report(res: dict[str, Any]) -> str:
    lines = [
        f"change-log lag, {res['rate'] / 1e6:g} MB/s of {res['record']} B appends for {res['seconds']:g} s, "
        f"{SITES} SeaweedFS sites, min_copies {SITES}, {res['cores']} cores",
        "",
        f"{'run':<26} {'p50 s':>6} {'p99 s':>6} {'max s':>6} {'p99@s':>6} {'segs':>6} {'seg KiB':>7} "
        f"{'sealed':>6} {'cores':>5} {'weed':>9} {'other':>5} {'early':>6} {'drop':>4}  target",
    ]
    for r in res["runs"]:
        lag, cpu, t = r["lag_s"], r["cpu"], r["target"]
        weed = "+".join(f"{c:.2f}" for c in cpu["weed_cores_each"])
        verdict = "PASS" if t["pass"] else "FAIL"
        ours = cpu["daemon_cores"] + sum(cpu["weed_cores_each"]) + cpu["writer_cores"]
        other = max(0.0, cpu["machine_busy_cores"] - ours)
        lines.append(
            f"{r['run']:<26} {lag['p50']:>6.3f} {lag['p99']:>6.3f} {lag['max']:>6.3f} "
            f"{r['lag_at_sites_s']['p99']:>6.3f} {r['segments']:>6} {r['segment_data_kib_mean']:>7.1f} "
            f"{r['segment_sealed_kib_mean']:>6.1f} {cpu['daemon_cores']:>5.2f} {weed:>9} {other:>5.2f} "
            f"{r['early_claims']['appends']:>6} {r['segments_dropped_from_tracking']:>4}  "
            + (f"p99 <= {t['p99_le_s']} s ({t['class']}): {verdict}" if not r["experiment"] else "experiment")
        )
    lines += [
        "",
        "p99@s: the p99 had protection waited for each append's segment at both sites; early: appends that",
        "protected_until covered before that; drop: segments that left Supervisor.tracked before both sites",
        "had them; cores: CPU of this process (daemon + probes) / wall; weed: each SeaweedFS process; other:",
        "the rest of the machine's busy CPU (other programs; nothing else should run meanwhile).",
    ]
    lines += [
        "",
        "stages of each append's lag, p50 / p99 s (read -> seal+spool -> ship to 2nd ack -> protect)",
    ]
    for r in res["runs"]:
        parts = [f"{k} {v['p50']:.3f}/{v['p99']:.3f}" for k, v in r["stage_s"].items() if v]
        lines.append(f"{r['run']:<26} " + ", ".join(parts))
    lines += ["", "per segment, p50 / p99 ms"]
    for r in res["runs"]:
        parts = [
            f"{k} {v['p50'] * 1e3:.1f}/{v['p99'] * 1e3:.1f}" for k, v in r["segment_stage_s"].items() if v
        ]
        for name in ("cut_s", "tick_duration_s", "protection_update_s"):
            if r.get(name):
                parts.append(
                    f"{name.removesuffix('_s')} {r[name]['p50'] * 1e3:.1f}/{r[name]['p99'] * 1e3:.1f}"
                )
        lines.append(f"{r['run']:<26} " + ", ".join(parts))
    lines += [
        "",
        "stalls and the disk: the longest cut, spool put and position save (s); machine disk MB/s written",
    ]
    lines += ["(ours: daemon, weeds, appends), flushes/s and busy share (io_ticks)"]
    for r in res["runs"]:
        seg, d = r["segment_stage_s"], r["disk"]
        lines.append(
            f"{r['run']:<26} cut {r['cut_s']['max']:.3f}, put {seg['spool_put_fsync']['max']:.3f}, "
            f"save {seg['position_save']['max']:.3f}; disk {d['machine_write_mb_per_s']:.1f} MB/s "
            f"(ours {d['ours_write_mb_per_s']:.1f}), {d['machine_flushes_per_s']:.0f} flushes/s, "
            f"busy {d['machine_busy_share']:.2f}"
        )
    lines += [
        "",
        "for comparison (issue 6, one site): " + ", ".join(f"{k} p99 {v} s" for k, v in LITESTREAM.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_writer"]:
        path, rate, seconds, size, out = argv[1:6]
        print(json.dumps(writer(Path(path), float(rate), float(seconds), int(size), Path(out))))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loglag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="append load per run (default 60)")
    ap.add_argument("--rate", type=float, default=5e6, help="bytes/s appended (default 5 MB/s)")
    ap.add_argument("--record", type=int, default=4096, help="bytes per append (default 4096)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-loglag"))
    ap.add_argument(
        "--run", action="append", help=f"a run SPEC, repeatable (default: {', '.join(DEFAULT_RUNS)})"
    )
    ap.add_argument("--sweep", action="store_true", help=f"also: {'; '.join(SWEEP_RUNS)}")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "loglag.json")
    a = ap.parse_args(argv)
    specs = [RunSpec.parse(s) for s in (a.run or DEFAULT_RUNS)]
    if a.sweep:
        specs += [RunSpec.parse(s) for s in SWEEP_RUNS]
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:  # on exit each weed gets SIGTERM, 2 s, then SIGKILL, by its PID
        sites = [stack.enter_context(seaweed_s3(a.work / f"weed{i}")) for i in range(1, SITES + 1)]
        print(f"sites: {', '.join(s.endpoint for s in sites)}", file=sys.stderr)
        for i, spec in enumerate(specs, 1):
            r = asyncio.run(run_one(spec, a.work / f"run{i}-{spec.slug}", sites, f"loglag-{i}", a))
            runs.append(r)
            lag = r["lag_s"]
            print(
                f"{spec.name}: p50 {lag['p50']} s, p99 {lag['p99']} s, max {lag['max']} s, "
                f"{r['segments']} segments",
                file=sys.stderr,
            )
    res = {
        "argv": ["python", "-m", "benchmarks.loglag", *argv],
        "cores": os.cpu_count(),
        "seconds": a.seconds,
        "rate": a.rate,
        "record": a.record,
        "sites": SITES,
        "targets_p99_s": TARGETS,
        "litestream_p99_s": LITESTREAM,
        "total_seconds": round(time.monotonic() - t0, 1),
        "runs": runs,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))
    return 0 if all(r["target"]["pass"] for r in runs if not r["experiment"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
