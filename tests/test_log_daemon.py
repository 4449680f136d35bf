"""A log source in the daemon: streamed to two sites, protection and lag tracked, restored to points in time
through the App and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import init_app, local_sites, make_config
from test_supervisor import _samples

from drsvc.cli.main import main
from drsvc.core.errors import ConfigError
from drsvc.metrics import Metrics
from drsvc.supervisor import Supervisor


async def wait_for(cond: Any, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while not cond():  # noqa: ASYNC110 - polls state that other tasks change
            await asyncio.sleep(0.02)


def content(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_the_daemon_streams_a_log_source_and_restores_points_in_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_bytes(b"boot\n")
    cfg = make_config(
        tmp_path,
        logs,
        local_sites(tmp_path, ["a", "b"]),
        min_copies=2,
        source={"type": "log", "sync_interval": 0.2, "interval": "1h"},
    )
    app = await init_app(cfg)
    metrics = Metrics()
    sup = Supervisor(app, metrics)
    await sup.start()
    points: list[tuple[float, dict[str, bytes]]] = []
    try:
        st = sup.sources["docs"]
        await wait_for(lambda: st.protected_until > 0, 20)
        for i in range(5):
            with (logs / "app.log").open("ab") as f:
                f.write(f"line {i}\n".encode() * 100)
            wrote = time.time()
            await wait_for(lambda w=wrote: st.protected_until >= w, 10)  # protected within seconds
            points.append((time.time(), content(logs)))
            await asyncio.sleep(0.05)
        (logs / "app.log").rename(logs / "app.log.1")  # rotation
        (logs / "app.log").write_bytes(b"after rotation\n")
        wrote = time.time()
        await wait_for(lambda: st.protected_until >= wrote, 10)
        points.append((time.time(), content(logs)))
        s = _samples(metrics)
        assert s[("drsvc_log_lag_seconds", (("source", "docs"), ("tenant", "fin")))] < 5
        assert s[("drsvc_log_segment_bytes_count", (("source", "docs"), ("tenant", "fin")))] >= 6
        with pytest.raises(ConfigError, match="log source"):
            await app.snapshot_to_spool("docs")
    finally:
        await sup.stop(5)
    try:
        for i, (t, want) in enumerate(points):
            r = await app.restore("docs", tmp_path / f"r{i}", int(t * 1e9), "b")
            assert content(tmp_path / f"r{i}") == want, i
            assert r.rpo_achieved_s is not None and r.rpo_achieved_s < 10
        span = await app.restorable_range("docs")
        assert span is not None and span[1] >= int(points[-1][0] * 1e9) - 10**9
    finally:
        await app.close()
    config_file = tmp_path / "drsvc.toml"
    sites = "".join(f'[sites.{n}]\ntype = "local"\npath = "{tmp_path}/sites/{n}"\n' for n in ("a", "b"))
    config_file.write_text(
        f'[state]\ndir = "{tmp_path}/state"\n'
        '[tenants.fin.key.passphrase]\nvalue = "correct horse battery staple"\n'
        + sites
        + f'[sources.docs]\ntenant = "fin"\ntype = "log"\npath = "{logs}"\nsites = ["a", "b"]\n'
    )
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["-c", str(config_file), "ls", "docs", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["restorable"] is not None and listing["snapshots"]  # the checkpoints
    mid = points[2][0]
    argv = ["-c", str(config_file), "restore", "docs", "--at", f"@{mid}", "--to", str(tmp_path / "cli")]
    assert await asyncio.to_thread(main, argv) == 0
    assert "change-log segments" in capsys.readouterr().out
    assert content(tmp_path / "cli") == points[2][1]
