"""Retention: `plan()` over synthetic histories (properties, hand-computed examples); `forget` end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from pathlib import Path

import hypothesis.strategies as st
import pytest
from helpers import init_app, local_sites, make_config, tree_state
from hypothesis import given

from drsvc.cli.main import EXIT_USAGE, main
from drsvc.core.config import load_config
from drsvc.core.errors import ConfigError, RestoreError, TransientStoreError
from drsvc.core.format import SnapshotRecord
from drsvc.core.retention import Policy, RetentionPlan, duration_text, plan
from drsvc.core.stores.faults import Fault, FaultyStore

CST = dt.timezone(dt.timedelta(hours=8))  # the examples' time zone (buckets are computed in it)
NS = 1_000_000_000


def rec(time_ns: int, i: int, partial: bool = False) -> SnapshotRecord:
    return SnapshotRecord(
        id=f"{i:048x}", tenant="fin", source="docs", time_ns=time_ns, tree=bytes(32), partial=partial
    )


def at(text: str) -> int:
    """A local time in CST ('2026-11-24 10:00') as UTC nanoseconds."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=CST).timestamp()) * NS


def history(*times: str, partial: tuple[str, ...] = ()) -> list[SnapshotRecord]:
    return [rec(at(t), i, t in partial) for i, t in enumerate(times)]


def kept_times(p: RetentionPlan) -> list[str]:
    return [dt.datetime.fromtimestamp(r.time_ns // NS, CST).strftime("%Y-%m-%d %H:%M") for r, _ in p.keep]


def reasons(p: RetentionPlan) -> dict[str, tuple[str, ...]]:
    return {
        dt.datetime.fromtimestamp(r.time_ns // NS, CST).strftime("%Y-%m-%d %H:%M"): why for r, why in p.keep
    }


NOW = at("2027-06-01 00:00")


def run(records: list[SnapshotRecord], now: int = NOW, **policy: int | float) -> RetentionPlan:
    return plan(records, Policy(**policy), now, tz=CST)  # type: ignore[arg-type]


# ---- properties ---------------------------------------------------------------------------------------

records_st = st.lists(st.tuples(st.integers(0, 3 * 365 * 86400), st.booleans()), min_size=0, max_size=40).map(
    lambda xs: [rec(at("2024-01-01 00:00") + t * NS, i, p) for i, (t, p) in enumerate(xs)]
)
small = st.integers(0, 5)
policy_st = st.builds(
    Policy,
    keep_last=small,
    keep_hourly=small,
    keep_daily=small,
    keep_weekly=small,
    keep_monthly=small,
    keep_yearly=small,
    keep_within=st.none() | st.floats(1, 400 * 86400),
    keep_min=small,
)


def order(r: SnapshotRecord) -> tuple[int, str]:
    return (r.time_ns, r.id)


@given(records_st, policy_st, st.integers(0, 3 * 365 * 86400))
def test_plan_partitions_the_records(records: list[SnapshotRecord], policy: Policy, now_s: int) -> None:
    p = plan(records, policy, at("2024-01-01 00:00") + now_s * NS, tz=CST)
    kept = [r for r, _ in p.keep]
    assert sorted(r.id for r in kept + p.forget) == sorted(r.id for r in records)  # union, each once
    assert not {r.id for r in kept} & {r.id for r in p.forget}  # disjoint
    assert kept == sorted(kept, key=order) and p.forget == sorted(p.forget, key=order)
    assert all(why for _, why in p.keep)
    if records:
        assert max(records, key=order) in kept  # the newest is always kept
    assert len(kept) >= min(policy.keep_min, len(records))
    # partial snapshots are never kept by a bucket rule
    buckets = ("hourly ", "daily ", "weekly ", "monthly ", "yearly ")
    assert not any(r.partial and any(w.startswith(buckets) for w in why) for r, why in p.keep)


@given(records_st, policy_st, st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(
    records: list[SnapshotRecord], policy: Policy, rnd: random.Random
) -> None:
    shuffled = list(records)
    rnd.shuffle(shuffled)
    assert plan(records, policy, NOW, tz=CST) == plan(shuffled, policy, NOW, tz=CST)


@given(records_st, st.integers(1, 45))
def test_keep_last_alone_keeps_exactly_the_newest_n(records: list[SnapshotRecord], n: int) -> None:
    p = plan(records, Policy(keep_last=n), NOW, tz=CST)
    assert [r for r, _ in p.keep] == sorted(records, key=order)[-n:]
    assert all(why == (f"last {n}",) for _, why in p.keep)


@given(records_st, st.integers(1, 45))
def test_keep_min_keeps_the_newest_when_the_rules_keep_fewer(records: list[SnapshotRecord], m: int) -> None:
    p = plan(records, Policy(keep_within=1.0, keep_min=m), at("2030-01-01 00:00"), tz=CST)
    assert [r for r, _ in p.keep] == sorted(records, key=order)[-m:]


# ---- examples -----------------------------------------------------------------------------------------


def test_empty_history_and_empty_policy() -> None:
    assert run([], keep_last=3) == RetentionPlan()
    p = run(history("2026-11-24 10:00", "2026-11-25 10:00"))
    assert not p.forget and all(why == ("policy is empty",) for _, why in p.keep)


def test_hourly_keeps_the_newest_of_each_of_the_n_latest_hours_with_snapshots() -> None:
    h = history(
        "2026-11-24 10:05", "2026-11-24 10:55", "2026-11-24 11:10", "2026-11-24 13:00", "2026-11-24 13:30"
    )
    p = run(h, keep_hourly=3)  # 12:00 has no snapshot: it does not count
    assert kept_times(p) == ["2026-11-24 10:55", "2026-11-24 11:10", "2026-11-24 13:30"]
    assert reasons(p)["2026-11-24 11:10"] == ("hourly 2026-11-24 11:00",)
    assert [r.time_ns for r in p.forget] == [at("2026-11-24 10:05"), at("2026-11-24 13:00")]


def test_daily_skips_days_without_snapshots() -> None:
    h = history(
        "2026-11-20 09:00", "2026-11-22 01:00", "2026-11-22 23:59", "2026-11-25 00:00", "2026-11-19 12:00"
    )
    p = run(h, keep_daily=3)
    assert kept_times(p) == ["2026-11-20 09:00", "2026-11-22 23:59", "2026-11-25 00:00"]
    assert reasons(p)["2026-11-22 23:59"] == ("daily 2026-11-22",)


def test_weekly_and_monthly_across_a_week_and_a_month_boundary() -> None:
    # Sun 29 Nov is ISO week 48, Mon 30 Nov opens week 49; Tue 1 Dec opens a month
    h = history(
        "2026-11-28 10:00", "2026-11-29 10:00", "2026-11-29 20:00", "2026-11-30 09:00", "2026-12-01 09:00"
    )
    weekly = run(h, keep_weekly=2)
    assert kept_times(weekly) == ["2026-11-29 20:00", "2026-12-01 09:00"]
    assert reasons(weekly) == {
        "2026-11-29 20:00": ("weekly 2026-W48",),
        "2026-12-01 09:00": ("weekly 2026-W49",),
    }
    monthly = run(h, keep_monthly=2)
    assert kept_times(monthly) == ["2026-11-30 09:00", "2026-12-01 09:00"]
    assert reasons(monthly)["2026-11-30 09:00"] == ("monthly 2026-11",)
    assert kept_times(run(h, keep_monthly=5)) == ["2026-11-30 09:00", "2026-12-01 09:00"]  # only 2 exist


def test_iso_week_spans_the_new_year_but_the_year_does_not() -> None:
    # Thu 31 Dec 2026 and Fri 1 Jan 2027 are both in ISO week 2026-W53; Mon 4 Jan 2027 is 2027-W01
    h = history("2026-12-28 08:00", "2026-12-31 08:00", "2027-01-01 08:00", "2027-01-04 08:00")
    assert reasons(run(h, keep_weekly=2)) == {
        "2027-01-01 08:00": ("weekly 2026-W53",),
        "2027-01-04 08:00": ("weekly 2027-W01",),
    }
    assert kept_times(run(h, keep_yearly=2)) == ["2026-12-31 08:00", "2027-01-04 08:00"]


def test_yearly() -> None:
    h = history("2024-06-01 00:00", "2025-03-01 00:00", "2025-12-31 23:00", "2026-01-01 00:30")
    p = run(h, keep_yearly=2)
    assert reasons(p) == {"2025-12-31 23:00": ("yearly 2025",), "2026-01-01 00:30": ("yearly 2026",)}
    assert kept_times(run(h, keep_yearly=10)) == ["2024-06-01 00:00", "2025-12-31 23:00", "2026-01-01 00:30"]


def test_buckets_are_in_the_given_time_zone() -> None:
    h = history("2026-11-25 04:00", "2026-11-25 09:00")  # 04:00 CST is 24 Nov 20:00 UTC
    assert len(run(h, keep_daily=5).keep) == 1
    assert len(plan(h, Policy(keep_daily=5), NOW, tz=dt.UTC).keep) == 2


def test_partial_snapshots_do_not_count_toward_buckets() -> None:
    h = history(
        "2026-11-23 12:00",
        "2026-11-24 12:00",  # partial: day 24 has no complete snapshot
        "2026-11-25 08:00",
        "2026-11-25 20:00",  # partial, and the newest
        partial=("2026-11-24 12:00", "2026-11-25 20:00"),
    )
    p = run(h, keep_daily=2)
    assert reasons(p) == {
        "2026-11-23 12:00": ("daily 2026-11-23",),
        "2026-11-25 08:00": ("daily 2026-11-25",),
        "2026-11-25 20:00": ("newest",),
    }
    assert [r.time_ns for r in p.forget] == [at("2026-11-24 12:00")]
    # keep_last and keep_within keep partial snapshots like any other
    assert reasons(run(h, keep_last=2))["2026-11-25 20:00"] == ("last 2",)
    assert "2026-11-24 12:00" in reasons(run(h, now=at("2026-11-26 00:00"), keep_within=3 * 86400.0))


def test_within_is_measured_from_now_and_inclusive() -> None:
    now = at("2026-11-25 12:00")
    h = history("2026-11-23 11:59", "2026-11-23 12:00", "2026-11-24 12:00")
    p = run(h, now=now, keep_within=2 * 86400.0)
    assert reasons(p) == {"2026-11-23 12:00": ("within 2d",), "2026-11-24 12:00": ("within 2d",)}
    # nothing within: the newest is still kept
    assert reasons(run(h, now=at("2027-01-01 00:00"), keep_within=86400.0)) == {
        "2026-11-24 12:00": ("newest",)
    }


def test_keep_min_tops_up_with_the_newest_and_reasons_combine() -> None:
    h = history(
        "2026-11-20 10:00", "2026-11-21 10:00", "2026-11-22 10:00", "2026-11-24 09:00", "2026-11-24 10:00"
    )
    p = run(h, now=at("2026-11-24 12:00"), keep_last=1, keep_daily=2, keep_within=3600 * 2.5, keep_min=4)
    assert reasons(p) == {
        "2026-11-21 10:00": ("min 4",),
        "2026-11-22 10:00": ("daily 2026-11-22",),
        "2026-11-24 09:00": ("min 4",),
        "2026-11-24 10:00": ("last 1", "daily 2026-11-24", "within 150m"),
    }
    assert [r.time_ns for r in p.forget] == [at("2026-11-20 10:00")]


def test_ties_in_time_are_broken_by_id() -> None:
    h = [rec(at("2026-11-24 10:00"), i) for i in (3, 1, 2)]
    p = run(h, keep_last=1)
    assert [r.id for r, _ in p.keep] == [f"{3:048x}"]
    assert [r.id for r in p.forget] == [f"{1:048x}", f"{2:048x}"]


def test_duration_text() -> None:
    assert [duration_text(s) for s in (7 * 86400, 36 * 3600, 90 * 60, 45, 1.5)] == [
        "7d",
        "36h",
        "90m",
        "45s",
        "1.5s",
    ]


def test_policy_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="keep_daily"):
        Policy(keep_daily=-1)


def test_config_converts_and_validates_retention(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        tmp_path,
        local_sites(tmp_path, ["a"]),
        source={"retention": {"keep_daily": 7, "keep_within": "36h"}},
    )
    retention = cfg.source("docs").retention
    assert retention is not None
    assert retention.policy() == Policy(keep_daily=7, keep_within=36 * 3600.0)
    with pytest.raises(ConfigError) as exc:
        make_config(tmp_path, tmp_path, local_sites(tmp_path, ["a"]), source={"retention": {}})
    assert exc.value.fields["key"] == "sources.docs.retention"
    with pytest.raises(ConfigError) as exc:
        make_config(tmp_path, tmp_path, local_sites(tmp_path, ["a"]), source={"retention": {"keep_last": -1}})
    assert exc.value.fields["key"] == "sources.docs.retention.keep_last"


# ---- forget, end to end -------------------------------------------------------------------------------


def snapshot_keys(sites: Path, site: str) -> set[str]:
    return {p.name for p in (sites / site / "fin" / "snapshots").rglob("*") if p.is_file()}


async def test_forget_deletes_forgotten_records_at_every_site_and_kept_ones_restore(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, ["a", "b"]), source={"retention": {"keep_last": 2}}
    )
    app = await init_app(cfg)
    try:
        states = {}
        for i in range(4):
            (src / f"f{i}.txt").write_text(f"version {i}\n" * (100 + i))
            (src / "common.txt").write_text("x" * (1000 + i))
            o = await app.snapshot("docs")
            states[o.result.record.id] = (o.result.record.time_ns, tree_state(src))
        ids = sorted(states, key=lambda k: states[k][0])
        before = {s: snapshot_keys(tmp_path / "sites", s) for s in ("a", "b")}
        assert before["a"] == before["b"] == set(ids)

        dry = await app.forget("docs", dry_run=True)
        assert dry.complete and dry.dry_run and not dry.deleted
        assert [r.id for r in dry.plan.forget] == ids[:2]
        assert [(r.id, why) for r, why in dry.plan.keep] == [(i, ("last 2",)) for i in ids[2:]]
        assert dry.holders == {i: {"a", "b"} for i in ids}
        assert {s: snapshot_keys(tmp_path / "sites", s) for s in ("a", "b")} == before

        done = await app.forget("docs")
        assert done.complete and done.deleted == {i: {"a", "b"} for i in ids[:2]}
        for s in ("a", "b"):
            assert snapshot_keys(tmp_path / "sites", s) == set(ids[2:])
            records, _ = await app.snapshots("docs", s)
            assert [r.id for r in records] == ids[2:]
        for kept in ids[2:]:
            time_ns, state = states[kept]
            for site in ("a", "b"):
                target = tmp_path / f"restore-{kept[:8]}-{site}"
                r = await app.restore("docs", target, time_ns, site)
                assert r.snapshot.id == kept and tree_state(target) == state
        with pytest.raises(RestoreError):  # nothing before the oldest kept snapshot any more
            await app.restore("docs", tmp_path / "too-old", states[ids[1]][0])

        again = await app.forget("docs")  # idempotent
        assert again.complete and not again.plan.forget and not again.deleted
    finally:
        await app.close()


async def test_forget_reports_an_unreachable_site_and_catches_up_later(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_config(
        tmp_path, src, local_sites(tmp_path, ["a", "b"]), source={"retention": {"keep_last": 1}}
    )
    app = await init_app(cfg)
    try:
        ids = []
        for i in range(3):
            (src / "f.txt").write_text(f"version {i}\n" * (10 + i))
            ids.append((await app.snapshot("docs")).result.record.id)
        healthy = app.store("b")
        app._stores["b"] = FaultyStore(healthy, [Fault("list", error=TransientStoreError("down", site="b"))])
        o = await app.forget("docs")
        assert not o.complete and set(o.unreachable) == {"b"}
        assert o.deleted == {ids[0]: {"a"}, ids[1]: {"a"}}
        assert snapshot_keys(tmp_path / "sites", "a") == {ids[2]}
        assert snapshot_keys(tmp_path / "sites", "b") == set(ids)

        app._stores["b"] = FaultyStore(
            healthy, [Fault("delete", error=TransientStoreError("down", site="b"))]
        )
        o = await app.forget("docs")  # listed, but the deletions fail: reported too
        assert not o.complete and set(o.unreachable) == {"b"} and not o.deleted

        app._stores["b"] = healthy  # back: the deletion reaches it on the next run
        o = await app.forget("docs")
        assert o.complete and o.deleted == {ids[0]: {"b"}, ids[1]: {"b"}}
        assert snapshot_keys(tmp_path / "sites", "b") == {ids[2]}
    finally:
        await app.close()


async def test_forget_without_a_policy_names_the_key(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        with pytest.raises(ConfigError) as exc:
            await app.forget("docs", dry_run=True)
        assert exc.value.fields["key"] == "sources.docs.retention"
    finally:
        await app.close()


async def _init(cfg: Path) -> None:
    app = await init_app(load_config(cfg))
    await app.close()


def test_forget_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = tmp_path / "drsvc.toml"
    text = (
        f'[state]\ndir = "{tmp_path}/state"\n[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a"]\n'
    )
    cfg.write_text(text)
    asyncio.run(_init(cfg))
    for i in range(3):
        (src / "f.txt").write_text(f"version {i}\n" * (10 + i))
        assert main(["-c", str(cfg), "snapshot", "docs"]) == 0
    capsys.readouterr()
    assert main(["-c", str(cfg), "forget", "docs"]) == EXIT_USAGE
    assert "sources.docs.retention" in capsys.readouterr().err

    cfg.write_text(text + "[sources.docs.retention]\nkeep_last = 2\n")
    assert main(["-c", str(cfg), "forget", "docs", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and dry["complete"] and len(dry["keep"]) == 2 and len(dry["forget"]) == 1
    assert dry["keep"][1]["reasons"] == ["last 2"] and dry["forget"][0]["deleted_at"] == []
    assert main(["-c", str(cfg), "forget", "docs"]) == 0
    text_out = capsys.readouterr().out
    assert "keep 2, forgot 1" in text_out and "until `drsvc prune`" in text_out
    forgotten = dry["forget"][0]["id"]
    assert f"forget  {forgotten[:16]}" in text_out
    assert not any(forgotten in p.name for p in (tmp_path / "sites").rglob("*"))
