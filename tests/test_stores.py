"""What the contract does not cover: sites that go away, the S3 store's own behaviour, and the wrappers
(retry of transient errors only, scripted faults)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import WeedFactory, WeedServer

from drsvc.core.crypto import ObjectType, ScryptParams, seal_object
from drsvc.core.errors import IntegrityError, ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.format import encode_index
from drsvc.core.layout import Handle, Kind, Layout
from drsvc.core.repository import Fallback, Repository, init_repository, new_id
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.retry import RetryPolicy, RetryStore
from drsvc.core.stores.s3 import MULTIPART_PART_SIZE, S3Store

FAST_RETRY = RetryPolicy(attempts=3, max_delay=10.0, initial_wait=0.001, max_wait=0.01)


async def transient_failure_of_every_call(store: ObjectStore, limit: float) -> None:
    """Every kind of request fails with TransientStoreError, each within `limit` seconds."""

    async def list_all() -> None:
        async for _ in store.list("t/"):
            pass

    calls = {
        "put": lambda: store.put("t/data/ab/new", b"x"),
        "get": lambda: store.get("t/data/ab/obj"),
        "ranged get": lambda: store.get("t/data/ab/obj", 1, 2),
        "stat": lambda: store.stat("t/data/ab/obj"),
        "list": list_all,
        "delete": lambda: store.delete("t/data/ab/obj"),
    }
    for what, call in calls.items():
        began = time.monotonic()
        with pytest.raises(TransientStoreError) as info:
            await call()
        took = time.monotonic() - began
        assert took < limit, f"{what} took {took:.1f} s"
        assert info.value.fields["site"] == store.name
        assert "may be down" in info.value.hint


async def test_site_outage_and_return(seaweed_factory: WeedFactory) -> None:
    """A site that freezes or dies fails fast with a transient error, and serves again when it is back."""
    server = seaweed_factory()
    bucket = server.make_bucket()
    store = server.s3_store(bucket, timeout=1.0)
    try:
        data = os.urandom(1000)
        await store.put("t/data/ab/obj", data)

        # frozen: connections are accepted but never answered; the store's timeout bounds each request
        server.pause()
        try:
            began = time.monotonic()
            with pytest.raises(TransientStoreError):
                await store.get("t/data/ab/obj")
            assert 0.9 < time.monotonic() - began < 3.0
            with pytest.raises(TransientStoreError):
                await store.stat("t/data/ab/obj")
        finally:
            server.resume()
        assert await store.get("t/data/ab/obj") == data

        # crashed (SIGKILL, no grace): connections are refused; every call fails at once, through retries too
        server.stop(grace=0)
        await transient_failure_of_every_call(store, limit=1.0)
        retrying = RetryStore(store, FAST_RETRY)
        with pytest.raises(TransientStoreError):
            await retrying.get("t/data/ab/obj")

        # back on the same directory and ports: the object survived the crash, the same store works again
        took = server.start()
        assert took < 30
        assert await store.get("t/data/ab/obj") == data
        assert await retrying.stat("t/data/ab/obj") is not None
    finally:
        await store.close()


async def test_large_put_goes_multipart(seaweed: WeedServer, s3_store: S3Store, s3_bucket: str) -> None:
    data = os.urandom(MULTIPART_PART_SIZE + 1)
    await s3_store.put("t/data/ab/big", data)
    etag = seaweed.client().stat_object(s3_bucket, s3_store.prefix + "t/data/ab/big").etag
    assert etag is not None and etag.endswith("-2")  # S3 marks a multipart object's ETag with its parts
    small = os.urandom(MULTIPART_PART_SIZE)
    await s3_store.put("t/data/ab/small", small)
    etag = seaweed.client().stat_object(s3_bucket, s3_store.prefix + "t/data/ab/small").etag
    assert etag is not None and "-" not in etag


async def test_objects_sit_under_the_store_prefix(seaweed: WeedServer, s3_bucket: str) -> None:
    one = seaweed.s3_store(s3_bucket, name="one", prefix="site-one")
    two = seaweed.s3_store(s3_bucket, name="two")
    try:
        await one.put("t/config", b"1")
        await two.put("t/config", b"2")
        names = sorted(o.object_name or "" for o in seaweed.client().list_objects(s3_bucket, recursive=True))
        assert names == ["site-one/t/config", "t/config"]
        assert [i.key async for i in one.list("t/")] == ["t/config"]
        assert (await one.get("t/config"), await two.get("t/config")) == (b"1", b"2")
    finally:
        await one.close()
        await two.close()


async def test_create_bucket(seaweed: WeedServer) -> None:
    bucket = f"t-new-{os.urandom(6).hex()}"
    store = seaweed.s3_store(bucket, create_bucket=True)
    try:
        assert [i async for i in store.list("")] == []  # an absent bucket holds nothing
        await store.put("t/config", b"cfg")
        assert seaweed.client().bucket_exists(bucket)
        assert await store.get("t/config") == b"cfg"
    finally:
        await store.close()
        seaweed.remove_bucket(bucket)


async def test_missing_bucket_holds_no_objects(seaweed: WeedServer) -> None:
    store = seaweed.s3_store(f"t-absent-{os.urandom(6).hex()}")
    try:
        with pytest.raises(ObjectNotFound) as info:
            await store.get("t/config")
        assert "does not exist" in info.value.message and "create_bucket" in info.value.hint
        assert await store.stat("t/config") is None
        assert [i async for i in store.list("t/")] == []
    finally:
        await store.close()


async def test_wrong_credentials_are_a_permanent_error(seaweed: WeedServer, s3_bucket: str) -> None:
    store = S3Store("s3", seaweed.endpoint, s3_bucket, access_key=seaweed.access_key, secret_key="wrong")
    try:
        for call in (lambda: store.get("t/config"), lambda: store.put("t/config", b"x")):
            with pytest.raises(StoreError) as info:
                await call()
            assert not isinstance(info.value, TransientStoreError)
            assert "access key" in info.value.hint
    finally:
        await store.close()


# ---- local store ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../escape", "t/../../escape", "t//x", "t/./x", "t/"])
async def test_local_store_refuses_keys_that_leave_its_root(local_store: LocalStore, key: str) -> None:
    for call in (
        lambda: local_store.put(key, b"x"),
        lambda: local_store.get(key),
        lambda: local_store.stat(key),
        lambda: local_store.delete(key),
    ):
        with pytest.raises(StoreError, match="invalid object key"):
            await call()
    assert not (local_store.root.parent / "escape").exists()


async def test_local_store_write_failure_is_permanent_and_leaves_nothing(local_store: LocalStore) -> None:
    await local_store.put("t/config", b"x")
    with pytest.raises(StoreError) as info:
        await local_store.put("t/config/below", b"y")  # a file where a directory would have to be
    assert not isinstance(info.value, TransientStoreError)
    assert info.value.fields == {"site": "local", "key": "t/config/below"}
    assert os.listdir(local_store.root / "t") == ["config"]
    assert await local_store.get("t/config") == b"x"


async def test_local_store_writes_atomically(local_store: LocalStore) -> None:
    await local_store.put("t/data/ab/x", b"1" * 1000)
    await local_store.put("t/data/ab/x", b"2" * 10)
    assert await local_store.get("t/data/ab/x") == b"2" * 10
    assert os.listdir(local_store.root / "t/data/ab") == ["x"]  # no temporary file left behind


# ---- retry wrapper --------------------------------------------------------------------------------


async def test_retry_transient_errors_until_success(local_store: LocalStore) -> None:
    await local_store.put("t/config", b"cfg")
    fault = Fault("get", error=TransientStoreError("flaky", site="local"), times=2)
    store = RetryStore(FaultyStore(local_store, [fault]), FAST_RETRY)
    assert await store.get("t/config") == b"cfg"  # the third try
    assert fault.hits == 2


@pytest.mark.parametrize("op", ["put", "get", "stat", "list", "delete"])
async def test_retry_every_operation(local_store: LocalStore, op: str) -> None:
    await local_store.put("t/config", b"cfg")
    fault = Fault(op, error=TransientStoreError("flaky"), times=2)
    store = RetryStore(FaultyStore(local_store, [fault]), FAST_RETRY)
    if op == "put":
        await store.put("t/new", b"n")
        assert await local_store.get("t/new") == b"n"
    elif op == "get":
        assert await store.get("t/config", 1, 2) == b"fg"
    elif op == "stat":
        assert await store.stat("t/config") is not None
    elif op == "list":
        assert [i.key async for i in store.list("t/")] == ["t/config"]
    else:
        await store.delete("t/config")
        assert await local_store.stat("t/config") is None
    assert fault.hits == 2


@pytest.mark.parametrize(
    "error",
    [StoreError("denied", site="local"), ObjectNotFound("gone", site="local")],
    ids=["permanent", "missing"],
)
async def test_retry_leaves_other_errors_alone(local_store: LocalStore, error: StoreError) -> None:
    fault = Fault("get", error=error, times=5)
    store = RetryStore(FaultyStore(local_store, [fault]), FAST_RETRY)
    with pytest.raises(type(error)) as info:
        await store.get("t/config")
    assert info.value is error
    assert fault.hits == 1  # tried once, not retried


async def test_retry_gives_up_after_the_policy_attempts(local_store: LocalStore) -> None:
    fault = Fault("put", error=TransientStoreError("down"))
    store = RetryStore(FaultyStore(local_store, [fault]), FAST_RETRY)
    with pytest.raises(TransientStoreError):
        await store.put("t/config", b"x")
    assert fault.hits == FAST_RETRY.attempts
    assert await local_store.stat("t/config") is None


async def test_retry_gives_up_after_the_policy_delay(local_store: LocalStore) -> None:
    fault = Fault("get", error=TransientStoreError("down"))
    policy = RetryPolicy(attempts=1000, max_delay=0.3, initial_wait=0.05, max_wait=0.05)
    store = RetryStore(FaultyStore(local_store, [fault]), policy)
    began = time.monotonic()
    with pytest.raises(TransientStoreError):
        await store.get("t/config")
    assert time.monotonic() - began < 2.0
    assert 1 < fault.hits < 1000


# ---- fault injection ------------------------------------------------------------------------------


async def test_fault_corrupts_reads(local_store: LocalStore) -> None:
    data = bytes(range(256)) * 4
    await local_store.put("t/data/ab/x", data)
    await local_store.put("t/index/y", data)
    fault = Fault("get", key_contains="/data/", corrupt=True, times=2)
    store = FaultyStore(local_store, [fault])
    for _ in range(2):
        bad = await store.get("t/data/ab/x")
        assert len(bad) == len(data) and sum(a != b for a, b in zip(bad, data, strict=True)) == 1
    assert await store.get("t/data/ab/x") == data  # the fault is used up
    assert await store.get("t/index/y") == data  # and never matched other keys
    assert await store.get("t/data/ab/x", 0, 0) == b""  # nothing to corrupt
    assert await local_store.get("t/data/ab/x") == data  # the stored copy is intact


async def test_fault_errors_by_key_and_op(local_store: LocalStore) -> None:
    store = FaultyStore(local_store, [Fault("put", key_contains="snapshots", error=StoreError("no"))])
    await store.put("t/data/ab/x", b"ok")
    with pytest.raises(StoreError, match="no"):
        await store.put("t/snapshots/aa/bb", b"x")
    with pytest.raises(StoreError):
        await store.put("t/snapshots/aa/cc", b"x")  # times=-1: always
    assert await store.get("t/data/ab/x") == b"ok"
    assert store.faults[0].hits == 2 and store.name == local_store.name


async def test_corrupt_copy_is_read_from_another_site(tmp_path: Path) -> None:
    """A site serving flipped bytes: the repository verifies, reads another site and reports the bad copy."""
    a, b = LocalStore("a", tmp_path / "a"), LocalStore("b", tmp_path / "b")
    try:
        keys = await init_repository([a, b], "hr", "passphrase", b"pw", scrypt=ScryptParams(n=2**10))
        layout = Layout("hr")
        name = new_id()
        sealed = seal_object(keys, ObjectType.INDEX, name, encode_index([]))
        for site in (a, b):
            await site.put(layout.key(Handle(Kind.INDEX, name)), sealed)
        repo = await Repository.open("hr", [a, b], "passphrase", b"pw")
        bad_a = FaultyStore(a, [Fault("get", key_contains="/index/", corrupt=True)])
        fallbacks: list[Fallback] = []
        repo = Repository("hr", repo.keys, repo.params, [bad_a, b], fallbacks.append)
        assert await repo.load_index() == {}
        assert [(f.site, f.key) for f in fallbacks] == [("a", f"hr/index/{name}")]
        assert "authentication" in fallbacks[0].error
        only_a = Repository("hr", repo.keys, repo.params, [bad_a])
        with pytest.raises(IntegrityError, match="no site holds an intact copy"):
            await only_a.load_index()
    finally:
        await a.close()
        await b.close()


async def test_a_local_site_without_its_repository_refuses_data(tmp_path: Path) -> None:
    """An unmounted NFS site is an empty directory: data waits in the spool, not on the local disk."""
    from drsvc.core.config import LocalSiteConfig
    from drsvc.core.errors import TransientStoreError
    from drsvc.core.stores.compose import open_site
    from drsvc.core.stores.retry import RetryPolicy

    mount = tmp_path / "mnt"
    mount.mkdir()
    site = open_site("nfs", LocalSiteConfig(type="local", path=mount), RetryPolicy(attempts=1))
    try:
        await site.put("fin/keys/" + "a" * 32, b"{}")  # init's own objects are allowed
        with pytest.raises(TransientStoreError, match="is it mounted"):
            await site.put("fin/data/ab/" + "ab" * 16, b"pack")
        assert not (mount / "fin" / "data").exists()
        await site.put("fin/config", b"{}")
        await site.put("fin/data/ab/" + "ab" * 16, b"pack")
    finally:
        await site.close()
