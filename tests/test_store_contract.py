"""The ObjectStore contract: one suite, run against every store (local directory, S3 on a real SeaweedFS).

A store under test comes with `leave_partial(key)`, which leaves behind what an interrupted write of `key`
leaves (a temporary file; an unfinished multipart upload): it must never be visible.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from drsvc.core.errors import ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.stores import ObjectInfo, ObjectStore, ReadStore
from drsvc.core.stores.faults import FaultyStore
from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.retry import RetryPolicy, RetryStore
from drsvc.core.stores.s3 import MULTIPART_PART_SIZE

MiB = 1024 * 1024


@dataclass
class StoreKit:
    store: ObjectStore
    leave_partial: Callable[[str], None]


@pytest.fixture(params=["local", "s3", "wrapped"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreKit]:
    """A store under test. "wrapped" is the local store inside the retry and fault wrappers (no faults)."""
    store: ObjectStore
    if request.param in ("local", "wrapped"):
        local = LocalStore("local", tmp_path / "site")
        store = local if request.param == "local" else RetryStore(FaultyStore(local), RetryPolicy(attempts=2))

        def leave_partial(key: str) -> None:
            path = local.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".tmp-{os.urandom(8).hex()}").write_bytes(b"half an object")

    else:
        server = request.getfixturevalue("seaweed")
        bucket = request.getfixturevalue("s3_bucket")
        s3 = server.s3_store(bucket, name="s3", prefix="/sites/s3/")
        store = s3
        client = server.client()

        def leave_partial(key: str) -> None:
            name = s3.prefix + key
            upload_id = client._create_multipart_upload(bucket, name, {})
            client._upload_part(bucket, name, b"x" * (5 * MiB), None, upload_id, 1)

    try:
        yield StoreKit(store, leave_partial)
    finally:
        await store.close()


async def listed(store: ReadStore, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    async for info in store.list(prefix):
        assert isinstance(info, ObjectInfo)
        assert info.key not in out, f"{info.key} listed twice"
        out[info.key] = info.size
    return out


async def test_is_an_object_store(kit: StoreKit) -> None:
    assert isinstance(kit.store, ObjectStore) and isinstance(kit.store, ReadStore)
    assert kit.store.name in ("local", "s3")


@pytest.mark.parametrize("size", [1, 1000, 300_000])
async def test_put_get_roundtrip(kit: StoreKit, size: int) -> None:
    data = os.urandom(size)
    await kit.store.put("t/data/ab/obj", data)
    assert await kit.store.get("t/data/ab/obj") == data


async def test_ranged_get(kit: StoreKit) -> None:
    data = os.urandom(100_000)
    await kit.store.put("t/data/ab/ranged", data)
    for offset, length in [(0, 1), (0, 100), (10, 100), (99_999, 1), (4096, 65536), (0, 100_000)]:
        assert await kit.store.get("t/data/ab/ranged", offset, length) == data[offset : offset + length]
    assert await kit.store.get("t/data/ab/ranged", 50_000) == data[50_000:]
    assert await kit.store.get("t/data/ab/ranged", 10, 0) == b""


async def test_ranged_get_past_the_end_is_a_permanent_error(kit: StoreKit) -> None:
    await kit.store.put("t/data/ab/short", b"0123456789")
    for offset, length in [(8, 5), (20, 1)]:
        with pytest.raises(StoreError) as info:
            await kit.store.get("t/data/ab/short", offset, length)
        assert not isinstance(info.value, TransientStoreError | ObjectNotFound)
        assert info.value.fields["site"] == kit.store.name


async def test_get_missing(kit: StoreKit) -> None:
    for args in [(), (0, 10), (5, None)]:
        with pytest.raises(ObjectNotFound) as info:
            await kit.store.get("t/data/ab/missing", *args)
        assert info.value.fields == {"site": kit.store.name, "key": "t/data/ab/missing"}


async def test_stat(kit: StoreKit) -> None:
    await kit.store.put("t/index/present", b"12345")
    assert await kit.store.stat("t/index/present") == ObjectInfo("t/index/present", 5)
    assert await kit.store.stat("t/index/missing") is None
    # neither a "directory" nor a path below an object is an object
    for key in ("t/index", "t/index/present/below"):
        assert await kit.store.stat(key) is None
        with pytest.raises(ObjectNotFound):
            await kit.store.get(key)
        await kit.store.delete(key)
    assert await kit.store.get("t/index/present") == b"12345"


async def test_list_by_prefix(kit: StoreKit) -> None:
    objects = {
        "t/config": 3,
        "t/keys/k1": 4,
        "t/data/ab/ab1": 10,
        "t/data/ab/ab2": 11,
        "t/data/cd/cd1": 12,
        "t/snapshots/s1/r1": 5,
        "t/snapshots/s2/r2": 6,
        "t2/config": 7,
        "top": 8,
    }
    await asyncio.gather(*(kit.store.put(k, os.urandom(n)) for k, n in objects.items()))
    kit.leave_partial("t/data/ab/ab3")
    kit.leave_partial("t/index/i1")

    t = {k: n for k, n in objects.items() if k.startswith("t/")}
    assert await listed(kit.store, "t/") == t
    assert await listed(kit.store, "t/data/") == {k: n for k, n in t.items() if "/data/" in k}
    assert await listed(kit.store, "t/data/ab/") == {"t/data/ab/ab1": 10, "t/data/ab/ab2": 11}
    assert await listed(kit.store, "t/snapshots/s2/") == {"t/snapshots/s2/r2": 6}
    assert await listed(kit.store, "t/config") == {"t/config": 3}
    assert await listed(kit.store, "t/index/") == {}
    assert await listed(kit.store, "nothing/here/") == {}
    # a prefix that ends inside a name matches like str.startswith
    assert await listed(kit.store, "t/data/a") == {"t/data/ab/ab1": 10, "t/data/ab/ab2": 11}
    assert await listed(kit.store, "t") == {k: n for k, n in objects.items() if k.startswith("t")}
    assert await listed(kit.store, "") == objects


async def test_delete(kit: StoreKit) -> None:
    await kit.store.put("t/data/ab/gone", b"x")
    await kit.store.put("t/data/ab/kept", b"y")
    await kit.store.delete("t/data/ab/gone")
    assert await kit.store.stat("t/data/ab/gone") is None
    with pytest.raises(ObjectNotFound):
        await kit.store.get("t/data/ab/gone")
    assert await listed(kit.store, "t/") == {"t/data/ab/kept": 1}
    await kit.store.delete("t/data/ab/gone")  # deleting a missing object is fine
    await kit.store.delete("never/existed")


async def test_overwrite_with_same_bytes_is_harmless(kit: StoreKit) -> None:
    data = os.urandom(5000)
    await kit.store.put("t/index/same", data)
    await kit.store.put("t/index/same", data)
    await asyncio.gather(*(kit.store.put("t/index/same", data) for _ in range(4)))
    assert await kit.store.get("t/index/same") == data
    assert await listed(kit.store, "t/index/") == {"t/index/same": 5000}


async def test_large_object(kit: StoreKit) -> None:
    """Larger than one multipart part of the S3 store: it goes up in parts and comes back whole."""
    data = os.urandom(MULTIPART_PART_SIZE + 1 * MiB + 17)
    await kit.store.put("t/data/ff/large", data)
    assert await kit.store.stat("t/data/ff/large") == ObjectInfo("t/data/ff/large", len(data))
    assert await kit.store.get("t/data/ff/large") == data
    edge = MULTIPART_PART_SIZE - 100  # a range across the part boundary
    assert await kit.store.get("t/data/ff/large", edge, 200) == data[edge : edge + 200]


async def test_empty_object(kit: StoreKit) -> None:
    await kit.store.put("t/keys/empty", b"")
    assert await kit.store.get("t/keys/empty") == b""
    assert await kit.store.get("t/keys/empty", 0, 0) == b""
    assert await kit.store.stat("t/keys/empty") == ObjectInfo("t/keys/empty", 0)
    assert await listed(kit.store, "t/keys/") == {"t/keys/empty": 0}


async def test_keys_of_every_layout_shape(kit: StoreKit) -> None:
    layout = Layout("hr-dept.2")
    name, tag = os.urandom(32).hex(), os.urandom(12).hex()
    handles = [
        Handle(Kind.CONFIG),
        Handle(Kind.KEY, name[:32]),
        Handle(Kind.PACK, name),
        Handle(Kind.INDEX, name),
        Handle(Kind.SNAPSHOT, name, tag),
    ]
    for h in handles:
        await kit.store.put(layout.key(h), str(h).encode())
    for h in handles:
        assert await kit.store.get(layout.key(h)) == str(h).encode()
        found = await listed(kit.store, layout.prefix(h.kind, h.source_tag))
        assert [layout.parse(k) for k in found] == [h]
    assert {layout.parse(k) for k in await listed(kit.store, layout.root)} == set(handles)


async def test_concurrent_requests(kit: StoreKit) -> None:
    blobs = {f"t/data/{i:02x}/{i:064x}": os.urandom(1000 + i) for i in range(24)}
    await asyncio.gather(*(kit.store.put(k, v) for k, v in blobs.items()))
    got = await asyncio.gather(*(kit.store.get(k) for k in blobs))
    assert got == list(blobs.values())
    assert await listed(kit.store, "t/data/") == {k: len(v) for k, v in blobs.items()}


@pytest.mark.parametrize("size", [0, 1000, MULTIPART_PART_SIZE + 3 * MiB])
async def test_put_file_streams_a_local_file(kit: StoreKit, tmp_path: Path, size: int) -> None:
    src = tmp_path / "spooled"
    data = os.urandom(size)
    src.write_bytes(data)
    await kit.store.put_file("t/data/cd/fromfile", src)
    assert await kit.store.stat("t/data/cd/fromfile") == ObjectInfo("t/data/cd/fromfile", size)
    assert await kit.store.get("t/data/cd/fromfile") == data
    src.unlink()  # the stored object does not depend on the source file (a hard link survives its unlink)
    assert await kit.store.get("t/data/cd/fromfile") == data


async def test_put_file_of_a_missing_file_is_not_found(kit: StoreKit, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as info:
        await kit.store.put_file("t/data/cd/nothing", tmp_path / "gone")
    assert "source file is missing" in info.value.message
    assert await kit.store.stat("t/data/cd/nothing") is None
