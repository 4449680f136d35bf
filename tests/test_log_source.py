"""`log` sources end to end: tail a directory into segments, ship them, restore at points in time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import WeedServer
from helpers import init_app, local_sites, make_config
from test_sites import s3_site

from drsvc.app import App
from drsvc.core.errors import RestoreError
from drsvc.core.layout import Handle, Kind
from drsvc.core.segments import SegmentName
from replicator import replicate
from restore import restore_tree
from restore.logreplay import LogGapError, restorable_range, restore_log
from snapshot.logtail import LogStreamer, SpooledSegment

SECOND = 10**9


def log_config(tmp: Path, logdir: Path, sites: dict[str, dict[str, Any]], **source: Any) -> Any:
    return make_config(
        tmp, logdir, sites, min_copies=len(sites), source={"type": "log", "sync_interval": 0.1, **source}
    )


def content(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


async def streamer(app: App, **kw: Any) -> LogStreamer:
    repo = await app.open_repo("fin")
    return LogStreamer("docs", app.config.source("docs"), repo, app.spool, app.config.state.dir, **kw)


async def ship(app: App) -> None:
    reports = await replicate(app.spool, [app.store(n) for n in app.config.source("docs").sites])
    assert all(r.error is None for r in reports), reports


async def restore_at(app: App, out: Path, at_ns: int | None, site: str | None = None, **kw: Any) -> Any:
    repo = await app.open_repo("fin", site)
    return await restore_log(repo, "docs", out, at_ns, **kw)


class History:
    """The directory's content after each cut, with a time at which it held."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.points: list[tuple[int, dict[str, bytes]]] = []

    async def cut(self, s: LogStreamer) -> list[SpooledSegment]:
        segs = await s.cut_once()
        self.points.append((time.time_ns(), content(self.logdir)))
        return segs


async def test_appends_rotation_truncation_replacement_restore_at_each_time(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), segment_max="64KiB"))
    h = History(logs)
    try:
        s = await streamer(app)
        app_log = open(logs / "app.log", "ab")  # the application keeps its descriptor
        app_log.write(b"start\n")
        app_log.flush()
        (logs / "audit.log").write_bytes(b"audit 1\n")
        first = await h.cut(s)
        assert [x.seq for x in first] == [0]

        for i in range(50):  # appends
            app_log.write(f"line {i}\n".encode())
        app_log.flush()
        with open(logs / "audit.log", "ab") as f:
            f.write(b"audit 2\n")
        await h.cut(s)

        big = os.urandom(200_000)  # more than segment_max: several segments in one cut
        app_log.write(big)
        app_log.flush()
        segs = await h.cut(s)
        assert len(segs) >= 4 and all(x.data_bytes <= 64 * 1024 for x in segs), segs
        assert [x.seq for x in segs] == list(range(segs[0].seq, segs[0].seq + len(segs)))

        # rotation: app.log -> app.log.1; the application writes to the old file once more, then reopens
        os.rename(logs / "app.log", logs / "app.log.1")
        app_log.write(b"last line before reopen\n")
        app_log.close()
        app_log = open(logs / "app.log", "ab")
        app_log.write(b"fresh after rotation\n")
        app_log.flush()
        await h.cut(s)

        # truncation: to zero and shorter; then truncated and rewritten longer than what was sent
        with open(logs / "audit.log", "wb") as f:
            f.write(b"new audit\n")
        await h.cut(s)
        with open(logs / "audit.log", "r+b") as f:
            f.truncate(0)
            f.write(b"rewritten and longer than before: " + b"x" * 40 + b"\n")
        await h.cut(s)

        # a file replaced by another (renamed over it), and one deleted
        (logs / "incoming.tmp").write_bytes(b"replacement content\n")
        os.rename(logs / "incoming.tmp", logs / "app.log.1")
        app_log.write(b"and more\n")
        app_log.flush()
        await h.cut(s)
        os.unlink(logs / "audit.log")
        app_log.write(b"after the delete\n")
        app_log.close()
        await h.cut(s)
        assert not await s.cut_once()  # nothing new: no segment
        await ship(app)

        for i, (t, expected) in enumerate(h.points):
            out = tmp_path / f"out{i}"
            r = await restore_at(app, out, t)
            assert content(out) == expected, f"restore at point {i}"
            assert r.gap is None and r.restored_ns <= t
            assert r.reached_latest == (i == len(h.points) - 1)

        # past the last segment: the latest state, and the achieved RPO says how far short it is
        later = h.points[-1][0] + 30 * SECOND
        r = await restore_at(app, tmp_path / "latest", later)
        assert content(tmp_path / "latest") == h.points[-1][1]
        assert r.reached_latest and r.rpo_achieved_s is not None and r.rpo_achieved_s >= 30
        r = await restore_at(app, tmp_path / "none", None)
        assert content(tmp_path / "none") == h.points[-1][1] and r.rpo_achieved_s is None

        # before the first event: nothing to restore, and nothing written
        with pytest.raises(RestoreError, match="at or before"):
            await restore_at(app, tmp_path / "early", first[0].first_ns - 1)
        assert not (tmp_path / "early").exists()

        rng = await restorable_range(await app.open_repo("fin"), "docs")
        assert rng is not None and rng.earliest_ns == first[0].first_ns
        assert rng.latest_ns == r.restored_ns and rng.streams == 1
        s.close()
    finally:
        await app.close()
    assert not [p for p in tmp_path.iterdir() if "drsvc-restore" in p.name]


async def test_restart_continues_the_chain_and_a_crash_before_saving_resends_one_segment(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"])))
    state = app.config.state.dir / "logs" / "docs.json"
    h = History(logs)
    try:
        a = await streamer(app)
        (logs / "db.binlog").write_bytes(b"event 1\n")
        await h.cut(a)
        a.close()

        b = await streamer(app)  # a clean restart: same stream, next seq, no file sent again
        with open(logs / "db.binlog", "ab") as f:
            f.write(b"event 2\n")
        segs = await h.cut(b)
        assert segs[0].seq == 1 and segs[0].stream == json.loads(state.read_bytes())["stream"]
        assert segs[0].data_bytes == len(b"event 2\n")
        saved = state.read_bytes()

        with open(logs / "db.binlog", "ab") as f:
            f.write(b"event 3\n")
        lost = await b.cut_once()  # spooled, but the position is lost: the crash came before the save
        b.close()
        state.write_bytes(saved)

        c = await streamer(app)
        with open(logs / "db.binlog", "ab") as f:
            f.write(b"event 4\n")
        again = await h.cut(c)  # cut again from the saved position: seq 2 again, under a new name
        assert again[0].seq == lost[0].seq == 2 and again[0].name != lost[0].name
        assert again[0].data_bytes == len(b"event 3\nevent 4\n")  # one segment's bytes sent twice
        with open(logs / "db.binlog", "ab") as f:
            f.write(b"event 5\n")
        await h.cut(c)
        c.close()
        await ship(app)

        for i, (t, expected) in enumerate(h.points):
            out = tmp_path / f"out{i}"
            r = await restore_at(app, out, t)
            assert content(out) == expected and r.gap is None, i
        assert content(out) == {"db.binlog": b"event 1\nevent 2\nevent 3\nevent 4\nevent 5\n"}

        # the position file is lost: a new stream, every file sent again from its start
        state.unlink()
        d = await streamer(app)
        fresh = await d.cut_once()
        assert fresh[0].seq == 0 and fresh[0].stream != again[0].stream
        d.close()
        await ship(app)
        r = await restore_at(app, tmp_path / "new-stream", None)
        assert r.stream == fresh[0].stream and content(tmp_path / "new-stream") == content(logs)
        r = await restore_at(app, tmp_path / "old-stream", h.points[-1][0])
        assert r.stream == again[0].stream and content(tmp_path / "old-stream") == h.points[-1][1]
    finally:
        await app.close()


async def test_segment_lost_at_one_site_is_read_from_the_other_lost_everywhere_stops_at_the_gap(
    tmp_path: Path, seaweed: WeedServer
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    buckets = [seaweed.make_bucket(), seaweed.make_bucket()]
    sites = {"a": s3_site(seaweed, buckets[0]), "b": s3_site(seaweed, buckets[1])}
    app = await init_app(log_config(tmp_path, logs, sites))
    h = History(logs)
    try:
        s = await streamer(app)
        spooled = []
        for i in range(5):
            with open(logs / "journal", "ab") as f:
                f.write(f"entry {i}\n".encode() * (i + 1))
            spooled += await h.cut(s)
        s.close()
        await ship(app)
        assert [x.seq for x in spooled] == [0, 1, 2, 3, 4]
        victim = spooled[2]

        await app.store("a").delete(victim.key)
        r = await restore_at(app, tmp_path / "one", None, site="a")
        assert content(tmp_path / "one") == h.points[-1][1] and r.gap is None
        assert [f.site for f in r.fallbacks] == ["a"] and victim.name in r.fallbacks[0].key

        await app.store("b").delete(victim.key)
        r = await restore_at(app, tmp_path / "gap", None, site="a")
        assert content(tmp_path / "gap") == h.points[1][1]  # everything before the missing segment
        assert r.gap is not None and r.restored_ns == spooled[1].last_ns
        gap = r.gap
        assert (gap.missing_from, gap.missing_to) == (2, 2)
        assert gap.after == spooled[1].name and gap.before == spooled[3].name
        assert (gap.after_ns, gap.before_ns) == (spooled[1].last_ns, spooled[3].first_ns)
        text = gap.describe()
        assert "segment 2" in text and spooled[1].name in text and spooled[3].name in text

        # a point before the gap is restored whole; one after it only with partial_ok
        r = await restore_at(app, tmp_path / "before", spooled[1].last_ns)
        assert r.gap is None and content(tmp_path / "before") == h.points[1][1]
        with pytest.raises(LogGapError, match="segment 2") as ei:
            await restore_at(app, tmp_path / "strict", None, partial_ok=False)
        assert ei.value.gap.missing_from == 2 and not (tmp_path / "strict").exists()

        # the first segment lost everywhere: nothing can be restored
        for site in ("a", "b"):
            await app.store(site).delete(spooled[0].key)
        with pytest.raises(LogGapError, match="stream's start"):
            await restore_at(app, tmp_path / "nothing", None)
        assert not (tmp_path / "nothing").exists()
    finally:
        await app.close()
        for bkt in buckets:
            seaweed.remove_bucket(bkt)
    assert not [p for p in tmp_path.iterdir() if "drsvc-restore" in p.name]


async def test_corrupt_segment_everywhere_is_a_gap_and_a_forged_chain_is_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"])))
    try:
        s = await streamer(app)
        spooled = []
        for i in range(3):
            (logs / f"f{i}").write_bytes(b"x" * (i + 1))
            spooled += await s.cut_once()
        s.close()
        await ship(app)
        repo = await app.open_repo("fin")
        path = tmp_path / "sites" / "a" / spooled[1].key
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
        r = await restore_log(repo, "docs", tmp_path / "out", None)
        assert r.gap is not None and r.gap.missing_from == 1 and "no intact copy" in r.gap.reason
        assert content(tmp_path / "out") == {"f0": b"x"}

        # a segment copied under another sequence number's name does not authenticate: a gap, not data
        tag = repo.keys.source_tag("docs")
        n = SegmentName.parse(spooled[1].name)
        forged = str(SegmentName(n.first_ns, n.stream, n.seq, "0" * 16))
        await app.store("a").put(repo.layout.key(Handle(Kind.SEGMENT, forged, tag)), bytes(data))
        r = await restore_log(await app.open_repo("fin"), "docs", tmp_path / "out2", None)
        assert r.gap is not None and r.gap.missing_from == 1
    finally:
        await app.close()


@pytest.mark.parametrize("inotify", [True, False])
async def test_run_cuts_within_the_sync_interval_and_drains_at_stop(tmp_path: Path, inotify: bool) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), sync_interval=0.2))
    try:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[SpooledSegment] = asyncio.Queue()
        s = await streamer(
            app, on_segment=lambda seg: loop.call_soon_threadsafe(got.put_nowait, seg), inotify=inotify
        )
        stop = asyncio.Event()
        task = asyncio.ensure_future(s.run(stop))
        lags = []
        with open(logs / "app.log", "ab") as f:
            for i in range(5):
                await asyncio.sleep(0.05)
                f.write(f"record {i}\n".encode())
                f.flush()
                written = time.time_ns()
                while True:
                    seg = await asyncio.wait_for(got.get(), 2)
                    if seg.last_ns >= written:
                        break
                lags.append((time.time_ns() - written) / 1e9)
            assert s.mode == ("inotify" if inotify else "polling")
            f.write(b"written just before the stop\n")
            f.flush()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert max(lags) < (0.3 if inotify else 0.6), lags
        await ship(app)
        await restore_at(app, tmp_path / "out", None)
    finally:
        await app.close()
    assert content(tmp_path / "out") == content(logs)


async def test_a_failed_cut_loses_nothing(tmp_path: Path) -> None:
    """The spool refuses a segment (full disk): the position stays, the next cut sends the same bytes."""
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"])))
    try:
        s = await streamer(app)
        (logs / "a.log").write_bytes(b"one\n")
        await s.cut_once()
        await ship(app)
        with open(logs / "a.log", "ab") as f:
            f.write(b"two\n")
        spool_dir = app.config.state.dir / "spool"
        shutil.rmtree(spool_dir)
        spool_dir.write_bytes(b"")  # the spool directory is now a file: every put fails
        with pytest.raises(OSError):
            await s.cut_once()
        spool_dir.unlink()
        spool_dir.mkdir()
        segs = await s.cut_once()
        assert segs[0].seq == 1 and segs[0].data_bytes == 4
        s.close()
        await ship(app)
        await restore_at(app, tmp_path / "out", None)
    finally:
        await app.close()
    assert content(tmp_path / "out") == {"a.log": b"one\ntwo\n"}


async def test_checkpoints_start_new_streams_and_let_old_segments_go(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    big = os.urandom(1_000_000)
    (logs / "binlog.000001").write_bytes(big)
    (logs / "app.log").write_bytes(b"before the daemon started\n")
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"])))
    h = History(logs)
    try:
        s = await streamer(app, checkpoint_stores=[app.store("a")], cache_dir=app.cache_dir)
        cp0 = await s.checkpoint()  # a fresh stream: the files as they are, nothing sent as segments
        h.points.append((time.time_ns(), content(logs)))
        assert cp0.size == len(big) + 26 and cp0.record.stats["files"] == 2
        assert not await s.cut_once()

        with open(logs / "binlog.000001", "ab") as f:
            f.write(b"tx 1\n" * 1000)
        await h.cut(s)
        with open(logs / "app.log", "ab") as f:
            f.write(b"appended before the second checkpoint\n")
        cp1 = await s.checkpoint()  # the old stream gets the append first, then the checkpoint
        h.points.append((time.time_ns(), content(logs)))
        assert cp1.bytes_read < 300_000, cp1  # the big file's chunks but the last are reused, not read

        os.rename(logs / "app.log", logs / "app.log.1")
        (logs / "app.log").write_bytes(b"new file after rotation\n")
        with open(logs / "binlog.000001", "ab") as f:
            f.write(b"tx 2\n")
        after_cp1 = await h.cut(s)
        assert after_cp1[0].seq == 0 and after_cp1[0].stream != cp0.record.id
        with open(logs / "app.log.1", "r+b") as f:
            f.truncate(5)
        await h.cut(s)
        s.close()

        s2 = await streamer(app, checkpoint_stores=[app.store("a")], cache_dir=app.cache_dir)  # restarted
        cp2 = await s2.checkpoint()  # nothing new: no segment; a restarted tailer reads every file again
        h.points.append((time.time_ns(), content(logs)))
        assert cp2.bytes_read == cp2.size
        # but stores only what changed: the big file's last chunk (<= 256 KiB), the small files, the tree
        assert cp2.bytes_stored < 300_000 and cp2.record.stats["blobs_new"] <= 4, cp2.record.stats
        with open(logs / "app.log", "ab") as f:
            f.write(b"after the third checkpoint\n")
        await h.cut(s2)
        s2.close()
        await ship(app)

        for i, (t, expected) in enumerate(h.points):
            out = tmp_path / f"out{i}"
            r = await restore_at(app, out, t)
            assert content(out) == expected and r.gap is None, i
        r0 = await restore_at(app, tmp_path / "at-cp0", cp0.record.time_ns)
        assert r0.checkpoint == cp0.record.id and r0.segments == 0
        assert content(tmp_path / "at-cp0") == h.points[0][1] and r0.restored_ns == cp0.record.time_ns
        r = await restore_at(app, tmp_path / "latest", None)
        assert r.checkpoint == cp2.record.id and r.segments == 1 and r.reached_latest

        # retention may drop every segment before the newest checkpoint: later points need none of them
        repo = await app.open_repo("fin")
        newest = str(r.stream)
        old = [p for p in (tmp_path / "sites" / "a" / "fin" / "logs").rglob("*") if p.is_file()]
        for p in old:
            if SegmentName.parse(p.name).stream != newest:
                p.unlink()
        r = await restore_log(repo, "docs", tmp_path / "after-retention", None)
        assert content(tmp_path / "after-retention") == h.points[-1][1] and r.gap is None
        rng = await restorable_range(await app.open_repo("fin"), "docs")
        assert rng is not None and rng.earliest_ns == cp0.record.time_ns and rng.checkpoints == 3
        assert rng.latest_ns == r.restored_ns

        # a checkpoint is an ordinary tree snapshot: the tree restore reads it as the directory at its time
        await restore_tree(await app.open_repo("fin"), "docs", tmp_path / "as-tree", None)
        assert content(tmp_path / "as-tree") == h.points[-2][1]
        # while App.restore replays the change log on top of it: the latest point
        await app.restore("docs", tmp_path / "latest-app", None)
        assert content(tmp_path / "latest-app") == h.points[-1][1]

        # the newest checkpoint forgotten (retention): its stream cannot be replayed, and says why
        await app.store("a").delete(cp2.key)
        with pytest.raises(LogGapError, match=f"checkpoint {cp2.record.id} is lost"):
            await restore_at(app, tmp_path / "no-base", None)
        assert not (tmp_path / "no-base").exists()
    finally:
        await app.close()


async def test_run_checkpoints_a_fresh_stream_first_then_every_interval(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "journal").write_bytes(b"x" * 100_000)
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), interval=0.4))
    try:
        done: list[Any] = []
        s = await streamer(
            app, checkpoint_stores=[app.store("a")], cache_dir=app.cache_dir, on_checkpoint=done.append
        )
        stop = asyncio.Event()
        task = asyncio.ensure_future(s.run(stop))
        with open(logs / "journal", "ab") as f:
            for i in range(12):
                f.write(f"entry {i}\n".encode())
                f.flush()
                await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert s.last_error is None
        assert len(done) >= 2 and done[0].bytes_read >= 100_000  # the first one at once, of the whole file
        await ship(app)
        r = await restore_at(app, tmp_path / "out", None)
        assert r.checkpoint == done[-1].record.id
    finally:
        await app.close()
    assert content(tmp_path / "out") == content(logs)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_operations_restore_exactly_at_every_point(tmp_path: Path, seed: int) -> None:
    """A model check: random appends, rotations, truncations, replacements, deletes, restarts and
    checkpoints; a restore at each recorded point equals the directory as it was then."""
    import random

    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), segment_max="64KiB"))
    h = History(logs)
    kw: dict[str, Any] = {"checkpoint_stores": [app.store("a")], "cache_dir": app.cache_dir}
    try:
        s = await streamer(app, **kw)
        for step in range(40):
            names = sorted(p.name for p in logs.iterdir())
            op = rng.choice(
                ["append"] * 5 + ["new", "rotate", "truncate", "replace", "delete", "restart", "cp"]
            )
            if op == "append" or not names:
                name = rng.choice(names) if names and rng.random() < 0.8 else f"f{step}.log"
                with open(logs / name, "ab") as f:
                    f.write(rng.randbytes(rng.choice([1, 100, 5000, 90_000])))
            elif op == "new":
                (logs / f"n{step}.log").write_bytes(rng.randbytes(rng.randint(0, 3000)))
            elif op == "rotate":
                name = rng.choice(names)
                os.rename(logs / name, logs / f"{name}.{step}")
                (logs / name).write_bytes(b"")
            elif op == "truncate":
                with open(logs / rng.choice(names), "r+b") as f:
                    f.truncate(rng.randint(0, 10))
                    f.seek(0, os.SEEK_END)
                    f.write(rng.randbytes(rng.randint(0, 200)))
            elif op == "replace":
                (logs / "incoming").write_bytes(rng.randbytes(rng.randint(1, 500)))
                os.rename(logs / "incoming", logs / rng.choice(names))
            elif op == "delete":
                os.unlink(logs / rng.choice(names))
            elif op == "restart":
                s.close()
                s = await streamer(app, **kw)
            elif op == "cp":
                await s.checkpoint()
                h.points.append((time.time_ns(), content(logs)))
                continue
            await h.cut(s)
        s.close()
        await ship(app)
        for i, (t, expected) in enumerate(h.points):
            if i % 3 and i != len(h.points) - 1:
                continue  # a third of the points keeps the test fast
            out = tmp_path / f"out{i}"
            r = await restore_at(app, out, t)
            assert content(out) == expected and r.gap is None, (seed, i)
    finally:
        await app.close()


async def test_forget_takes_the_segments_of_forgotten_checkpoints_with_them(tmp_path: Path) -> None:
    """Retention of a log source: forgetting a checkpoint deletes the segments of the stream it starts; the
    kept checkpoints' points still restore, and the stream being written is never touched."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_bytes(b"start\n")
    app = await init_app(
        log_config(tmp_path, logs, local_sites(tmp_path, ["a", "b"]), retention={"keep_last": 2})
    )
    h = History(logs)
    try:
        s = await streamer(app, checkpoint_stores=[app.store("a"), app.store("b")], cache_dir=app.cache_dir)
        streams = []
        for round_ in range(4):  # four checkpoints, each followed by its stream's segments
            cp = await s.checkpoint()
            streams.append(cp.record)
            for i in range(3):
                with open(logs / "app.log", "ab") as f:
                    f.write(f"round {round_} line {i}\n".encode())
                await h.cut(s)
        s.close()
        await ship(app)
        seg_dir = tmp_path / "sites" / "a" / "fin" / "logs"
        before = {p.name for p in seg_dir.rglob("*") if p.is_file()}
        o = await app.forget("docs")
        assert [r.id for r in o.plan.forget] == [r.id for r in streams[:2]]
        assert o.segments_forgotten == 2 * 3 * 2  # two streams of three segments, at two sites
        for site in ("a", "b"):
            left = {p.name for p in (tmp_path / "sites" / site / "fin" / "logs").rglob("*") if p.is_file()}
            assert len(left) == len(before) - 6
            assert {SegmentName.parse(n).stream for n in left} == {
                f"{r.stats['log_stream'] % 2**64:016x}" for r in streams[2:]
            }
        for t, want in h.points[6:]:  # the points of the kept checkpoints' streams
            out = tmp_path / f"r{t}"
            r = await restore_at(app, out, t, "b")
            assert content(out) == want and r.gap is None
        again = await app.forget("docs")
        assert again.segments_forgotten == 0
    finally:
        await app.close()


async def test_a_segment_claims_protection_only_up_to_the_start_of_its_cut(tmp_path: Path) -> None:
    """An append that finishes while a cut reads lands in a later segment: a segment may claim only what
    was written before its cut began (covers_ns), never its own events' times (found by benchmarks/loglag)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"")
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), segment_max="64KiB"))
    try:
        s = await streamer(app)
        await s.cut_once()
        before = time.time_ns()
        (logs / "a.log").write_bytes(os.urandom(300_000))  # one cut, several segments
        segs = await s.cut_once()
        assert len(segs) >= 3
        final = segs[-1]
        assert before <= final.covers_ns <= final.first_ns  # the cut's start: after the write began
        for seg in segs[:-1]:  # a segment cut mid-way covers only what earlier cuts covered
            assert seg.covers_ns < before
        assert s.caught_up_ns == final.covers_ns
    finally:
        await app.close()


async def test_a_log_restore_through_the_app_reports_progress(tmp_path: Path) -> None:
    """App.restore passes its progress callback to a log restore: the checkpoint's bytes, then each
    segment; bytes_done only goes up, and the last report has every total equal to its count."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "binlog.000001").write_bytes(os.urandom(600_000))
    (logs / "app.log").write_bytes(b"before the daemon started\n")
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), segment_max="64KiB"))
    try:
        s = await streamer(app, checkpoint_stores=[app.store("a")], cache_dir=app.cache_dir)
        await s.checkpoint()
        for i in range(4):
            with open(logs / "binlog.000001", "ab") as f:
                f.write(os.urandom(50_000))
            (logs / f"new.{i}").write_bytes(b"x" * (i + 1))
            await s.cut_once()
        os.unlink(logs / "new.0")
        await s.cut_once()
        s.close()
        await ship(app)

        seen: list[tuple[int, int, int, int, int, int]] = []

        def progress(p: Any) -> None:
            seen.append(
                (p.files_done, p.files_total, p.bytes_done, p.bytes_total, p.segments_done, p.segments_total)
            )

        r = await app.restore("docs", tmp_path / "out", None, progress=progress)
    finally:
        await app.close()
    assert content(tmp_path / "out") == content(logs)
    assert r.segments >= 5 and r.checkpoint is not None
    assert len(seen) >= r.segments + 2  # the checkpoint's writes, each segment, the end
    assert [x[4] for x in seen] == sorted(x[4] for x in seen)  # segments only go up
    assert [x[2] for x in seen] == sorted(x[2] for x in seen)  # bytes too
    assert any(0 < x[2] < r.bytes for x in seen)  # progress between start and end
    assert all(x[2] <= x[3] for x in seen)  # never more done than the (estimated) total
    files_done, files_total, bytes_done, bytes_total, seg_done, seg_total = seen[-1]
    assert files_done == files_total == r.files == len(content(logs))
    assert bytes_done == bytes_total == r.bytes
    assert seg_done == seg_total == r.segments


async def test_a_cancelled_log_restore_leaves_nothing(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "binlog.000001").write_bytes(os.urandom(2_000_000))
    app = await init_app(log_config(tmp_path, logs, local_sites(tmp_path, ["a"]), segment_max="64KiB"))
    work = tmp_path / "work"
    work.mkdir()
    try:
        s = await streamer(app, checkpoint_stores=[app.store("a")], cache_dir=app.cache_dir)
        await s.checkpoint()
        for i in range(30):
            with open(logs / f"app.{i % 7}.log", "ab") as f:
                f.write(os.urandom(60_000))
            await s.cut_once()
        s.close()
        await ship(app)
        started = time.monotonic()
        await app.restore("docs", work / "full", None)
        full = time.monotonic() - started
        assert content(work / "full") == content(logs)
        for i, frac in enumerate([0.0, 0.2, 0.4, 0.6, 0.8]):
            target = work / f"t{i}"
            if i % 2:
                target.mkdir()
            task = asyncio.ensure_future(app.restore("docs", target, None))
            await asyncio.sleep(full * frac)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                for _ in range(2):
                    assert not [n for n in os.listdir(work) if "drsvc-restore" in n]
                    assert os.listdir(target) == [] if i % 2 else not target.exists()
                    await asyncio.sleep(0.1)
            else:
                assert content(target) == content(logs)
    finally:
        await app.close()
