"""Invariant 4: `drsvc snapshot` killed with SIGKILL at random moments loses nothing.

Each round starts a snapshot through the real CLI (so the worker processes and the shipper run as in
production), kills its whole process group at a random moment, changes the source a little, and runs a
snapshot to completion. Afterwards every site passes `check --read-data` and the latest snapshot restores
to exactly the source.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import tree_state

ROUNDS = 6


def _cli(cfg: Path, *args: str, **kw: object) -> list[str]:
    return [sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg), *args]


def _write_config(tmp: Path, src: Path) -> Path:
    cfg = tmp / "drsvc.toml"
    cfg.write_text(
        f'[state]\ndir = "{tmp}/state"\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp}/sites/a"\n'
        f'[sites.b]\ntype = "local"\npath = "{tmp}/sites/b"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a", "b"]\nmin_copies = 2\n'
        "[tenants.fin.chunker]\nmin_size = 4096\navg_size = 16384\nmax_size = 65536\n"
        "[tenants.fin]\npack_size = 262144\n"
    )
    return cfg


def _mutate(src: Path, rng: random.Random, round_no: int) -> None:
    for i in range(rng.randint(2, 6)):
        size = rng.randint(1, 3_000_000)
        (src / f"d{rng.randint(0, 3)}" / f"r{round_no}-{i}.bin").write_bytes(rng.randbytes(size))
    victim = rng.choice(sorted(src.rglob("*.bin")))
    victim.unlink()
    with open(src / "pages.db", "r+b") as f:
        f.seek(rng.randrange(0, 4 * 1024 * 1024, 8192))
        f.write(rng.randbytes(8192))


def test_sigkill_during_snapshots_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("DRSVC_CRASH_SEED", "4")))
    src = tmp_path / "src"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(25):
            (src / f"d{d}" / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(1000, 400_000)))
    (src / "pages.db").write_bytes(rng.randbytes(4 * 1024 * 1024))
    cfg = _write_config(tmp_path, src)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(cfg, "init", "fin", "--scrypt-n", "1024"), check=True, capture_output=True, env=env)
    killed_mid_run = 0
    last = 1.5  # seconds the previous complete run took: the kill lands within that span
    for round_no in range(ROUNDS):
        # half the rounds send every file to the worker processes, so that they are killed mid-pack too
        extra = ["--in-process-bytes", "0"] if round_no % 2 else []
        if round_no:
            _mutate(src, rng, round_no)  # the killed run has work to do
        proc = subprocess.Popen(
            _cli(cfg, "snapshot", "docs", *extra),
            start_new_session=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 0.95) * last)
        if proc.poll() is None:
            killed_mid_run += 1
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its forkserver and its workers: the whole group
        proc.wait()
        began = time.monotonic()
        done = subprocess.run(
            _cli(cfg, "snapshot", "docs", "--json", *extra), capture_output=True, text=True, env=env
        )
        last = time.monotonic() - began
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["protected"] is True
    assert killed_mid_run >= ROUNDS // 2, "the kills should land while snapshots run"
    check = subprocess.run(_cli(cfg, "check", "fin", "--read-data"), capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 snapshots" not in check.stdout
    out = tmp_path / "restored"
    restored = subprocess.run(
        _cli(cfg, "restore", "docs", "--to", str(out), "--site", "b"), capture_output=True, text=True, env=env
    )
    assert restored.returncode == 0, restored.stderr
    assert tree_state(out) == tree_state(src)
    assert not list((tmp_path / "state" / "spool").rglob(".tmp-*")), "a finished run sweeps temporary files"
