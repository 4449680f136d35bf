"""`drsvc status`: RPO and backlog read from the state database, without the state lock."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from helpers import init_app

from drsvc.cli.main import EXIT_FAILURE, main
from drsvc.core.config import load_config
from drsvc.core.errors import TransientStoreError
from drsvc.core.spool import Spool
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.metrics import Metrics
from drsvc.supervisor import Supervisor


def _config(tmp: Path, rpo_target: str | None = None, sites: tuple[str, ...] = ("a",)) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1) * 100)
    cfg = tmp / "drsvc.toml"
    text = f'[state]\ndir = "{tmp}/state"\n[tenants.fin.key.passphrase]\nvalue = "pw"\n'
    for s in sites:
        text += f'[sites.{s}]\ntype = "local"\npath = "{tmp}/sites/{s}"\n'
    text += (
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = {json.dumps(list(sites))}\n'
    )
    if rpo_target is not None:
        text += f'rpo_target = "{rpo_target}"\n'
    cfg.write_text(text)
    return cfg


def _daemon_pass(cfg: Path, down: str | None = None) -> None:
    """What one pass of the daemon leaves in the state dir; `down` is a site whose puts fail."""

    async def go() -> None:
        app = await init_app(load_config(cfg))
        try:
            if down is not None:
                app._stores[down] = FaultyStore(
                    app.store(down), [Fault("put", error=TransientStoreError("site is down", site=down))]
                )
            await Supervisor(app, Metrics()).run_once()
        finally:
            await app.close()

    asyncio.run(go())


def _status(cfg: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["-c", str(cfg), "status", *extra])
    return code, capsys.readouterr().out


def test_status_reports_protection_rpo_and_an_empty_backlog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, rpo_target="1h")
    before = time.time()
    _daemon_pass(cfg)
    code, text = _status(cfg, capsys, "--json")
    assert code == 0, text
    st = json.loads(text)
    assert st["ok"] is True
    [docs] = st["sources"]
    assert docs["source"] == "docs" and docs["tenant"] == "fin"
    assert before - 1 <= docs["protected_until"] <= time.time()
    assert docs["last_snapshot"] == docs["protected_until"]
    assert 0 <= docs["rpo"] < 60 and docs["rpo_target"] == 3600 and docs["rpo_ok"] is True
    assert st["sites"] == [
        {"site": "a", "backlog_objects": 0, "backlog_bytes": 0, "oldest_age": None, "last_error": None}
    ]
    code, text = _status(cfg, capsys)  # the table
    assert code == 0
    assert "docs" in text and "fin" in text and "1h00m OK" in text and "MISSED" not in text


def test_a_missed_rpo_target_fails_the_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, rpo_target="1ms")  # the snapshot alone takes longer
    _daemon_pass(cfg)
    code, text = _status(cfg, capsys, "--json")
    assert code == EXIT_FAILURE != 0
    st = json.loads(text)
    assert st["ok"] is False and st["sources"][0]["rpo_ok"] is False
    assert st["sources"][0]["rpo"] > 0.001
    code, text = _status(cfg, capsys)
    assert code == EXIT_FAILURE and "MISSED" in text


def test_status_reads_while_another_process_holds_the_state_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    _daemon_pass(cfg)
    daemon = Spool(tmp_path / "state")
    daemon.lock()  # flock: a second lock from this process would fail too (its own open file description)
    try:
        code, text = _status(cfg, capsys, "--json")
        assert code == 0, text
        docs = json.loads(text)["sources"][0]
        assert docs["protected_until"] is not None and docs["rpo_target"] is None and docs["rpo_ok"] is None
        daemon.outbox.set_meta("protected_until:docs", repr(time.time() - 7200))  # the daemon writes on
        code, text = _status(cfg, capsys, "--json")
        assert 7200 <= json.loads(text)["sources"][0]["rpo"] < 7300
    finally:
        daemon.close()


def test_backlog_and_last_error_of_a_site_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, sites=("a", "b"))  # min_copies 1: a alone protects
    _daemon_pass(cfg, down="b")
    code, text = _status(cfg, capsys, "--json")
    assert code == 0, text
    st = json.loads(text)
    assert st["sources"][0]["protected_until"] is not None
    a, b = st["sites"]
    assert a["backlog_objects"] == 0
    assert b["backlog_objects"] > 0 and b["backlog_bytes"] > 0 and b["oldest_age"] >= 0
    assert "site is down" in b["last_error"]
    code, text = _status(cfg, capsys)
    assert "site is down" in text


def test_no_state_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, rpo_target="1m")
    code, text = _status(cfg, capsys)
    assert code == 0 and "no state yet" in text
    code, text = _status(cfg, capsys, "--json")
    assert code == 0 and json.loads(text)["state"] is None
    assert not (tmp_path / "state").exists()  # status created nothing
