"""The daemon's supervisor, driven step by step (run_once), and `drsvc run` as systemd runs it."""

from __future__ import annotations

import json
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

from helpers import du, init_app, local_sites, make_config, tree_state
from prometheus_client.parser import text_string_to_metric_families
from test_drill_report import sample_report

from drsvc.check import check_site
from drsvc.core.config import PruneConfig, ScrubConfig
from drsvc.core.errors import TransientStoreError
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.drill.report import write_report
from drsvc.metrics import Metrics
from drsvc.supervisor import Supervisor


def _corpus(src: Path) -> None:
    rng = random.Random(11)
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_bytes(rng.randbytes(rng.randint(10, 200_000)))


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_run_once_snapshots_when_due_and_reports_protection_and_rpo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    app = await init_app(
        make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=2, source={"interval": 600})
    )
    clock, metrics = Clock(), Metrics()
    sup = Supervisor(app, metrics, clock=clock)
    try:
        await sup.run_once()
        st = sup.sources["docs"]
        first = st.last_snapshot
        assert first > 0 and st.protected_until == first
        clock.now = first + 42
        await sup.run_once()  # not due again before 600 s: no new snapshot, RPO grows
        assert sup.sources["docs"].last_snapshot == first
        s = _samples(metrics)
        assert s[("drsvc_source_rpo_seconds", (("source", "docs"), ("tenant", "fin")))] == 42
        assert s[("drsvc_site_backlog_objects", (("site", "a"),))] == 0
        assert sup.status_line(clock.now) == "1 sources, 2/2 sites up, worst RPO 42s"
        clock.now += 600
        (src / "new.txt").write_text("new\n")
        await sup.run_once()
        assert sup.sources["docs"].last_error is None, sup.sources["docs"].last_error
        assert st.last_snapshot > first and st.protected_until == st.last_snapshot
    finally:
        await app.close()
    # protected_until and the schedule survive a restart (outbox meta)
    again = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=2))
    try:
        sup2 = Supervisor(again, Metrics())
        assert sup2.sources["docs"].protected_until == sup.sources["docs"].protected_until
        await again.restore("docs", tmp_path / "out", None, site="b")
    finally:
        await again.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_a_site_down_keeps_protection_and_its_backlog_drains_when_it_returns(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b", "c"]), min_copies=2))
    healthy = app.store("c")
    app._stores["c"] = FaultyStore(healthy, [Fault("put", error=TransientStoreError("down", site="c"))])
    metrics = Metrics()
    sup = Supervisor(app, metrics)
    try:
        await sup.run_once()
        assert sup.sources["docs"].protected_until > 0  # a and b: min_copies met
        backlog = _samples(metrics)[("drsvc_site_backlog_objects", (("site", "c"),))]
        assert backlog > 0
        app._stores["c"] = healthy
        sup.sites["c"].shipper.store = healthy
        await sup.run_once()
        assert _samples(metrics)[("drsvc_site_backlog_objects", (("site", "c"),))] == 0
    finally:
        await app.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_drsvc_run_speaks_systemd_serves_health_and_drains_on_sigterm(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    port = _free_port()
    cfg = tmp_path / "drsvc.toml"
    text = (
        f'[state]\ndir = "{tmp_path}/state"\n'
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntick = 0.2\ndrain_timeout = 5\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
        f'[sites.b]\ntype = "local"\npath = "{tmp_path}/sites/b"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a", "b"]\nmin_copies = 2\n'
        'interval = "1h"\n'
    )
    cfg.write_text(text)
    cli = [sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg)]
    subprocess.run([*cli, "init", "fin", "--scrypt-n", "1024"], check=True, capture_output=True)
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([*cli, "run"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        messages: list[str] = []

        def until(pred: str) -> None:
            while not any(pred in m for m in messages):
                messages.append(notify.recv(4096).decode())

        until("READY=1")
        until("STATUS=1 sources, 2/2 sites up")
        until("WATCHDOG=1")
        deadline = time.monotonic() + 20
        while "worst RPO never" in [m for m in messages if m.startswith("STATUS=")][-1]:
            assert time.monotonic() < deadline, messages[-5:]
            messages.append(notify.recv(4096).decode())
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        code, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert code == 200, body
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'drsvc_source_rpo_seconds{source="docs",tenant="fin"}' in metrics

        cfg.write_text(text.replace("min_copies = 2", "min_copies = 7"))  # invalid: only 2 sites
        proc.send_signal(signal.SIGHUP)
        until("STATUS=reload refused")
        assert proc.poll() is None and _get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - began < 5 + 3  # drain_timeout plus shutdown
        until("STOPPING=1")
        lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        refused = [entry for entry in lines if entry["msg"].startswith("reload refused")]
        assert refused and "min_copies = 7" in refused[0]["error"]
        assert any(entry["msg"] == "stopped" for entry in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


async def test_spool_quota_pauses_intake_keeps_everything_and_resumes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)  # ~2 MB of incompressible files
    config = make_config(tmp_path, src, local_sites(tmp_path, ["a"]), source={"interval": 60})
    config = config.model_copy(update={"state": config.state.model_copy(update={"spool_quota": 500_000})})
    app = await init_app(config)
    healthy = app.store("a")
    app._stores["a"] = FaultyStore(healthy, [Fault("put", error=TransientStoreError("down", site="a"))])
    clock, metrics = Clock(), Metrics()
    sup = Supervisor(app, metrics, clock=clock)
    sup.sites["a"].shipper.store = app._stores["a"]
    try:
        await sup.run_once()  # the first snapshot is taken; the site is down, so it stays in the spool
        first = sup.sources["docs"].last_snapshot
        spooled = app.spool.used_bytes()
        assert spooled > 500_000
        clock.now += 3600
        (src / "more.txt").write_text("more\n")
        await sup.run_once()  # due, but the spool is over quota: no snapshot, the alert is set
        assert sup.paused and sup.sources["docs"].last_snapshot == first
        assert _samples(metrics)[("drsvc_spool_full", ())] == 1
        assert app.spool.used_bytes() == spooled  # nothing dropped
        app._stores["a"] = healthy
        sup.sites["a"].shipper.store = healthy
        await sup.run_once()  # the site takes the backlog; space frees ...
        assert app.spool.used_bytes() == 0 and _samples(metrics)[("drsvc_spool_full", ())] == 0
        await sup.run_once()  # ... and intake resumes
        assert not sup.paused and sup.sources["docs"].last_snapshot > first
        await sup.run_once()
        await app.restore("docs", tmp_path / "out", None)
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_two_daemons_write_one_tenant_repository_without_conflict(tmp_path: Path) -> None:
    """One daemon per cloud, the same tenant and sites, snapshotting at the same time: both restore,
    every site checks clean."""
    import asyncio

    from drsvc.check import check_site
    from drsvc.core.config import parse_config

    sites = local_sites(tmp_path, ["a", "b"])
    srcs = {}
    configs = []
    for host in ("province", "city"):
        src = tmp_path / f"src-{host}"
        _corpus(src)
        (src / "shared.bin").write_bytes(random.Random(99).randbytes(300_000))  # same content on both
        srcs[host] = src
        configs.append(
            parse_config(
                {
                    "state": {"dir": str(tmp_path / f"state-{host}")},
                    "tenants": {"fin": {"key": {"passphrase": {"value": "pw"}}}},
                    "sites": sites,
                    "sources": {
                        f"docs-{host}": {
                            "tenant": "fin",
                            "type": "tree",
                            "path": str(src),
                            "sites": ["a", "b"],
                            "min_copies": 2,
                            "interval": 1,
                        }
                    },
                }
            )
        )
    apps = [await init_app(c) for c in configs]  # the second init finds the repository and keeps it
    sups = [Supervisor(app, Metrics()) for app in apps]
    try:
        for round_no in range(3):
            for host, src in srcs.items():
                (src / f"round{round_no}.txt").write_text(f"{host} {round_no}\n")
            await asyncio.gather(*(s.run_once() for s in sups))
            for s in sups:
                s.clock = lambda: time.time() + 3600 * (round_no + 1)  # noqa: B023 - due again next round
        repo = await apps[0].open_repo("fin")
        reports = [await check_site(repo, apps[0].store(n), read_data=True) for n in ("a", "b")]
        assert all(r.ok for r in reports), [r.problems for r in reports]
        assert all(r.snapshots == 6 for r in reports)
        for app, (host, src) in zip(apps, srcs.items(), strict=True):
            await app.restore(f"docs-{host}", tmp_path / f"out-{host}", None)
            assert tree_state(tmp_path / f"out-{host}") == tree_state(src)
    finally:
        for app in apps:
            await app.close()


async def test_a_seaweedfs_site_stopped_under_load_then_restarted(
    tmp_path: Path, seaweed_factory: Any
) -> None:
    """Snapshots stay protected with min_copies=2 while one of three real sites is down and its backlog
    grows; after a restart the backlog drains to zero and the site holds every object the others hold."""
    servers = seaweed_factory.many(3)
    sites = {
        f"s{i}": {
            "type": "s3",
            "endpoint": s.endpoint,
            "bucket": "drsvc",
            "secure": False,
            "timeout": 3,
            "create_bucket": True,
            "access_key": {"value": s.access_key},
            "secret_key": {"value": s.secret_key},
        }
        for i, s in enumerate(servers)
    }
    src = tmp_path / "src"
    _corpus(src)
    app = await init_app(make_config(tmp_path, src, sites, min_copies=2, source={"interval": 60}))
    clock, metrics = Clock(), Metrics()
    sup = Supervisor(app, metrics, clock=clock)
    try:
        await sup.run_once()
        servers[2].stop()
        backlog = []
        for round_no in range(3):
            (src / f"load{round_no}.bin").write_bytes(random.Random(round_no).randbytes(400_000))
            clock.now += 61
            await sup.run_once()
            assert sup.sources["docs"].protected_until == sup.sources["docs"].last_snapshot  # still protected
            backlog.append(_samples(metrics)[("drsvc_site_backlog_objects", (("site", "s2"),))])
        assert backlog[0] > 0 and backlog == sorted(backlog) and backlog[-1] > backlog[0]  # it grows
        assert not sup.sites["s2"].up
        servers[2].start()
        await sup.run_once()
        assert _samples(metrics)[("drsvc_site_backlog_objects", (("site", "s2"),))] == 0
        assert sup.sites["s2"].up
        keys = []
        for name in ("s0", "s2"):
            keys.append(sorted([i.key async for i in app.store(name).list("fin/")]))
        assert keys[0] == keys[1]
        await app.restore("docs", tmp_path / "out", None, site="s2")
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_a_stalled_supervisor_stops_the_watchdog_pings(tmp_path: Path) -> None:
    """WATCHDOG=1 is sent only while the supervisor's loop makes progress: a tick that hangs stops them."""
    import asyncio

    from drsvc.notify import Notifier, WatchdogPinger

    stalled = asyncio.Event()

    class StallingSupervisor(Supervisor):
        ticks = 0

        async def tick(self) -> None:
            self.ticks += 1
            if self.ticks > 3:
                stalled.set()
                await asyncio.Event().wait()  # stuck for good, as a deadlocked loop would be
            await super().tick()

    src = tmp_path / "src"
    _corpus(src)
    config = make_config(tmp_path, src, local_sites(tmp_path, ["a"]))
    config = config.model_copy(update={"daemon": config.daemon.model_copy(update={"tick": 0.05})})
    app = await init_app(config)
    sock_path = tmp_path / "n.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"})
    pinger = WatchdogPinger.for_notifier(notifier)
    assert pinger is not None
    sup = StallingSupervisor(app, Metrics(), on_progress=pinger.progress)
    try:
        await sup.start()
        pinger.start()
        await asyncio.sleep(0.15)
        assert pinger.pings > 0  # healthy: pinging
        await asyncio.wait_for(stalled.wait(), 30)
        await asyncio.sleep(0.3)  # > stall_after (2 x 0.05 s)
        before = pinger.pings
        await asyncio.sleep(0.3)
        assert pinger.pings == before  # stuck supervisor: no more pings, systemd will restart it
    finally:
        await pinger.stop()
        sup._stop.set()
        for t in sup._tasks + sup._site_tasks:
            t.cancel()
        await asyncio.gather(*sup._tasks, *sup._site_tasks, return_exceptions=True)
        await app.close()
        receiver.close()


def test_sighup_adds_and_removes_sources_and_sites_without_a_restart(tmp_path: Path) -> None:
    """... and /metrics shows the newest drill report `drsvc drill` wrote, in the [drill] dir of the config
    in force: the default at start, the new one after the reload."""
    src1, src2 = tmp_path / "src1", tmp_path / "src2"
    _corpus(src1)
    src2.mkdir()
    (src2 / "other.txt").write_text("second source\n")
    port = _free_port()
    head = (
        f'[state]\ndir = "{tmp_path}/state"\n[daemon]\nlisten = "127.0.0.1:{port}"\ntick = 0.2\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
        f'[sites.b]\ntype = "local"\npath = "{tmp_path}/sites/b"\n'
    )
    v1 = head + f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src1}"\nsites = ["a", "b"]\n'
    v2 = (
        head
        + f'[sites.c]\ntype = "local"\npath = "{tmp_path}/sites/c"\n'
        + f'[sources.docs2]\ntenant = "fin"\ntype = "tree"\npath = "{src2}"\nsites = ["a", "c"]\n'
        + f'[drill]\ndir = "{tmp_path}/drills2"\n'
    )
    passed = sample_report(verdict="pass", misses=[])
    write_report(tmp_path / "state" / "drills", passed)  # before the daemon starts
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(v1)
    cli = [sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg)]
    subprocess.run([*cli, "init", "fin", "--scrypt-n", "1024"], check=True, capture_output=True)

    def series() -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                return _get(f"http://127.0.0.1:{port}/metrics")[1]
            except OSError:
                time.sleep(0.1)
        raise AssertionError("no /metrics")

    def wait_for(text: str, present: bool = True) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = series()
            if (text in body) == present:
                return body
            time.sleep(0.2)
        raise AssertionError(f"{text!r} {'never appeared' if present else 'never went'}")

    proc = subprocess.Popen([*cli, "run"], stderr=subprocess.DEVNULL)
    try:
        body = wait_for('drsvc_source_rpo_seconds{source="docs",tenant="fin"}')
        assert "drsvc_drill_last_success 1.0" in body
        assert f"drsvc_drill_level {passed['level']['gbt20988']}.0" in body
        assert 'drsvc_drill_rto_seconds{point="latest",site="jinan-dr",source="hr-docs"}' in body
        write_report(tmp_path / "drills2", sample_report(id="f" * 32))  # a failed drill, in v2's dir
        cfg.write_text(v2)
        subprocess.run([*cli, "init", "fin", "--scrypt-n", "1024"], check=True, capture_output=True)  # site c
        proc.send_signal(signal.SIGHUP)
        body = wait_for('drsvc_source_rpo_seconds{source="docs2",tenant="fin"}')
        body = wait_for('source="docs"', present=False)
        assert 'drsvc_site_up{site="c"} 1.0' in body and 'site="b"' not in body
        assert "drsvc_drill_last_success 0.0" in wait_for("drsvc_drill_last_success 0.0")
        assert proc.poll() is None  # the same process all along
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_failed_snapshot_is_retried_after_minutes_not_a_day(tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    _corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"]), source={"at": ["02:00"]}))
    clock = Clock()
    sup = Supervisor(app, Metrics(), clock=clock)
    try:
        shutil.move(src, tmp_path / "unmounted")  # the source is not there at its time
        await sup.run_once()
        st = sup.sources["docs"]
        assert st.last_error and "cannot read the source" in st.last_error and st.last_snapshot == 0
        clock.now += 60
        assert sup.due(clock.now) == []  # not at once ...
        shutil.move(tmp_path / "unmounted", src)
        clock.now += 300
        assert sup.due(clock.now) == ["docs"]  # ... but minutes later, not at 02:00 tomorrow
        await sup.run_once()
        assert st.last_error is None and st.protected_until > 0
    finally:
        await app.close()


async def test_the_daemon_applies_retention_on_its_schedule(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    app = await init_app(
        make_config(
            tmp_path,
            src,
            local_sites(tmp_path, ["a"]),
            source={"interval": 60, "retention": {"keep_last": 2}},
        )
    )
    clock = Clock()
    sup = Supervisor(app, Metrics(), clock=clock)
    records = tmp_path / "sites" / "a" / "fin" / "snapshots"
    try:
        for i in range(5):
            (src / f"round{i}.txt").write_text(f"{i}\n")
            clock.now += 3601  # a snapshot is due, and so is retention
            await sup.run_once()
        kept = [p for p in records.rglob("*") if p.is_file()]
        assert len(kept) == 2  # keep_last 2, applied by the daemon
        await app.restore("docs", tmp_path / "out", None)
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_the_daemon_prunes_and_scrubs_on_their_schedules(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    cfg = make_config(
        tmp_path,
        src,
        local_sites(tmp_path, ["a", "b"]),
        tenant={"pack_size": "256KiB"},
        source={"interval": 60, "retention": {"keep_last": 1}},
    )
    cfg = cfg.model_copy(
        update={
            "prune": PruneConfig(interval=3600, grace=1),
            "scrub": ScrubConfig(interval=3600, read_share=1),
        }
    )
    app = await init_app(cfg)
    clock = Clock()
    metrics = Metrics()
    sup = Supervisor(app, metrics, clock=clock)
    packs = tmp_path / "sites" / "b" / "fin" / "data"
    try:
        for _round in range(3):
            for p in sorted(src.iterdir())[:6]:  # a third of the files change each round
                p.write_bytes(os.urandom(100_000))
            clock.now += 3601
            await sup.run_once()  # a snapshot, then retention
        before = du(packs)
        await sup.maintain(clock.now)  # prune condemns; scrub finds nothing
        time.sleep(1.1)
        clock.now += 3601
        victim = next(p for p in sorted(packs.rglob("*")) if p.is_file())
        victim.unlink()  # damage at b for the scrubber (if prune deletes it too, nothing is lost)
        await sup.maintain(clock.now)  # prune deletes what it condemned; scrub repairs the rest
        assert du(packs) < before  # unused packs deleted, partly used ones repacked
        s = _samples(metrics)
        assert s[("drsvc_prune_deleted_bytes_total", (("tenant", "fin"),))] > 0
        assert s[("drsvc_prune_condemned_packs", (("tenant", "fin"),))] == 0
        assert s[("drsvc_scrub_last_run_timestamp_seconds", (("tenant", "fin"),))] > 0
        assert s[("drsvc_scrub_unrecoverable_objects", (("tenant", "fin"),))] == 0
        assert not any(k[0] == "drsvc_maintenance_failures_total" and v for k, v in s.items())
        repo = await app.open_repo("fin")
        for site in ("a", "b"):
            res = await check_site(repo, app.store(site), read_data=True)
            assert res.ok, res.problems
        await app.restore("docs", tmp_path / "out", None, "b")
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)
