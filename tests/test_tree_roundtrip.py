"""Snapshot -> restore round trips, incremental snapshots and dedup, against local-directory sites."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import hypothesis.strategies as st
import pytest
from helpers import du, init_app, local_sites, make_config, tree_state
from hypothesis import HealthCheck, given, settings

WORKERS = {"in-process": None, "worker-processes": 0}  # in_process_bytes for init_app

NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12
).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)

ENTRY = st.recursive(
    st.one_of(
        st.tuples(
            st.just("f"),
            st.binary(max_size=2000) | st.integers(60_000, 300_000),
            st.sampled_from([0o600, 0o644, 0o755, 0o400]),
        ),
        st.tuples(st.just("l"), NAME),
    ),
    lambda children: st.tuples(st.just("d"), st.dictionaries(NAME, children, max_size=4)),
    max_leaves=12,
)


def build(root: Path, entries: dict[str, tuple[object, ...]], rng: random.Random) -> None:
    root.mkdir(exist_ok=True)
    for name, e in entries.items():
        p = root / name
        if e[0] == "f":
            content = e[1] if isinstance(e[1], bytes) else random.Random(e[1]).randbytes(e[1])  # type: ignore[arg-type]
            p.write_bytes(content)
            os.chmod(p, e[2])  # type: ignore[arg-type]
        elif e[0] == "l":
            os.symlink(e[1], p)  # type: ignore[arg-type]
        else:
            build(p, e[1], rng)  # type: ignore[arg-type]
        if not p.is_symlink():
            t = rng.randint(10**18, 2 * 10**18)
            os.utime(p, ns=(t, t))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tree=st.dictionaries(NAME, ENTRY, max_size=6),
    seed=st.integers(0, 2**32),
    path=st.sampled_from(sorted(WORKERS)),
)
async def test_generated_trees_round_trip(
    tmp_path_factory: pytest.TempPathFactory, tree: dict, seed: int, path: str
) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    src = tmp / "src"
    build(src, tree, random.Random(seed))
    (src / "empty").mkdir(exist_ok=True)
    app = await init_app(make_config(tmp, src, local_sites(tmp, ["a", "b"]), min_copies=2), WORKERS[path])
    try:
        o = await app.snapshot("docs")
        assert o.protection.protected
        await app.restore("docs", tmp / "out", None, site="b")
    finally:
        await app.close()
    assert tree_state(tmp / "out") == tree_state(src)


def _write_corpus(src: Path) -> None:
    rng = random.Random(7)
    (src / "text").mkdir(parents=True)
    for i in range(60):
        (src / "text" / f"f{i}.txt").write_bytes(f"line {i} ".encode() * rng.randint(10, 3000))
    (src / "big.bin").write_bytes(rng.randbytes(3_000_000))
    (src / "pages.db").write_bytes(rng.randbytes(8192 * 400))


@pytest.mark.parametrize("path", ["in-process", "worker-processes"])
async def test_incremental_reads_only_changes_and_restores_each_point(tmp_path: Path, path: str) -> None:
    src = tmp_path / "src"
    _write_corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])), WORKERS[path])
    try:
        first = await app.snapshot("docs")
        state1 = tree_state(src)
        # mutate: append to one file, rewrite one page, add and delete files, chmod one
        with open(src / "text" / "f1.txt", "ab") as f:
            f.write(b"appended\n")
        with open(src / "pages.db", "r+b") as f:
            f.seek(8192 * 123)
            f.write(b"\x01" * 8192)
        (src / "text" / "new.txt").write_text("new file\n")
        (src / "text" / "f2.txt").unlink()
        os.chmod(src / "text" / "f3.txt", 0o600)
        second = await app.snapshot("docs")
        state2 = tree_state(src)
        s = second.result.stats
        assert s.files_read == 4  # f1, pages.db, new.txt, f3 (ctime changed); nothing else is read
        assert s.files_unchanged == s.files - 4
        # one changed 8 KiB page and a few small files: well under 64 KiB stored for the data
        assert s.bytes_stored < 64 * 1024, s
        assert second.result.record.parent == first.result.record.id
        await app.restore("docs", tmp_path / "out1", first.result.record.time_ns)
        await app.restore("docs", tmp_path / "out2", None)
    finally:
        await app.close()
    assert tree_state(tmp_path / "out1") == state1
    assert tree_state(tmp_path / "out2") == state2


@pytest.mark.parametrize("path", ["in-process", "worker-processes"])
async def test_dedup_stores_identical_content_once(tmp_path: Path, path: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = random.Random(1).randbytes(2_000_000)  # incompressible: stored bytes ~ content bytes
    for i in range(5):
        (src / f"copy{i}.bin").write_bytes(blob)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])), WORKERS[path])
    try:
        o = await app.snapshot("docs")
    finally:
        await app.close()
    stored = du(tmp_path / "sites" / "a" / "fin" / "data")
    assert o.result.stats.bytes_total == 10_000_000
    assert 2_000_000 <= stored < 2_100_000, stored  # one copy plus pack and seal overhead


async def test_new_host_finds_parent_and_dedups_against_site(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(random.Random(2).randbytes(1_000_000))
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        await app.snapshot("docs")
        shutil.rmtree(tmp_path / "state")  # a new host: no local cache, no outbox
        os.utime(src / "x.bin", ns=(10**18, 10**18))  # touched: must be read again
        app2 = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
        try:
            o = await app2.snapshot("docs")
        finally:
            await app2.close()
    finally:
        await app.close()
    assert o.result.record.parent is not None  # the parent came from the site
    assert o.result.stats.files_read == 1
    assert o.result.stats.bytes_stored < 4096  # only the new tree: every chunk is already at the site


def test_unreadable_file_gives_warning_and_partial_snapshot() -> None:
    """Through the real CLI, with the capabilities that let root read anything dropped (setpriv)."""
    import json
    import subprocess
    import sys
    import tempfile

    nobody = 65534
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.fail("setpriv (util-linux) is needed to drop root's read-anything capabilities")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:  # pragma: no cover - an unprivileged user cannot read another's 0600 file anyway
        prefix = []
    base = Path(tempfile.mkdtemp(prefix="drsvc-unreadable-"))
    try:
        os.chmod(base, 0o777)
        src = base / "src"
        src.mkdir()
        (src / "ok.txt").write_text("readable\n")
        (src / "secret.txt").write_text("nobody's only\n")
        os.chmod(src / "secret.txt", 0o600)
        (src / "closed").mkdir(mode=0o700)
        (src / "closed" / "inside.txt").write_text("x")
        os.chown(src / "secret.txt", nobody, nobody)
        os.chown(src / "closed", nobody, nobody)
        os.chmod(src, 0o755)
        cfg = base / "drsvc.toml"
        cfg.write_text(
            f'[state]\ndir = "{base}/state"\n[tenants.fin.key.passphrase]\nvalue = "pw"\n'
            f'[sites.a]\ntype = "local"\npath = "{base}/site"\n'
            f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["a"]\n'
        )
        cli = [*prefix, sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg)]
        run = lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True, cwd=base)  # noqa: E731
        assert run("init", "fin", "--scrypt-n", "1024").returncode == 0
        snap = run("snapshot", "docs", "--json")
        assert snap.returncode == 0, snap.stderr
        result = json.loads(snap.stdout)
        assert result["partial"] is True and result["protected"] is True
        warnings = "\n".join(result["warnings"])
        assert "secret.txt: cannot open: Permission denied" in warnings
        assert "closed: cannot list directory: Permission denied" in warnings
        restored = run("restore", "docs", "--to", str(base / "out"))
        assert restored.returncode == 0, restored.stderr
        assert (base / "out" / "ok.txt").read_text() == "readable\n"
        assert not (base / "out" / "secret.txt").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_file_changing_during_read_is_read_again_then_marked(tmp_path: Path) -> None:
    """FileReader re-reads a file whose stat changed while it was read, once; then it reports it changed."""
    from drsvc.core.crypto import Keys, Suite, new_master_key
    from snapshot.chunker import ChunkParams
    from snapshot.reader import FileJob, FileOut, FileReader

    victim = tmp_path / "grows.log"
    victim.write_bytes(b"x" * 300_000)
    keys = Keys(Suite.AES_256_GCM, os.urandom(16), new_master_key())
    stored: list[bytes] = []

    class Sink:  # stands in for the packer: records what would be stored
        def add(self, btype: object, cid: bytes, data: memoryview) -> None:
            stored.append(cid)

    class GrowingReader(FileReader):
        """Appends to the file during each of the first `grow` reads."""

        grow = 1
        reads = 0

        def read_once(self, job: FileJob) -> FileOut:
            out = super().read_once(job)
            self.reads += 1
            if self.reads <= self.grow:
                with open(victim, "ab") as f:
                    f.write(b"more")
                out.changed = True
            return out

    def reader(grow: int) -> GrowingReader:
        r = GrowingReader(
            ChunkParams(16384, 65536, 262144, keys.chunker_seed),
            32768,
            keys.content_id_function(),
            lambda cid: True,
            Sink(),
        )  # type: ignore[arg-type]
        r.grow = grow
        return r

    job = FileJob(str(victim), "grows.log", victim.stat(), False)
    once = reader(1)
    out = once.read_file(job)
    assert once.reads == 2 and not out.changed and out.bytes_read == 300_004  # read again: consistent
    twice = reader(2)
    out = twice.read_file(job)
    assert twice.reads == 2 and out.changed  # still changing after the second read: marked, not looped


@pytest.mark.parametrize("path", ["in-process", "worker-processes"])
async def test_large_page_file_is_read_in_segments_and_round_trips(tmp_path: Path, path: str) -> None:
    from snapshot.tree import SEGMENT

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    page = 8192
    size = 2 * SEGMENT + 5 * page + 100  # three segments, the last one short and not page-aligned
    (src / "big.db").write_bytes(rng.randbytes(size))
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])), WORKERS[path])
    try:
        await app.snapshot("docs")
        with open(src / "big.db", "r+b") as f:
            for off in (page * 3, SEGMENT + page * 7, 2 * SEGMENT + page):  # one page in each segment
                f.seek(off)
                f.write(rng.randbytes(page))
            f.seek(0, os.SEEK_END)
            f.write(b"appended")
        o = await app.snapshot("docs")
        await app.restore("docs", tmp_path / "out", None)
    finally:
        await app.close()
    assert (tmp_path / "out" / "big.db").read_bytes() == (src / "big.db").read_bytes()
    # three changed 32 KiB chunks, the new tail, and the file's tree (33 bytes per chunk id): no segment again
    tree = 34 * (size // (32 * 1024) + 2)
    assert o.result.stats.bytes_stored < 4 * 32 * 1024 + 8192 + tree + 4096, o.result.stats
    assert o.result.stats.blobs_new == 5  # four data chunks and one tree


async def test_lost_spool_file_is_copied_from_a_site_that_has_it(tmp_path: Path) -> None:
    from drsvc.core.errors import TransientStoreError
    from drsvc.core.stores.faults import Fault, FaultyStore
    from replicator import replicate

    src = tmp_path / "src"
    _write_corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=1))
    try:
        healthy_b = app.store("b")
        app._stores["b"] = FaultyStore(
            healthy_b, [Fault("put", error=TransientStoreError("site down", site="b"))]
        )
        o = await app.snapshot("docs")
        assert o.protection.holding == ("a",) and o.protection.lacking == ("b",)
        spooled = [p for p in (app.config.state.dir / "spool").rglob("*") if p.is_file()]
        assert spooled
        for p in spooled:  # the state directory loses its spool
            p.unlink()
        app._stores["b"] = healthy_b
        reports = await replicate(app.spool, [app.store("a"), healthy_b])
        assert all(r.error is None for r in reports), reports
        assert app.spool.outbox.backlog("b").objects == 0
        r = await app.restore("docs", tmp_path / "out", None, site="b")
        assert not r.fallbacks
    finally:
        await app.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_a_site_added_to_a_source_gets_every_chunk_the_next_snapshot_needs(tmp_path: Path) -> None:
    """Unchanged files reuse the parent's chunks only if those chunks are at every site of the source now."""
    from drsvc.check import check_site

    src = tmp_path / "src"
    _write_corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        await app.snapshot("docs")
    finally:
        await app.close()
    widened = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=2))
    try:
        o = await widened.snapshot("docs")
        assert o.protection.protected
        repo = await widened.open_repo("fin", "b")
        report = await check_site(repo, widened.store("b"), read_data=True)
        assert report.ok, report.problems
    finally:
        await widened.close()
    only_b = await init_app(make_config(tmp_path, src, {"b": local_sites(tmp_path, ["b"])["b"]}))
    try:
        await only_b.restore("docs", tmp_path / "out", None)
    finally:
        await only_b.close()
    assert tree_state(tmp_path / "out") == tree_state(src)


def test_a_spool_write_failure_ends_the_snapshot_instead_of_skipping_a_file(tmp_path: Path) -> None:
    """ENOSPC while packing is not "this file could not be read": the open pack is unusable."""
    import errno

    from drsvc.core.crypto import Keys, Suite, new_master_key
    from snapshot.chunker import ChunkParams
    from snapshot.reader import FileJob, FileReader, SpoolWriteError

    f = tmp_path / "data.bin"
    f.write_bytes(random.Random(9).randbytes(100_000))

    class FullSpool:
        def add(self, btype: object, cid: bytes, data: memoryview) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "spool"))

    keys = Keys(Suite.AES_256_GCM, os.urandom(16), new_master_key())
    reader = FileReader(
        ChunkParams(16384, 65536, 262144, keys.chunker_seed),
        32768,
        keys.content_id_function(),
        lambda cid: True,
        FullSpool(),
    )  # type: ignore[arg-type]
    with pytest.raises(SpoolWriteError, match="No space left on device") as info:
        reader.read_file(FileJob(str(f), "data.bin", f.stat(), False))
    assert info.value.fields["path"] == str(tmp_path / "spool") and "free space" in info.value.hint


async def test_a_stray_object_at_a_site_breaks_nothing_and_check_reports_it(tmp_path: Path) -> None:
    from drsvc.check import check_site

    src = tmp_path / "src"
    _write_corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a"])))
    try:
        await app.snapshot("docs")
        await app.store("a").put("fin/index/not-hex-at-all", b"junk")  # e.g. written by another tool
        await app.store("a").put("fin/snapshots/zz/also-junk", b"junk")
        o = await app.snapshot("docs")
        assert o.protection.protected
        report = await check_site(await app.open_repo("fin"), app.store("a"), read_data=False)
        await app.restore("docs", tmp_path / "out", None)
    finally:
        await app.close()
    assert sorted(report.problems) == [
        "stray object fin/index/not-hex-at-all (not of this repository)",
        "stray object fin/snapshots/zz/also-junk (not of this repository)",
    ]
    assert tree_state(tmp_path / "out") == tree_state(src)


async def test_restore_finds_blobs_through_another_sites_index(tmp_path: Path) -> None:
    """Site a lost its index objects (packs intact): the restore from a reads b's indexes, a's packs."""
    src = tmp_path / "src"
    _write_corpus(src)
    app = await init_app(make_config(tmp_path, src, local_sites(tmp_path, ["a", "b"]), min_copies=2))
    try:
        await app.snapshot("docs")
        lost = list((tmp_path / "sites" / "a" / "fin" / "index").iterdir())
        assert lost
        for f in lost:
            f.unlink()
        r = await app.restore("docs", tmp_path / "out", None, site="a")
    finally:
        await app.close()
    assert r.site == "a"
    assert not [f for f in r.fallbacks if "/data/" in f.key]  # every pack came from site a
    assert tree_state(tmp_path / "out") == tree_state(src)
