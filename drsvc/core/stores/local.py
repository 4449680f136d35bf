"""A site that is a local or NFS-mounted directory: the embedded default.

Writes go to a temporary file in the destination directory, are fsync'd, renamed into place, and the
directory is fsync'd, so an object is either absent or complete, across a crash.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from drsvc.core.durable import TMP_PREFIX, fsync_dir, make_dirs, write_file
from drsvc.core.errors import ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.stores import ObjectInfo

T = TypeVar("T")
# no object by that key: nothing there, a directory there, or a file where a directory of the key would be
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class LocalStore:
    def __init__(
        self,
        name: str,
        root: str | Path,
        *,
        threads: int = 4,
        fsync: bool = True,
        require_repository: bool = False,
    ) -> None:
        self.name = name
        self.lock_period: float | None = None  # a directory cannot enforce retention
        self.root = Path(root)
        self.fsync = fsync
        # an NFS site that is not mounted is an empty directory: writing there would fill the local disk and
        # count as a copy. With this, data is written only where the tenant's repository config already is.
        self.require_repository = require_repository
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"local-{name}")

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise StoreError("invalid object key", site=self.name, key=key)
        return self.root / key

    async def _run(self, fn: object, *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)  # type: ignore[arg-type]

    def _error(self, exc: OSError, key: str, what: str) -> StoreError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN):
            return TransientStoreError(f"{what} failed: {exc.strerror}", site=self.name, key=key)
        return StoreError(f"{what} failed: {exc.strerror}", site=self.name, key=key)

    # -- blocking halves --------------------------------------------------------------------------
    def _check_repository(self, key: str) -> None:
        parts = key.split("/")
        if not self.require_repository or len(parts) < 2 or parts[1] in ("config", "keys"):
            return
        if not (self.root / parts[0] / "config").is_file():
            raise TransientStoreError(
                "the site holds no repository for this tenant: is it mounted?",
                site=self.name,
                key=key,
                hint=f"check that {self.root} is mounted and `drsvc init` ran; the data waits in the spool",
            )

    def _put(self, key: str, data: bytes) -> None:
        self._check_repository(key)
        try:
            write_file(self._path(key), data, self.fsync)
        except OSError as exc:
            raise self._error(exc, key, "write") from exc

    def _put_file(self, key: str, src: Path) -> None:
        """A hard link on the same file system (objects are immutable, so sharing is safe), else a copy."""
        self._check_repository(key)
        path = self._path(key)
        try:
            make_dirs(path.parent, self.fsync)
            tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                with open(src, "rb") as fin, open(tmp, "xb") as fout:
                    shutil.copyfileobj(fin, fout, 4 * 1024 * 1024)
                    fout.flush()
                    if self.fsync:
                        os.fsync(fout.fileno())
            os.replace(tmp, path)
            if self.fsync:
                fsync_dir(path.parent)
        except FileNotFoundError as exc:
            if exc.filename == str(src) or exc.filename == src:
                raise ObjectNotFound("source file is missing", site=self.name, key=key) from None
            raise self._error(exc, key, "write") from exc
        except OSError as exc:
            raise self._error(exc, key, "write") from exc

    def _get(self, key: str, offset: int, length: int | None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                if offset:
                    f.seek(offset)
                data = f.read() if length is None else f.read(length)
        except _MISSING:
            raise ObjectNotFound("no such object", site=self.name, key=key) from None
        except OSError as exc:
            raise self._error(exc, key, "read") from exc
        if length is not None and len(data) != length:
            raise StoreError(
                f"short read: {len(data)} of {length} bytes at offset {offset}", site=self.name, key=key
            )
        return data

    def _stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except _MISSING:
            return None
        except OSError as exc:
            raise self._error(exc, key, "stat") from exc
        return ObjectInfo(key, st.st_size) if stat.S_ISREG(st.st_mode) else None  # a directory is no object

    def _list(self, prefix: str) -> list[ObjectInfo]:
        base, _, _ = prefix.rpartition("/")
        top = self.root / base if base else self.root
        out: list[ObjectInfo] = []
        if not top.is_dir():
            return out
        try:
            for dirpath, _dirs, files in os.walk(top):
                rel = os.path.relpath(dirpath, self.root)
                for fname in files:
                    if fname.startswith(TMP_PREFIX):
                        continue
                    key = fname if rel == "." else f"{rel}/{fname}"
                    if key.startswith(prefix):
                        out.append(ObjectInfo(key, os.stat(os.path.join(dirpath, fname)).st_size))
        except OSError as exc:
            raise self._error(exc, prefix, "list") from exc
        return out

    def _delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except _MISSING:
            pass
        except OSError as exc:
            raise self._error(exc, key, "delete") from exc

    # -- protocol ---------------------------------------------------------------------------------
    async def put(self, key: str, data: bytes) -> None:
        await self._run(self._put, key, data)

    async def put_file(self, key: str, path: Path) -> None:
        await self._run(self._put_file, key, path)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data: bytes = await self._run(self._get, key, offset, length)
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        info: ObjectInfo | None = await self._run(self._stat, key)
        return info

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        items: list[ObjectInfo] = await self._run(self._list, prefix)
        for item in items:
            yield item

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"LocalStore({self.name!r}, {str(self.root)!r})"
