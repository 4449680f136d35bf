"""Invariant 4 for the daemon: `drsvc run` killed with SIGKILL at random moments, 20 rounds, while it
snapshots and ships to three SeaweedFS sites. After each restart it converges; at the end every site passes
`check --read-data` and the latest snapshot restores to exactly the source.
(benchmarks/soak_daemon.py runs more rounds.)
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from helpers import tree_state
from prometheus_client.parser import text_string_to_metric_families

ROUNDS = int(os.environ.get("DRSVC_DAEMON_KILL_ROUNDS", "20"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _config(tmp: Path, src: Path, servers: list[Any], port: int) -> Path:
    lines = [
        f'[state]\ndir = "{tmp}/state"\n',
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntick = 0.2\ndrain_timeout = 5\n',
        '[tenants.fin]\npack_size = 262144\n[tenants.fin.key.passphrase]\nvalue = "pw"\n',
        "[tenants.fin.chunker]\nmin_size = 4096\navg_size = 16384\nmax_size = 65536\n",
    ]
    for i, s in enumerate(servers):
        lines.append(
            f'[sites.s{i}]\ntype = "s3"\nendpoint = "{s.endpoint}"\nbucket = "drsvc"\nsecure = false\n'
            f'create_bucket = true\ntimeout = 5\naccess_key = {{ value = "{s.access_key}" }}\n'
            f'secret_key = {{ value = "{s.secret_key}" }}\n'
        )
    lines.append(
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\n'
        'sites = ["s0", "s1", "s2"]\nmin_copies = 2\ninterval = 0.5\n'
    )
    cfg = tmp / "drsvc.toml"
    cfg.write_text("".join(lines))
    return cfg


def test_kill_9_the_daemon_20_times_and_it_converges(tmp_path: Path, seaweed_factory: Any) -> None:
    rng = random.Random(int(os.environ.get("DRSVC_CRASH_SEED", "7")))
    servers = seaweed_factory.many(3)
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(15):
            (src / f"d{d}" / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(100, 300_000)))
    port = _free_port()
    cfg = _config(tmp_path, src, servers, port)
    cli = [sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg)]
    subprocess.run([*cli, "init", "fin", "--scrypt-n", "1024"], check=True, capture_output=True)
    log = open(tmp_path / "daemon.log", "w")
    try:
        for round_no in range(ROUNDS):
            proc = subprocess.Popen([*cli, "run"], start_new_session=True, stdout=log, stderr=log)
            time.sleep(rng.uniform(0.6, 2.0))
            (src / f"d{rng.randint(0, 2)}" / f"r{round_no}.bin").write_bytes(
                rng.randbytes(rng.randint(1, 200_000))
            )
            time.sleep(rng.uniform(0.0, 0.6))
            os.killpg(proc.pid, signal.SIGKILL)  # daemon, forkserver, workers
            proc.wait()
        # the last run: it must converge (a protected snapshot of the final tree, no backlog) and stop cleanly
        mutated_at = time.time()
        proc = subprocess.Popen([*cli, "run"], start_new_session=True, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.3)
            try:
                m = _metrics(port)
            except OSError:
                continue
            protected = m.get(
                ("drsvc_source_last_protected_timestamp_seconds", (("source", "docs"), ("tenant", "fin"))), 0
            )
            backlog = [m.get(("drsvc_site_backlog_objects", (("site", f"s{i}"),)), -1) for i in range(3)]
            if protected > mutated_at and backlog == [0, 0, 0]:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        log.close()
    check = subprocess.run([*cli, "check", "fin", "--read-data"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": ok:") == 3
    for site in ("s0", "s1", "s2"):
        out = tmp_path / f"restored-{site}"
        r = subprocess.run(
            [*cli, "restore", "docs", "--to", str(out), "--site", site], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert tree_state(out) == tree_state(src)
