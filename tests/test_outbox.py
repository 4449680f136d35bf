"""The outbox and the spool: what each site still lacks, in order, durably."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsvc.core.errors import ObjectNotFound
from drsvc.core.outbox import Outbox, Pending
from drsvc.core.spool import Spool

SITES = ["jinan", "qingdao"]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "state" / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "state")
    yield sp
    sp.close()


def keys_of(pending: list[Pending]) -> list[str]:
    return [p.key for p in pending]


def test_add_and_pending_in_order(outbox: Outbox) -> None:
    seqs = [outbox.add(f"t/data/{i}", "t", 10 + i, SITES) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    for site in SITES:
        assert keys_of(outbox.pending(site, 10)) == [f"t/data/{i}" for i in range(5)]
    assert keys_of(outbox.pending("jinan", 2)) == ["t/data/0", "t/data/1"]
    assert outbox.pending("elsewhere", 10) == []
    first = outbox.pending("jinan", 1)[0]
    assert (first.seq, first.size, first.barrier, first.attempts) == (seqs[0], 10, False, 0)


def test_exclude_skips_objects_in_flight(outbox: Outbox) -> None:
    seqs = [outbox.add(f"t/data/{i}", "t", 1, SITES) for i in range(6)]
    in_flight = seqs[:3]
    assert keys_of(outbox.pending("jinan", 2, exclude=in_flight)) == ["t/data/3", "t/data/4"]
    assert keys_of(outbox.pending("jinan", 10, exclude=in_flight)) == ["t/data/3", "t/data/4", "t/data/5"]
    assert outbox.pending("jinan", 10, exclude=seqs) == []


def test_adding_again_adds_missing_sites_only(outbox: Outbox) -> None:
    seq = outbox.add("t/data/a", "t", 5, ["jinan"])
    assert outbox.ack(seq, "jinan") is True
    assert outbox.add("t/data/a", "t", 999, ["jinan", "qingdao"], barrier=True) == seq
    assert outbox.acked_sites("t/data/a") == (["jinan"], ["qingdao"])
    (p,) = outbox.pending("qingdao", 10)
    assert (p.seq, p.size, p.barrier) == (seq, 5, False)  # the first add's size and flag stand
    assert outbox.pending("jinan", 10) == []


def test_barrier_waits_for_everything_before_it(outbox: Outbox) -> None:
    packs = [outbox.add(f"t/data/{i}", "t", 1, SITES) for i in range(3)]
    barrier = outbox.add("t/snapshots/s", "t", 1, SITES, barrier=True)
    # earlier objects pending: the barrier is not offered, however large the limit
    assert keys_of(outbox.pending("jinan", 100)) == ["t/data/0", "t/data/1", "t/data/2"]
    # all earlier objects in flight (not yet acknowledged): still not offered
    assert outbox.pending("jinan", 100, exclude=packs) == []
    outbox.ack(packs[0], "jinan")
    outbox.ack(packs[1], "jinan")
    assert outbox.pending("jinan", 100, exclude=[packs[2]]) == []
    assert keys_of(outbox.pending("jinan", 100)) == ["t/data/2"]
    outbox.ack(packs[2], "jinan")
    (p,) = outbox.pending("jinan", 100)
    assert (p.seq, p.key, p.barrier) == (barrier, "t/snapshots/s", True)
    # per site: qingdao has acknowledged nothing, so its barrier still waits
    assert "t/snapshots/s" not in keys_of(outbox.pending("qingdao", 100))
    # a barrier in flight is not offered twice
    assert outbox.pending("jinan", 100, exclude=[barrier]) == []


def test_barrier_first_is_offered_alone(outbox: Outbox) -> None:
    barrier = outbox.add("t/index/i", "t", 1, ["jinan"], barrier=True)
    outbox.add("t/data/later", "t", 1, ["jinan"])
    assert [p.seq for p in outbox.pending("jinan", 10)] == [barrier]


def test_ack_is_true_when_every_site_holds_it(outbox: Outbox) -> None:
    seq = outbox.add("t/data/a", "t", 1, SITES)
    assert outbox.ack(seq, "jinan") is False
    assert outbox.acked_sites("t/data/a") == (["jinan"], ["qingdao"])
    assert outbox.ack(seq, "jinan") is False  # acknowledging twice changes nothing
    assert outbox.ack(seq, "qingdao") is True
    assert outbox.acked_sites("t/data/a") == (sorted(SITES), [])
    assert outbox.pending("jinan", 10) == outbox.pending("qingdao", 10) == []
    outbox.forget(seq)
    assert outbox.acked_sites("t/data/a") is None


def test_failures_and_backlog(outbox: Outbox) -> None:
    a = outbox.add("t/data/a", "t", 100, SITES)
    outbox.add("t/data/b", "t", 50, SITES)
    outbox.fail(a, "qingdao", "connection refused " * 100)
    outbox.fail(a, "qingdao", "timed out")
    assert outbox.pending("qingdao", 1)[0].attempts == 2
    assert outbox.pending("jinan", 1)[0].attempts == 0
    assert outbox.site_errors("qingdao") == "timed out"
    assert outbox.site_errors("jinan") is None
    backlog = outbox.backlog("qingdao")
    assert (backlog.site, backlog.objects, backlog.bytes, backlog.last_error) == (
        "qingdao",
        2,
        150,
        "timed out",
    )
    assert backlog.oldest is not None
    outbox.ack(a, "qingdao")
    assert outbox.site_errors("qingdao") is None
    assert (outbox.backlog("qingdao").objects, outbox.backlog("qingdao").bytes) == (1, 50)
    empty = outbox.backlog("nowhere")
    assert (empty.objects, empty.bytes, empty.oldest, empty.last_error) == (0, 0, None, None)
    assert outbox.spooled_bytes() == 150


def test_error_text_is_truncated(outbox: Outbox) -> None:
    seq = outbox.add("t/data/a", "t", 1, ["jinan"])
    outbox.fail(seq, "jinan", "x" * 10_000)
    assert len(outbox.site_errors("jinan") or "") == 500


def test_keys_by_tenant_and_exact_prefix(outbox: Outbox) -> None:
    outbox.add("t/data/x_y/1", "t", 1, ["jinan"])
    outbox.add("t/data/xzy/1", "t", 1, ["jinan", "qingdao"])
    outbox.add("t/data/a%b/1", "t", 1, ["jinan"])
    outbox.add("t/DATA/1", "t", 1, ["jinan"])
    outbox.add("u/data/x_y/1", "u", 1, ["jinan"])
    assert outbox.keys("t", "t/data/x_y/") == [("t/data/x_y/1", ["jinan"])]
    assert outbox.keys("t", "t/data/a%b/") == [("t/data/a%b/1", ["jinan"])]
    assert [k for k, _ in outbox.keys("t", "t/data/")] == ["t/data/x_y/1", "t/data/xzy/1", "t/data/a%b/1"]
    assert sorted(outbox.keys("t", "t/data/xzy/")[0][1]) == SITES
    assert len(outbox.keys("t")) == 4 and outbox.keys("u") == [("u/data/x_y/1", ["jinan"])]


def test_meta(outbox: Outbox) -> None:
    assert outbox.get_meta("position") is None
    outbox.set_meta("position", "1")
    outbox.set_meta("position", "2")
    assert outbox.get_meta("position") == "2"


def test_rows_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    a = box.add("t/data/a", "t", 1, SITES)
    b = box.add("t/snapshots/s", "t", 2, SITES, barrier=True)
    box.ack(a, "jinan")
    box.fail(a, "qingdao", "down")
    box.set_meta("k", "v")
    box.close()

    box = Outbox(path)
    try:
        assert box.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [(p.seq, p.key, p.attempts) for p in box.pending("qingdao", 10)] == [(a, "t/data/a", 1)]
        assert [(p.seq, p.barrier) for p in box.pending("jinan", 10)] == [(b, True)]
        assert box.acked_sites("t/data/a") == (["jinan"], ["qingdao"])
        assert box.get_meta("k") == "v"
        assert box.add("t/data/c", "t", 1, SITES) > b  # sequence numbers keep growing
    finally:
        box.close()


def test_committed_rows_are_visible_to_another_connection(outbox: Outbox, tmp_path: Path) -> None:
    """Every call commits: a reader (another process, after a crash) sees the row at once."""
    outbox.add("t/data/a", "t", 1, SITES)
    other = sqlite3.connect(tmp_path / "state" / "outbox.db")
    try:
        assert other.execute("SELECT key FROM objects").fetchall() == [("t/data/a",)]
    finally:
        other.close()


def test_threads_add_concurrently(outbox: Outbox) -> None:
    def work(n: int) -> None:
        for i in range(25):
            outbox.add(f"t/data/{n}-{i}", "t", 1, SITES)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pending = outbox.pending("jinan", 1000)
    assert len(pending) == 100 and [p.seq for p in pending] == sorted(p.seq for p in pending)


# ---- spool ----------------------------------------------------------------------------------------


def test_spool_put_read_shipped(spool: Spool) -> None:
    key = "t/data/ab/ab01"
    seq = spool.put(key, b"sealed bytes", "t", SITES)
    path = spool.path(key)
    assert path.read_bytes() == b"sealed bytes" == spool.read(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [f for f in os.listdir(path.parent) if f.startswith(".tmp-")] == []
    assert spool.used_bytes() == len(b"sealed bytes")
    assert keys_of(spool.outbox.pending("jinan", 10)) == [key]
    assert spool.outbox.ack(seq, "jinan") is False
    assert spool.outbox.ack(seq, "qingdao") is True
    spool.shipped(seq, key)
    assert not path.exists()
    assert spool.outbox.acked_sites(key) is None and spool.used_bytes() == 0
    with pytest.raises(ObjectNotFound) as info:
        spool.read(key)
    assert info.value.fields == {"key": key, "site": "spool"}
    spool.shipped(seq, key)  # again, as after a crash between the two steps: harmless


def test_spool_put_again_keeps_the_file(spool: Spool) -> None:
    key = "t/index/0011"
    seq = spool.put(key, b"first", "t", ["jinan"])
    assert spool.put(key, b"first", "t", ["jinan", "qingdao"]) == seq
    assert spool.read(key) == b"first"
    assert spool.outbox.acked_sites(key) == ([], ["jinan", "qingdao"])


def test_spool_survives_reopen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sp = Spool(state)
    seq = sp.put("t/snapshots/aa/bb", b"record", "t", SITES, barrier=True)
    sp.outbox.ack(seq, "jinan")
    sp.close()

    sp = Spool(state)
    try:
        assert sp.read("t/snapshots/aa/bb") == b"record"
        assert [(p.seq, p.barrier) for p in sp.outbox.pending("qingdao", 10)] == [(seq, True)]
        assert sp.outbox.pending("jinan", 10) == []
        assert sp.outbox.ack(seq, "qingdao") is True
        sp.shipped(seq, "t/snapshots/aa/bb")
    finally:
        sp.close()
    sp = Spool(state)
    try:
        assert sp.used_bytes() == 0 and sp.outbox.pending("qingdao", 10) == []
        assert not sp.path("t/snapshots/aa/bb").exists()
    finally:
        sp.close()


def test_lock_sweeps_a_crash_between_the_last_ack_and_shipped(tmp_path: Path) -> None:
    """Killed after the last site acknowledged but before ``shipped``: the next owner removes file and row,
    and half-written temporary files; a second owner of the same state directory is refused."""
    from drsvc.core.spool import StateBusy

    spool = Spool(tmp_path)
    seq = spool.put("t/data/ab/abcd" + "0" * 28, b"pack", "t", ["a", "b"])
    spool.outbox.ack(seq, "a")
    spool.outbox.ack(seq, "b")  # ... and the process dies here
    pending = spool.put("t/data/cd/cdef" + "0" * 28, b"pack2", "t", ["a"])
    tmp = spool.dir / "t" / "data" / "ab" / ".tmp-0123"
    tmp.write_bytes(b"half")
    spool.close()
    owner = Spool(tmp_path)
    owner.lock()
    try:
        assert not (spool.dir / "t" / "data" / "ab" / ("abcd" + "0" * 28)).exists()
        assert owner.outbox.acked_sites("t/data/ab/abcd" + "0" * 28) is None
        assert owner.outbox.acked_sites("t/data/cd/cdef" + "0" * 28) == ([], ["a"]) and pending
        assert not tmp.exists()
        other = Spool(tmp_path)
        with pytest.raises(StateBusy, match="another drsvc process"):
            other.lock()
        other.close()
    finally:
        owner.close()


def test_protection_counts_only_the_sites_an_object_went_to(tmp_path: Path) -> None:
    """After a reload widened a source from [a] to [a, b] with min_copies 2, a record that went only to a
    (and left the outbox when a acknowledged it) is not protected; nor do sites outside the policy count."""
    from replicator import protection

    spool = Spool(tmp_path)
    try:
        key = "t/snapshots/" + "ab" * 12 + "/" + "cd" * 16
        seq = spool.put(key, b"record", "t", ["a"], barrier=True)
        assert spool.outbox.ack(seq, "a")
        spool.shipped(seq, key)  # gone from the outbox: every target (a) holds it
        assert protection(spool, key, ["a"], 1, ["a"]).protected
        widened = protection(spool, key, ["a", "b"], 2, ["a"])
        assert not widened.protected and widened.holding == ("a",) and widened.lacking == ("b",)
        key2 = "t/snapshots/" + "ab" * 12 + "/" + "ef" * 16
        seq2 = spool.put(key2, b"record", "t", ["a", "c"], barrier=True)
        spool.outbox.ack(seq2, "c")  # c acknowledged, but c is no longer in the policy
        assert protection(spool, key2, ["a", "b"], 1, ["a", "c"]).holding == ()
    finally:
        spool.close()
