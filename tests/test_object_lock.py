"""Object lock on a real SeaweedFS: objects written under COMPLIANCE retention, no delete before it ends.

The buckets here hold objects that no request can remove before their retention ends (that is the point),
so this module runs its own SeaweedFS server: what it locked goes away with the server's directory.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
import urllib3
from conftest import WeedFactory, WeedServer
from helpers import FAST_SCRYPT
from minio.commonconfig import COMPLIANCE, GOVERNANCE
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.objectlockconfig import ObjectLockConfig
from minio.retention import Retention
from minio.versioningconfig import SUSPENDED, VersioningConfig

from drsvc.app import App
from drsvc.core.config import LocalSiteConfig, S3SiteConfig, load_config
from drsvc.core.errors import ObjectLocked, StoreError, TransientStoreError
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.compose import open_site
from drsvc.core.stores.faults import FaultyStore
from drsvc.core.stores.s3 import MULTIPART_PART_SIZE, STREAM_BLOCK, S3Store

DAY = 86400.0


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    factory = WeedFactory(lambda: tmp_path_factory.mktemp("weed-lock"), [])
    try:
        yield factory()
    finally:
        factory.close()


@pytest.fixture
async def stores() -> AsyncIterator[list[ObjectStore]]:
    """Append the stores a test opens; they are closed at teardown."""
    opened: list[ObjectStore] = []
    yield opened
    for store in opened:
        await store.close()


def site_config(server: WeedServer, bucket: str, **kw: Any) -> S3SiteConfig:
    return S3SiteConfig.model_validate(
        {
            "type": "s3",
            "endpoint": server.endpoint,
            "bucket": bucket,
            "secure": False,
            "timeout": 5,
            "access_key": {"value": server.access_key},
            "secret_key": {"value": server.secret_key},
            **kw,
        }
    )


def versions(server: WeedServer, bucket: str, name: str) -> list[tuple[str, bool]]:
    """(version id, is a delete marker) of every version of exactly `name`."""
    listing = server.client().list_objects(bucket, prefix=name, recursive=True, include_version=True)
    return [(str(o.version_id), bool(o.is_delete_marker)) for o in listing if o.object_name == name]


def retention_of(server: WeedServer, bucket: str, name: str) -> Retention:
    retention = server.client().get_object_retention(bucket, name)
    assert retention is not None
    return retention


def assert_locked_for(retention: Retention, period: float, began: float, ended: float) -> None:
    assert retention.mode == COMPLIANCE
    until = retention.retain_until_date.timestamp()
    assert began + period <= until <= ended + period + 1  # rounded up to the second, never down


async def test_put_and_put_file_write_compliance_retention(
    weed: WeedServer, stores: list[ObjectStore], tmp_path: Path
) -> None:
    bucket = weed.make_bucket(object_lock=True)
    store = weed.s3_store(bucket, prefix="site", object_lock=DAY)
    stores.append(store)
    pack = tmp_path / "pack"
    pack.write_bytes(bytes(range(256)) * (3 * STREAM_BLOCK // 256 + 7))  # several streamed blocks
    big = b"m" * (MULTIPART_PART_SIZE + 1)  # a multipart upload

    began = time.time()
    await store.put("t/one", b"hello")
    await store.put_file("t/pack", pack)
    await store.put("t/big", big)
    ended = time.time()

    for key in ("t/one", "t/pack", "t/big"):
        assert_locked_for(retention_of(weed, bucket, f"site/{key}"), DAY, began, ended)
    assert await store.get("t/one") == b"hello"
    assert await store.get("t/pack") == pack.read_bytes()
    info = await store.stat("t/big")
    assert info is not None and info.size == len(big)


async def test_a_locked_object_cannot_be_deleted_through_the_store(
    weed: WeedServer, stores: list[ObjectStore]
) -> None:
    bucket = weed.make_bucket(object_lock=True)
    seen: list[tuple[str, str, str | None]] = []
    wrapped = open_site(
        "vault",
        site_config(weed, bucket, object_lock="30d"),
        observer=lambda site, op, _, error: seen.append((site, op, error)),
    )
    stores.append(wrapped)
    await wrapped.put("t/record", b"recovery point")
    until = retention_of(weed, bucket, "t/record").retain_until_date

    with pytest.raises(ObjectLocked) as caught:
        await wrapped.delete("t/record")
    err = caught.value
    assert not isinstance(err, TransientStoreError)
    assert err.fields["site"] == "vault" and err.fields["key"] == "t/record"
    assert err.until is not None and datetime.fromisoformat(err.until) == until
    assert err.until in err.hint and "COMPLIANCE" in str(err)
    # one attempt only: the retry wrapper does not retry a lock, and reports what it was
    assert [s for s in seen if s[1] == "delete"] == [("vault", "delete", "ObjectLocked")]

    # the object is whole, readable and current: no delete marker hides it
    assert await wrapped.get("t/record") == b"recovery point"
    assert [v for v in versions(weed, bucket, "t/record") if v[1]] == []
    assert len(versions(weed, bucket, "t/record")) == 1

    # the bare store refuses the same way
    bare = weed.s3_store(bucket, name="vault", object_lock=30 * DAY)
    stores.append(bare)
    with pytest.raises(ObjectLocked):
        await bare.delete("t/record")
    assert await bare.get("t/record") == b"recovery point"


async def test_deleting_a_locked_object_removes_the_delete_marker_that_hid_it(
    weed: WeedServer, stores: list[ObjectStore]
) -> None:
    """Anyone with the credentials can hide a locked object behind a delete marker (a plain DELETE); the
    store's delete removes every version it may, so the object is readable again."""
    bucket = weed.make_bucket(object_lock=True)
    store = weed.s3_store(bucket, object_lock=DAY)
    stores.append(store)
    await store.put("t/record", b"recovery point")
    weed.client().remove_object(bucket, "t/record")  # no version: adds a delete marker
    assert await store.stat("t/record") is None

    with pytest.raises(ObjectLocked):
        await store.delete("t/record")
    assert await store.get("t/record") == b"recovery point"
    assert [marker for _, marker in versions(weed, bucket, "t/record")] == [False]


async def test_an_object_whose_retention_has_passed_is_deleted_permanently(
    weed: WeedServer, stores: list[ObjectStore]
) -> None:
    bucket = weed.make_bucket(object_lock=True)
    store = open_site("short", site_config(weed, bucket, object_lock="2s"))
    stores.append(store)
    await store.put("t/a", b"first")
    await store.put("t/a", b"first")  # written twice: two versions, both locked
    await store.put("t/ab", b"a neighbour whose name starts alike")
    weed.client().remove_object(bucket, "t/a")  # and a delete marker on top
    assert len(versions(weed, bucket, "t/a")) == 3
    with pytest.raises(ObjectLocked):
        await store.delete("t/a")

    until = max(retention_of(weed, bucket, k).retain_until_date for k in ("t/a", "t/ab"))
    await asyncio.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.5)
    await store.delete("t/a")
    assert versions(weed, bucket, "t/a") == []  # gone for good, not hidden
    assert await store.stat("t/a") is None
    assert await store.get("t/ab") == b"a neighbour whose name starts alike"
    await store.delete("t/a")  # a missing key: nothing to do
    await store.delete("t/never-written")


async def test_a_bucket_without_object_lock_is_refused_and_nothing_is_written(
    weed: WeedServer, stores: list[ObjectStore], tmp_path: Path
) -> None:
    bucket = weed.make_bucket()
    store = open_site("plain", site_config(weed, bucket, object_lock="30d"))
    stores.append(store)
    (tmp_path / "f").write_bytes(b"data")
    attempts: list[Callable[[], Any]] = [
        lambda: store.put("t/x", b"data"),
        lambda: store.put_file("t/x", tmp_path / "f"),
        lambda: store.delete("t/x"),
    ]
    for attempt in attempts:
        with pytest.raises(StoreError) as caught:
            await attempt()
        err = caught.value
        assert type(err) is StoreError  # permanent, and not a lock
        assert err.fields["site"] == "plain" and err.fields["bucket"] == bucket
        assert "object lock" in err.message and bucket in err.message
        assert "create" in err.hint and "object_lock" in err.hint
    assert list(weed.client().list_objects(bucket, recursive=True)) == []


async def test_create_bucket_with_object_lock_creates_a_lock_enabled_bucket(
    weed: WeedServer, stores: list[ObjectStore]
) -> None:
    bucket = f"new-locked-{time.time_ns()}"
    store = weed.s3_store(bucket, create_bucket=True, object_lock=60.0)
    stores.append(store)
    began = time.time()
    await store.put("t/x", b"data")
    client = weed.client()
    client.get_object_lock_config(bucket)  # raises ObjectLockConfigurationNotFoundError without lock
    assert client.get_bucket_versioning(bucket).status == "Enabled"
    assert_locked_for(retention_of(weed, bucket, "t/x"), 60.0, began, time.time())


async def test_lock_period_is_visible_through_every_wrapper(weed: WeedServer, tmp_path: Path) -> None:
    cfg = site_config(weed, "any-bucket", object_lock="30d", bandwidth="10MiB")
    wrapped = open_site("vault", cfg, observer=lambda *_: None)  # retry, throttle and metering wrappers
    local = open_site("disk", LocalSiteConfig(type="local", path=tmp_path / "site"))
    unlocked = open_site("open", site_config(weed, "any-bucket"))
    try:
        assert isinstance(wrapped, ObjectStore) and isinstance(local, ObjectStore)
        assert wrapped.lock_period == 30 * DAY
        assert FaultyStore(wrapped).lock_period == 30 * DAY
        layer: Any = wrapped
        while hasattr(layer, "inner"):  # every layer down to the S3 store says the same
            layer = layer.inner
            assert layer.lock_period == 30 * DAY
        assert isinstance(layer, S3Store)
        assert local.lock_period is None and FaultyStore(local).lock_period is None
        assert unlocked.lock_period is None
    finally:
        for store in (wrapped, local, unlocked):
            await store.close()


def test_a_local_site_refuses_object_lock(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        LocalSiteConfig.model_validate({"type": "local", "path": str(tmp_path), "object_lock": "30d"})
    assert "object_lock" in str(caught.value) and "cannot lock objects" in str(caught.value)


def test_check_says_which_sites_lock_objects(
    weed: WeedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from drsvc.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(
        f'[state]\ndir = "{tmp_path}/state"\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sites.local1]\ntype = "local"\npath = "{tmp_path}/sites/local1"\n'
        f'[sites.s3a]\ntype = "s3"\nendpoint = "{weed.endpoint}"\nbucket = "check-{time.time_ns()}"\n'
        'secure = false\ncreate_bucket = true\nobject_lock = "30d"\n'
        f'access_key = {{ value = "{weed.access_key}" }}\nsecret_key = {{ value = "{weed.secret_key}" }}\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{src}"\nsites = ["local1", "s3a"]\n'
    )

    async def init() -> None:
        async with App(load_config(cfg), workers=1) as app:
            await app.init_tenant("fin", FAST_SCRYPT)

    asyncio.run(init())
    capsys.readouterr()
    assert main(["-c", str(cfg), "check", "fin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "site s3a: object lock COMPLIANCE 30d" in lines
    assert "site local1: no object lock (objects can be deleted by anyone with access to the site)" in lines


def test_seaweedfs_enforces_compliance_retention(weed: WeedServer) -> None:
    """What the store relies on, measured on the server itself (a canary for SeaweedFS upgrades)."""
    client = weed.client()
    bucket = weed.make_bucket(object_lock=True)
    until = datetime.now(UTC) + timedelta(days=1)
    version = client.put_object(bucket, "k", io.BytesIO(b"v"), 1, retention=Retention(COMPLIANCE, until))
    vid = version.version_id
    assert vid

    def refused(call: Callable[[], object]) -> str:
        with pytest.raises(S3Error) as caught:
            call()
        return str(caught.value.code)

    # no delete of the version, single or batch, with or without the governance bypass (the test identity
    # is an Admin, which may bypass GOVERNANCE: not COMPLIANCE)
    assert refused(lambda: client.remove_object(bucket, "k", version_id=vid)) == "AccessDenied"
    errors = list(client.remove_objects(bucket, [DeleteObject("k", vid)], bypass_governance_mode=True))
    assert [e.code for e in errors] == ["AccessDenied"]
    # no shortening, no weaker mode, no switching versioning off, no removing the bucket
    sooner = datetime.now(UTC) + timedelta(seconds=5)
    assert refused(lambda: client.set_object_retention(bucket, "k", Retention(COMPLIANCE, sooner), vid))
    assert refused(lambda: client.set_object_retention(bucket, "k", Retention(GOVERNANCE, until), vid))
    assert refused(lambda: client.set_bucket_versioning(bucket, VersioningConfig(SUSPENDED)))
    assert refused(lambda: client.remove_bucket(bucket)) == "BucketNotEmpty"
    assert versions(weed, bucket, "k") == [(vid, False)]

    # lock headers must be signed: a presigned URL with them unsigned is refused, and with them in its
    # query the object is stored without retention (why the store signs its streamed PUT's headers)
    lock = {
        "x-amz-object-lock-mode": COMPLIANCE,
        "x-amz-object-lock-retain-until-date": f"{until:%Y-%m-%dT%H:%M:%SZ}",
    }
    http = urllib3.PoolManager()
    url = client.presigned_put_object(bucket, "unsigned")
    assert http.request("PUT", url, body=b"v", headers=lock).status == 403
    url = client.get_presigned_url("PUT", bucket, "in-query", extra_query_params=dict(lock))
    assert http.request("PUT", url, body=b"v").status == 200
    no_retention = refused(lambda: client.get_object_retention(bucket, "in-query"))
    assert no_retention == "ObjectLockConfigurationNotFoundError"
    http.clear()

    # object lock cannot be switched on for a bucket made without it
    plain = weed.make_bucket()
    enable = ObjectLockConfig(None, None, None)
    assert refused(lambda: client.set_object_lock_config(plain, enable)) == "InvalidBucketState"
