"""A site that is an S3-compatible bucket (plus prefix), reached with the minio SDK.

The SDK blocks, so every call runs in this store's own bounded thread pool; the pool size is the site's
request concurrency. urllib3's own retries are off: retrying is the RetryStore's job, and a site that is
down must fail fast so that the others go on.

Object lock (``object_lock`` seconds): the bucket must have object lock enabled (checked once, before the
first write or delete; ``create_bucket`` creates it so), and every object is written with COMPLIANCE
retention until now + ``object_lock``. Such a bucket is versioned, so a plain DELETE would only hide the data
behind a delete marker: ``delete`` removes every version of the key instead, and a version still under
retention raises ObjectLocked.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import COMPLIANCE
from minio.credentials.credentials import Credentials
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.retention import Retention
from minio.signer import sign_v4_s3
from minio.time import to_amz_date, to_iso8601utc

from drsvc.core.errors import ObjectLocked, ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.stores import ObjectInfo

T = TypeVar("T")

MULTIPART_PART_SIZE = 16 * 1024 * 1024
STREAM_PUT_MAX = 1024 * 1024 * 1024  # files up to this go up in one streamed PUT
STREAM_BLOCK = 1024 * 1024
_TRANSIENT_CODES = {
    "InternalError",
    "SlowDown",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}
_NO_LOCK_CODES = {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"}
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class S3Store:
    def __init__(
        self,
        name: str,
        endpoint: str,
        bucket: str,
        *,
        access_key: str,
        secret_key: str,
        prefix: str = "",
        secure: bool = False,
        region: str | None = None,
        concurrency: int = 8,
        timeout: float = 30.0,
        create_bucket: bool = False,
        object_lock: float | None = None,
    ) -> None:
        if object_lock is not None and object_lock <= 0:
            raise ValueError(f"object_lock must be a positive number of seconds, not {object_lock}")
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.create_bucket = create_bucket
        self.lock_period = object_lock
        http = urllib3.PoolManager(
            num_pools=2,
            maxsize=concurrency,
            timeout=urllib3.Timeout(connect=min(5.0, timeout), read=timeout),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, raise_on_status=False),
        )
        self._http = http
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._credentials = Credentials(access_key, secret_key)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"s3-{name}")
        self._bucket_checked = not create_bucket and object_lock is None

    async def _run(self, key: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args))
        except StoreError:
            raise
        except S3Error as exc:
            raise self._s3_error(exc, key, what) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise TransientStoreError(f"{what}: {exc}", site=self.name, key=key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientStoreError(
                f"{what}: {type(exc).__name__}: {exc}", site=self.name, key=key
            ) from exc
        except MinioException as exc:
            raise StoreError(f"{what}: {exc}", site=self.name, key=key) from exc

    def _s3_error(self, exc: S3Error, key: str, what: str) -> StoreError:
        if exc.code in _NOT_FOUND_CODES:
            return ObjectNotFound("no such object", site=self.name, key=key)
        status = exc.response.status if exc.response is not None else 0
        if exc.code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStoreError(f"{what}: {exc.code}: {exc.message}", site=self.name, key=key)
        if exc.code == "NoSuchBucket":
            cls = ObjectNotFound if what in ("get", "stat") else StoreError  # no bucket holds no objects
            return cls(
                f"{what}: bucket {self.bucket!r} does not exist",
                site=self.name,
                key=key,
                hint="create the bucket or set create_bucket = true for the site",
            )
        if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(
                f"{what}: {exc.code}", site=self.name, key=key, hint="check the site's access key and secret"
            )
        return StoreError(f"{what}: {exc.code}: {exc.message}", site=self.name, key=key)

    async def _ensure_bucket(self) -> None:
        """Once, before the first write or delete: create the bucket (with `create_bucket`; with object lock
        enabled if the site locks), and check that a locking site's bucket has object lock enabled."""
        if self._bucket_checked:
            return
        if self.create_bucket:
            await self._run(self.bucket, "create bucket", self._make_bucket)
        if self.lock_period is not None:
            await self._run(self.bucket, "check object lock", self._check_lock)
        self._bucket_checked = True

    def _make_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            try:
                self._client.make_bucket(self.bucket, object_lock=self.lock_period is not None)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _check_lock(self) -> None:
        try:
            self._client.get_object_lock_config(self.bucket)
        except S3Error as exc:
            if exc.code not in _NO_LOCK_CODES:
                raise
            raise StoreError(
                f"bucket {self.bucket!r} does not have object lock enabled, but the site sets object_lock: "
                "nothing is written unlocked",
                site=self.name,
                bucket=self.bucket,
                hint="object lock can only be enabled when a bucket is created: point the site at a new "
                "bucket created with object lock (create_bucket = true does it, or `aws s3api create-bucket "
                "--object-lock-enabled-for-bucket`), or remove object_lock from the site",
            ) from exc

    def _retain_until(self) -> datetime | None:
        """Now + the lock period, rounded up to a whole second (SeaweedFS keeps whole seconds)."""
        if self.lock_period is None:
            return None
        return datetime.fromtimestamp(math.ceil(time.time() + self.lock_period), UTC)

    def _retention(self) -> Retention | None:
        until = self._retain_until()
        return None if until is None else Retention(COMPLIANCE, until)

    def _full(self, key: str) -> str:
        return self.prefix + key

    async def put(self, key: str, data: bytes) -> None:
        await self._ensure_bucket()
        await self._run(
            key,
            "put",
            lambda: self._client.put_object(
                self.bucket,
                self._full(key),
                io.BytesIO(data),
                len(data),
                part_size=MULTIPART_PART_SIZE,
                num_parallel_uploads=1,
                retention=self._retention(),
            ),
        )

    async def put_file(self, key: str, path: Path) -> None:
        await self._ensure_bucket()

        def upload() -> None:
            try:
                f = open(path, "rb")  # closed by the with below
            except FileNotFoundError:
                raise ObjectNotFound("source file is missing", site=self.name, key=key) from None
            with f:
                size = os.fstat(f.fileno()).st_size
                if size > STREAM_PUT_MAX:  # beyond one PUT: multipart, one part in memory at a time
                    self._client.put_object(
                        self.bucket,
                        self._full(key),
                        f,
                        size,
                        part_size=MULTIPART_PART_SIZE,
                        num_parallel_uploads=1,
                        retention=self._retention(),
                    )
                    return
                self._stream_put(key, f, size)

        await self._run(key, "put", upload)

    def _stream_put(self, key: str, f: io.BufferedReader, size: int) -> None:
        """One PUT whose body is read from the file as it is sent (signed headers, UNSIGNED-PAYLOAD: the
        payload is not hashed up front), so an upload holds kilobytes, not the whole pack, in memory."""
        headers = {"Content-Length": str(size)}
        until = self._retain_until()
        if until is not None:
            headers["x-amz-object-lock-mode"] = COMPLIANCE
            headers["x-amz-object-lock-retain-until-date"] = str(to_iso8601utc(until))
        url, headers = self._signed_put(key, headers)

        # The body is not signed or checksummed on the wire: a copy damaged in transit is still sealed and
        # authenticated, so `check --read-data`, restores (which fall back to another site) and the scrubber
        # detect it. An MD5 checked against the ETag cost 0.25x of the 2-site throughput (benchmarks).
        # SeaweedFS takes the lock headers without a Content-MD5 (tests/test_object_lock.py); AWS S3 refuses
        # a lock PUT without Content-MD5 or x-amz-checksum-* (InvalidRequest, reported with its message).
        def chunks() -> Iterator[bytes]:  # 1 MiB sends: http.client would send a file in 8 KiB blocks
            while block := f.read(STREAM_BLOCK):
                yield block

        resp = self._http.request("PUT", url, body=chunks(), headers=headers, retries=False, chunked=False)
        if resp.status < 300:
            return
        text = resp.data.decode(errors="replace")
        code = (
            text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else f"HTTP {resp.status}"
        )
        if resp.status >= 500 or resp.status == 429 or code in _TRANSIENT_CODES:
            raise TransientStoreError(f"put: {code}", site=self.name, key=key)
        if code == "NoSuchBucket":
            raise StoreError(
                f"put: bucket {self.bucket!r} does not exist",
                site=self.name,
                key=key,
                hint="create the bucket or set create_bucket = true for the site",
            )
        message = text.split("<Message>", 1)[1].split("</Message>", 1)[0] if "<Message>" in text else ""
        raise StoreError(f"put: {code}" + (f": {message}" if message else ""), site=self.name, key=key)

    def _signed_put(self, key: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The URL and SigV4-signed headers of a PUT of `key` whose body is not hashed. Every header is
        signed: SeaweedFS (like AWS) refuses x-amz-object-lock-* headers that a presigned URL leaves unsigned,
        and ignores them when moved into a presigned URL's query. The SDK's presigned URL gives the address
        and the region (from its credential scope) the SDK resolved for the bucket."""
        presigned = urlsplit(
            self._client.presigned_put_object(self.bucket, self._full(key), timedelta(hours=1))
        )
        region = parse_qs(presigned.query)["X-Amz-Credential"][0].split("/")[2]
        url = presigned._replace(query="")
        date = datetime.now(UTC)
        signed = sign_v4_s3(
            method="PUT",
            url=url,
            region=region,
            headers={
                **headers,
                "Host": url.netloc,
                "x-amz-content-sha256": UNSIGNED_PAYLOAD,
                "x-amz-date": to_amz_date(date),
            },
            credentials=self._credentials,
            content_sha256=UNSIGNED_PAYLOAD,
            date=date,
        )
        return url.geturl(), {k: str(v) for k, v in signed.items()}

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""

        def fetch() -> bytes:
            resp = self._client.get_object(self.bucket, self._full(key), offset=offset, length=length or 0)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        data = await self._run(key, "get", fetch)
        if length is not None and len(data) != length:
            raise StoreError(
                f"short read: {len(data)} of {length} bytes at offset {offset}", site=self.name, key=key
            )
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            obj = await self._run(key, "stat", self._client.stat_object, self.bucket, self._full(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(obj.size or 0))

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        def collect() -> list[ObjectInfo]:
            cut = len(self.prefix)
            try:
                return [
                    ObjectInfo(o.object_name[cut:], int(o.size or 0))
                    for o in self._client.list_objects(self.bucket, prefix=self._full(prefix), recursive=True)
                    if o.object_name and not o.is_dir
                ]
            except S3Error as exc:
                if exc.code == "NoSuchBucket":  # an absent bucket holds no objects
                    return []
                raise

        items = await self._run(prefix, "list", collect)
        for item in items:
            yield item

    async def delete(self, key: str) -> None:
        if self.lock_period is None:
            await self._run(key, "delete", self._client.remove_object, self.bucket, self._full(key))
            return
        await self._ensure_bucket()
        await self._run(key, "delete", self._delete_versions, key)

    def _delete_versions(self, key: str) -> None:
        """Remove every version of exactly `key` (delete markers included): on a lock-enabled bucket, which
        is versioned, that is what removes the data. Versions under retention stay, and raise ObjectLocked
        naming the latest retain-until date once the others are gone."""
        full = self._full(key)
        versions = [
            o.version_id
            for o in self._client.list_objects(self.bucket, prefix=full, recursive=True, include_version=True)
            if o.object_name == full
        ]
        locked: list[datetime] = []
        for version in versions:
            try:  # "null" names the version written while versioning was off (a lock bucket has none)
                self._client.remove_object(self.bucket, full, version_id=version or "null")
            except S3Error as exc:
                if exc.code != "AccessDenied":  # a locked version is refused as AccessDenied
                    raise
                until = self._locked_until(full, version or "null")
                if until is None:  # not under retention: a real permission problem
                    raise
                locked.append(until)
        if locked:
            raise ObjectLocked(
                f"delete refused: {len(locked)} of {len(versions)} versions are under COMPLIANCE retention",
                site=self.name,
                key=key,
                until=max(locked).astimezone(UTC).isoformat(),
            )

    def _locked_until(self, full: str, version: str) -> datetime | None:
        """The retain-until date of a version that is still under retention, or None."""
        try:
            retention = self._client.get_object_retention(self.bucket, full, version_id=version)
        except S3Error:
            return None
        if retention is None or retention.retain_until_date is None:
            return None
        until: datetime = retention.retain_until_date
        return until if until > datetime.now(UTC) else None

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"S3Store({self.name!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"
