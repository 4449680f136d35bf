"""The restore writer: a range that fails verification part-way is read again from another site, and every
file ends up whole, with its metadata, and counted once."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from helpers import init_app, local_sites, make_config, tree_state

from restore import Progress


def _fill(src: Path) -> None:
    rnd = random.Random(11)
    for d in range(6):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(40):
            f = sub / f"f{i:02}"
            f.write_bytes(rnd.randbytes(rnd.randrange(1, 9000)))
            if i % 7 == 0:
                f.chmod(0o444)  # read-only: its mode is set once its last blob is written
            os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
        big = sub / "big"  # several chunks, in several ranges and packs
        big.write_bytes(rnd.randbytes(3 << 20))
        big.chmod(0o400)
        (sub / "empty").write_bytes(b"")


def _flip_middle_of_every_pack(site: Path) -> int:
    n = 0
    for p in (site / "fin" / "data").rglob("*"):
        if p.is_file():
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x40
            tmp = p.with_name(p.name + ".tmp")  # a new file: the sites may share the old one (hard links)
            tmp.write_bytes(bytes(data))
            tmp.replace(p)
            n += 1
    return n


async def test_a_range_failing_part_way_is_read_from_another_site_and_counted_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _fill(src)
    sites = local_sites(tmp_path, ["a", "b"])
    app = await init_app(make_config(tmp_path, src, sites, min_copies=2, tenant={"pack_size": "256KiB"}))
    try:
        await app.snapshot("docs")
        assert _flip_middle_of_every_pack(tmp_path / "sites" / "a") > 4
        seen: list[Progress] = []
        r = await app.restore(
            "docs", tmp_path / "out", None, site="a", progress=lambda p: seen.append(Progress(**vars(p)))
        )
    finally:
        await app.close()
    assert r.fallbacks and all(f.site == "a" for f in r.fallbacks)
    assert tree_state(tmp_path / "out") == tree_state(src)
    last = seen[-1]
    assert last.bytes_done == last.bytes_total == r.bytes
    assert last.files_done == last.files_total == r.files
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(seen))
