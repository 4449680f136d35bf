"""Drill reports: the GB/T 20988-2007 level, the JSON and HTML files, sealed evidence on the sites, the drill
metrics read from last.json, and the CLI's progress reporter."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST_SCRYPT, PASSPHRASE, init_app, local_sites, make_config, tree_state

from drsvc.app import App
from drsvc.cli.main import main
from drsvc.cli.progress import ProgressReporter
from drsvc.core.config import parse_config
from drsvc.core.errors import IntegrityError, ObjectNotFound
from drsvc.drill.evidence import list_evidence, load_evidence, store_evidence, tenant_report
from drsvc.drill.levels import DAY, HOUR, LEVELS, gbt20988_level, level_for
from drsvc.drill.report import LAST, load_report, render_html, report_dir, write_report
from drsvc.metrics import Metrics

RID = "0123456789abcdef0123456789abcdef"


def scenario(
    source: str = "hr-docs",
    site: str = "jinan-dr",
    point: str = "latest",
    rto: float | None = 60.0,
    rpo: float | None = 30.0,
    tenant: str = "hr",
    **more: Any,
) -> dict[str, Any]:
    ok = rto is not None and rpo is not None
    return {
        "source": source,
        "tenant": tenant,
        "kind": "tree",
        "site": site,
        "point": point,
        "requested": "2026-11-01T02:30:00+00:00",
        "restored_point": "2026-11-01T02:29:30+00:00" if ok else None,
        "rpo_s": rpo,
        "rto_s": rto,
        "rpo_target_s": 3600.0,
        "rto_target_s": 4 * 3600.0,
        "verdict": "pass" if ok else "fail",
        "failures": [] if ok else ["restore failed: site down"],
        "fallbacks": [],
        "bytes": 123456,
        "files": 42,
        "verified": {"repository": ok, "source": True if ok else None, "probes": []},
        **more,
    }


def sample_report(**more: Any) -> dict[str, Any]:
    scenarios = [
        scenario(),
        scenario(site="qingdao-dr", point="earlier", rto=7200.0, rpo=0.0),
        scenario(
            source="<script>alert(1)</script>",
            tenant="urban-planning",
            site="off&site",
            rto=5 * HOUR,
            rpo=2 * HOUR,
            failures=["RTO 5 h > target 4 h"],
            fallbacks=[{"site": "jinan-dr", "key": "x/data/ab/ab12", "error": "corrupt <b>"}],
            verdict="fail",
        ),
        scenario(source="hr-db", kind="postgres", site="qingdao-dr", rto=None, rpo=None),
    ]
    scenarios[3]["verified"]["probes"] = [{"sql": "select 1 < 2", "expect": "t", "got": None, "ok": False}]
    report: dict[str, Any] = {
        "id": RID,
        "plan": "monthly <plan>",
        "started": "2026-11-01T02:30:00+00:00",
        "finished": "2026-11-01T05:00:00+00:00",
        "verdict": "fail",
        "misses": ["<script>alert(1)</script> at off&site (latest): RTO 5 h > target 4 h"],
        "level": gbt20988_level(scenarios),
        "scenarios": scenarios,
    }
    report.update(more)
    return report


# -- levels ----------------------------------------------------------------------------------------------


def test_the_level_table_is_nested_and_each_level_is_tighter() -> None:
    assert [lv.number for lv in LEVELS] == [1, 2, 3, 4, 5, 6]
    for lower, upper in itertools.pairwise(LEVELS):
        assert upper.rto_max_s <= lower.rto_max_s and upper.rpo_max_s <= lower.rpo_max_s
        assert upper.rto_max_s < lower.rto_max_s or upper.rpo_max_s < lower.rpo_max_s
    bounds = [(lv.rto_max_s, lv.rpo_max_s) for lv in LEVELS]
    assert bounds == [
        (math.inf, 7 * DAY),
        (2 * DAY, 7 * DAY),
        (DAY, DAY),
        (12 * HOUR, DAY),
        (12 * HOUR, 30 * 60.0),
        (HOUR, 0.0),
    ]


@pytest.mark.parametrize("lv", LEVELS, ids=lambda lv: f"level{lv.number}")
def test_a_level_holds_up_to_its_bounds_and_not_past_them(lv: Any) -> None:
    rto = lv.rto_max_s if math.isfinite(lv.rto_max_s) else 365 * DAY
    assert level_for(rto, lv.rpo_max_s) == lv.number  # exactly at both bounds
    # a millisecond more RPO, or RTO: some level below, the highest that still admits it
    more_rpo = level_for(rto, lv.rpo_max_s + 0.001)
    assert more_rpo < lv.number
    assert more_rpo == max([x.number for x in LEVELS if x.admits(rto, lv.rpo_max_s + 0.001)], default=0)
    if math.isfinite(lv.rto_max_s):
        assert level_for(rto + 0.001, lv.rpo_max_s) < lv.number


@pytest.mark.parametrize(
    ("rto", "rpo", "level"),
    [
        (30 * 60, 0.0, 6),
        (HOUR, 0.0, 6),
        (HOUR + 1, 0.0, 5),
        (HOUR, 0.5, 5),  # async replication: half a second lost is not "zero data loss"
        (12 * HOUR, 30 * 60, 5),
        (12 * HOUR, 30 * 60 + 1, 4),
        (12 * HOUR + 1, 60, 3),
        (DAY, DAY, 3),
        (DAY + 1, DAY, 2),
        (DAY, DAY + 1, 2),
        (2 * DAY, 7 * DAY, 2),
        (2 * DAY + 1, 7 * DAY, 1),
        (30 * DAY, 7 * DAY, 1),
        (60, 7 * DAY + 1, 0),
    ],
)
def test_levels_at_the_boundaries(rto: float, rpo: float, level: int) -> None:
    assert level_for(rto, rpo) == level
    got = gbt20988_level([scenario(rto=rto, rpo=rpo)])
    assert got["gbt20988"] == level
    assert got["name"] == (LEVELS[level - 1].name if level else "none")
    assert got["reason"]


def test_every_source_meets_the_level_with_its_worst_scenario() -> None:
    scenarios = [
        scenario(source="a", site="s1", rto=60, rpo=10),  # level 5 alone
        scenario(source="a", site="s2", rto=13 * HOUR, rpo=10),  # a's worst RTO: level 3
        scenario(source="b", site="s1", rto=60, rpo=0),  # level 6
    ]
    got = gbt20988_level(scenarios)
    assert got["gbt20988"] == 3
    assert "a: worst RTO 13 h" in got["reason"] and "b:" not in got["reason"]
    assert gbt20988_level(scenarios[2:])["gbt20988"] == 6


def test_a_latest_points_replication_lag_counts_as_data_loss() -> None:
    # restored the newest protected point exactly (rpo 0), but that point was 20 min old when the drill began
    latest = scenario(rto=600, rpo=0.0, lag_s=20 * 60.0)
    assert gbt20988_level([latest])["gbt20988"] == 5
    assert gbt20988_level([{**latest, "lag_s": None}])["gbt20988"] == 6
    # an earlier point's lag is the age of that point, not a loss
    earlier = scenario(point="earlier", rto=600, rpo=10 * 60.0, lag_s=30 * DAY)
    assert gbt20988_level([earlier])["gbt20988"] == 5
    assert "(lag 20 min)" in render_html(sample_report(scenarios=[latest]))


def test_a_scenario_that_did_not_recover_gives_level_zero() -> None:
    assert gbt20988_level([])["gbt20988"] == 0
    failed = gbt20988_level([scenario(), scenario(source="x", rto=None, rpo=None)])
    assert failed["gbt20988"] == 0 and "x at jinan-dr (latest) did not recover" in failed["reason"]
    differs = scenario(verified={"repository": True, "source": False, "probes": []})
    assert "differs from the source" in gbt20988_level([differs])["reason"]
    probe = scenario(verified={"repository": True, "source": None, "probes": [{"ok": False}]})
    assert gbt20988_level([probe])["gbt20988"] == 0


# -- the HTML page ---------------------------------------------------------------------------------------


def test_the_page_is_self_contained_and_escapes_every_string() -> None:
    report = sample_report()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    low = page.lower()
    for external in ("http://", "https://", "<script", "src=", "@import", "url(", "<link"):
        assert external not in low, external
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "off&amp;site" in page and "corrupt &lt;b&gt;" in page and "monthly &lt;plan&gt;" in page
    assert page.count("<svg") == 2  # RTO and RPO
    assert 'class="verdict fail">FAIL<' in page
    for sc in report["scenarios"]:
        assert render_escaped(sc["source"]) in page and render_escaped(sc["site"]) in page
    level = report["level"]["gbt20988"]
    assert f"GB/T 20988-2007 level</td><td><strong>{level}:" in page
    assert "stroke-dasharray" in page  # the targets
    assert "not measured" in page  # the postgres scenario that failed


def render_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_a_passing_report_is_green_and_survives_odd_values() -> None:
    report = sample_report(verdict="pass", misses=[])
    report["scenarios"] = [scenario(rpo=0.0), scenario(site="b", rto=1e-4, rpo=1e7)]
    report["scenarios"][1]["rto_target_s"] = None
    page = render_html(report)
    assert 'class="verdict pass">PASS<' in page and "Missed" not in page
    # odd or hostile field types must not break rendering
    page = render_html({"id": RID, "scenarios": [{"source": 1, "rto_s": "5", "verified": "x"}, "junk"]})
    assert "<svg" in page and 'class="verdict fail"' in page


# -- files -----------------------------------------------------------------------------------------------


def test_write_report_writes_json_html_and_last(tmp_path: Path) -> None:
    out = tmp_path / "drills"
    report = sample_report()
    j, h = write_report(out, report)
    assert j.name == f"20261101T023000Z-{RID}.json" and h.suffix == ".html"
    assert load_report(j) == report and load_report(out / LAST) == report
    assert h.read_text() == render_html(report)
    assert sorted(p.name for p in out.iterdir()) == sorted([j.name, h.name, LAST])  # no temporary left
    assert (j.stat().st_mode & 0o777) == 0o640

    newer = sample_report(id="f" * 32, finished="2026-12-01T05:00:00+00:00", started="2026-12-01T02:30:00Z")
    write_report(out, newer)
    assert load_report(out / LAST)["id"] == "f" * 32
    older = sample_report(id="a" * 32, finished="2026-10-01T05:00:00+00:00")
    write_report(out, older)  # a late write of an older drill keeps the newest as last.json
    assert load_report(out / LAST)["id"] == "f" * 32
    assert len(list(out.glob("*.html"))) == 3

    with pytest.raises(ValueError, match="hex"):
        write_report(out, sample_report(id="../../etc/passwd"))


def test_the_report_dir_defaults_under_the_state_dir(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tmp_path, local_sites(tmp_path, ["a"]))
    assert report_dir(cfg) == tmp_path / "state" / "drills"
    other = cfg.model_copy(update={"drill": cfg.drill.model_copy(update={"dir": tmp_path / "d"})})
    assert report_dir(other) == tmp_path / "d"


# -- evidence --------------------------------------------------------------------------------------------


def two_tenants(tmp: Path) -> App:
    sites = local_sites(tmp, ["a", "b"])
    key = {"key": {"passphrase": {"value": PASSPHRASE}}}
    cfg = parse_config(
        {
            "state": {"dir": str(tmp / "state")},
            "tenants": {"hr": key, "urban-planning": key},
            "sites": sites,
            "sources": {
                "hr-docs": {"tenant": "hr", "type": "tree", "path": str(tmp), "sites": ["a", "b"]},
                "gis": {"tenant": "urban-planning", "type": "tree", "path": str(tmp), "sites": ["b"]},
            },
        }
    )
    return App(cfg, workers=1)


async def test_evidence_is_sealed_per_tenant_at_every_site(tmp_path: Path) -> None:
    app = two_tenants(tmp_path)
    try:
        for t in ("hr", "urban-planning"):
            await app.init_tenant(t, FAST_SCRYPT)
        report = sample_report()
        assert await store_evidence(app, report) == {"a": "ok", "b": "ok"}

        for site in ("a", "b"):
            hr = await load_evidence(app, "hr", site, RID)
            assert hr == json.loads(json.dumps(tenant_report(report, "hr")))
            assert {s["tenant"] for s in hr["scenarios"]} == {"hr"} and len(hr["scenarios"]) == 3
            assert hr["overall"] == {"verdict": "fail", "gbt20988": report["level"]["gbt20988"]}
            assert hr["verdict"] == "fail"  # hr-db did not recover
            assert "<script>" not in json.dumps(hr)  # nothing of the other tenant
            assert await list_evidence(app, "hr", site) == [RID]
        up = await load_evidence(app, "urban-planning", "b", RID)
        assert [s["source"] for s in up["scenarios"]] == ["<script>alert(1)</script>"]
        assert up["misses"] == ["<script>alert(1)</script> at off&site (latest): RTO 5 h > target 4 h"]
        assert "hr-docs" not in json.dumps(up)
        with pytest.raises(ObjectNotFound):  # urban-planning's sources do not use site a
            await load_evidence(app, "urban-planning", "a", RID)
        # the evidence is a page of its own too
        assert "<svg" in render_html(up)

        # ciphertext only at the site
        stored = tmp_path / "sites" / "a" / "hr" / "drills" / RID
        data = bytearray(stored.read_bytes())
        assert b"hr-docs" not in data and b"jinan-dr" not in data
        data[len(data) // 2] ^= 0x01
        stored.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            await load_evidence(app, "hr", "a", RID)
        # a copy moved under another report's name fails too (the name is authenticated)
        other = "9" * 32
        (stored.parent / other).write_bytes((tmp_path / "sites" / "b" / "hr" / "drills" / RID).read_bytes())
        with pytest.raises(IntegrityError):
            await load_evidence(app, "hr", "a", other)
        assert (await load_evidence(app, "hr", "b", RID))["id"] == RID
    finally:
        await app.close()


async def test_a_site_that_is_down_is_reported_not_raised(tmp_path: Path) -> None:
    app = two_tenants(tmp_path)
    try:
        for t in ("hr", "urban-planning"):
            await app.init_tenant(t, FAST_SCRYPT)
        await app.open_repo("urban-planning")  # unlocked while b was up
        b = tmp_path / "sites" / "b"
        os.rename(b, tmp_path / "sites" / "b.unmounted")  # an NFS site that is not mounted
        result = await store_evidence(app, sample_report())
        assert result["a"] == "ok"
        assert result["b"].startswith("tenant hr: ") and "tenant urban-planning: " in result["b"]
        assert "mounted" in result["b"]
        assert (await load_evidence(app, "hr", "a", RID))["tenant"] == "hr"
    finally:
        await app.close()


async def test_a_tenant_whose_repository_cannot_be_opened_is_reported(tmp_path: Path) -> None:
    app = two_tenants(tmp_path)
    try:
        await app.init_tenant("hr", FAST_SCRYPT)  # urban-planning has no repository anywhere
        result = await store_evidence(app, sample_report())
        assert result["a"] == "ok"
        assert "tenant urban-planning: cannot open the repository" in result["b"]
    finally:
        await app.close()


# -- metrics ---------------------------------------------------------------------------------------------


def samples(m: Metrics) -> dict[str, float]:
    body, _ = m.render()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("drsvc_drill_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_drill_metrics_come_from_last_json(tmp_path: Path) -> None:
    out = tmp_path / "drills"
    m = Metrics(version="test", drill_report=out / LAST)
    assert samples(m) == {
        "drsvc_drill_last_timestamp_seconds": 0.0,
        "drsvc_drill_last_success": 0.0,
        "drsvc_drill_level": 0.0,
    }
    report = sample_report()
    write_report(out, report)
    got = samples(m)
    assert got["drsvc_drill_last_timestamp_seconds"] == 1793509200.0  # 2026-11-01T05:00:00Z
    assert got["drsvc_drill_last_success"] == 0.0
    assert got["drsvc_drill_level"] == report["level"]["gbt20988"]
    assert got['drsvc_drill_rto_seconds{point="latest",site="jinan-dr",source="hr-docs"}'] == 60.0
    assert got['drsvc_drill_rpo_seconds{point="earlier",site="qingdao-dr",source="hr-docs"}'] == 0.0
    assert not any("hr-db" in k for k in got)  # not measured: no series

    passing = copy.deepcopy(report)
    passing.update(
        id="e" * 32,
        verdict="pass",
        finished="2026-12-01T00:00:00+00:00",
        scenarios=[scenario(rto=10.0, rpo=1.0)],
    )
    passing["level"] = gbt20988_level(passing["scenarios"])
    write_report(out, passing)
    got = samples(m)
    assert got["drsvc_drill_last_success"] == 1.0 and got["drsvc_drill_level"] == 5.0
    rto = {k: v for k, v in got.items() if k.startswith("drsvc_drill_rto_seconds")}
    assert rto == {'drsvc_drill_rto_seconds{point="latest",site="jinan-dr",source="hr-docs"}': 10.0}

    (out / LAST).unlink()
    assert "drsvc_drill_rto_seconds{" not in m.render()[0].decode()
    assert samples(m)["drsvc_drill_last_success"] == 0.0


def test_drill_metrics_keep_their_values_when_last_json_is_unreadable(tmp_path: Path) -> None:
    last = tmp_path / LAST
    m = Metrics(version="test")
    assert samples(m)["drsvc_drill_level"] == 0.0  # nothing watched
    last.write_text(json.dumps(sample_report(verdict="pass")))
    m.watch_drill_report(last)
    assert samples(m)["drsvc_drill_last_success"] == 1.0
    last.write_text("{ not json")
    assert samples(m)["drsvc_drill_last_success"] == 1.0
    m.watch_drill_report(None)
    assert samples(m)["drsvc_drill_last_success"] == 0.0


# -- progress --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Update:  # shaped like restore.writer.Progress
    def __init__(self, files_total: int, files_done: int, bytes_total: int, bytes_done: int) -> None:
        self.files_total, self.files_done = files_total, files_done
        self.bytes_total, self.bytes_done = bytes_total, bytes_done


def test_plain_lines_at_most_one_per_interval() -> None:
    clock, stream = Clock(), io.StringIO()
    with ProgressReporter("lines", "restore docs", stream=stream, interval=5.0, clock=clock) as p:
        for i in range(1, 101):
            clock.now += 0.5
            p(Update(100, i, 100 * 2**20, i * 2**20))
        # a drill's scenarios: dicts with labels; a quick step prints nothing
        p({"label": "docs at b (latest)", "files_total": 1, "files_done": 1, "bytes_done": 10})
    lines = stream.getvalue().splitlines()
    # 49.5 s after the first update: one line per 5 s, and where it ended
    assert len(lines) == 9 + 1
    assert lines[0] == "restore docs: 11/100 files, 11.0 MiB of 100.0 MiB (11%), 2.2 MiB/s, ETA 0:00:40"
    assert lines[-1].startswith("restore docs: 100/100 files, 100.0 MiB of 100.0 MiB (100%)")
    assert "docs at b" not in stream.getvalue()


def test_off_prints_nothing_and_a_non_terminal_gets_lines() -> None:
    stream = io.StringIO()
    p = ProgressReporter.for_cli(as_json=True, label="x", stream=stream)
    assert p.mode == "off"
    p({"bytes_done": 1})
    p.close()
    assert stream.getvalue() == ""
    assert ProgressReporter.for_cli(as_json=False, stream=stream).mode == "lines"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar() -> None:
    stream = Tty()
    with ProgressReporter.for_cli(as_json=False, label="restore docs", stream=stream) as p:
        assert p.mode == "bar"
        p.step("docs at a (latest)")
        p(Update(3, 1, 3000, 1000))
        p({"label": "docs at b (latest)", "segments_total": 4, "segments_done": 2, "bytes_done": 5})
    text = stream.getvalue()
    assert "docs at a (latest)" in text and "docs at b (latest)" in text and "2/4 segments" in text


async def test_a_restore_reports_progress(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = random.Random(7)
    for i in range(5):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_bytes(rng.randbytes(50_000))
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        await app.snapshot("docs")
        stream = io.StringIO()
        with ProgressReporter("lines", "restore docs", stream=stream, interval=0.0) as p:
            await app.restore("docs", tmp_path / "out", None, progress=p)
        assert tree_state(tmp_path / "out") == tree_state(src)
        last = stream.getvalue().splitlines()[-1]
        assert last.startswith("restore docs: 5/5 files, 244.1 KiB of 244.1 KiB (100%)")
    finally:
        await app.close()


def test_restore_json_prints_only_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 100_000)
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(
        f'[state]\ndir = "{tmp_path}/state"\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a"]\n'
    )
    assert main(["-c", str(cfg), "init", "fin"]) == 0
    assert main(["-c", str(cfg), "snapshot", "docs"]) == 0
    capsys.readouterr()
    assert main(["-c", str(cfg), "restore", "docs", "--to", str(tmp_path / "out"), "--json"]) == 0
    done = capsys.readouterr()
    assert json.loads(done.out)["files"] == 1 and done.err == ""
    assert (tmp_path / "out" / "f").read_bytes() == b"x" * 100_000
