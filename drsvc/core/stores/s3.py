"""A site that is an S3-compatible bucket (plus prefix), reached with the minio SDK.

The SDK blocks, so every call runs in this store's own bounded thread pool; the pool size is the site's
request concurrency. urllib3's own retries are off: retrying is the RetryStore's job, and a site that is
down must fail fast so that the others go on.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from drsvc.core.errors import ObjectNotFound, StoreError, TransientStoreError
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
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.create_bucket = create_bucket
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
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"s3-{name}")
        self._bucket_checked = not create_bucket

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
        if self._bucket_checked:
            return

        def make() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await self._run(self.bucket, "create bucket", make)
        self._bucket_checked = True

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
                    )
                    return
                self._stream_put(key, f, size)

        await self._run(key, "put", upload)

    def _stream_put(self, key: str, f: io.BufferedReader, size: int) -> None:
        """One PUT whose body is read from the file as it is sent (a presigned URL: the payload is not
        hashed up front), so an upload holds kilobytes, not the whole pack, in memory."""
        url = self._client.presigned_put_object(self.bucket, self._full(key), expires=timedelta(hours=1))

        # The body is not signed or checksummed on the wire: a copy damaged in transit is still sealed and
        # authenticated, so `check --read-data`, restores (which fall back to another site) and the scrubber
        # detect it. An MD5 checked against the ETag cost 0.25x of the 2-site throughput (benchmarks).
        def chunks() -> Iterator[bytes]:  # 1 MiB sends: http.client would send a file in 8 KiB blocks
            while block := f.read(STREAM_BLOCK):
                yield block

        resp = self._http.request(
            "PUT", url, body=chunks(), headers={"Content-Length": str(size)}, retries=False, chunked=False
        )
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
        raise StoreError(f"put: {code}", site=self.name, key=key)

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
        await self._run(key, "delete", self._client.remove_object, self.bucket, self._full(key))

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"S3Store({self.name!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"
