"""The one place where a site's store and its wrappers are stacked."""

from __future__ import annotations

from drsvc.core.config import LocalSiteConfig, S3SiteConfig
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.metered import MeteredStore, Observer
from drsvc.core.stores.retry import RetryPolicy, RetryStore
from drsvc.core.stores.throttle import ThrottleStore, TokenBucket


def open_site(
    name: str,
    cfg: LocalSiteConfig | S3SiteConfig,
    retry: RetryPolicy | None = None,
    observer: Observer | None = None,
) -> ObjectStore:
    """The store for a configured site: the backend, wrapped in retries of transient errors. With an
    `observer`, every attempt under the retries is timed and reported (``MeteredStore``); with a
    `bandwidth`, the bytes each attempt moves are limited by a token bucket (``ThrottleStore``)."""
    inner: ObjectStore
    if isinstance(cfg, LocalSiteConfig):
        inner = LocalStore(name, cfg.path, fsync=cfg.fsync, require_repository=True)
    else:
        from drsvc.core.stores.s3 import S3Store  # minio takes ~90 ms to import: only when a site needs it

        inner = S3Store(
            name,
            cfg.endpoint,
            cfg.bucket,
            access_key=cfg.access_key.read_text(f"sites.{name}.access_key"),
            secret_key=cfg.secret_key.read_text(f"sites.{name}.secret_key"),
            prefix=cfg.prefix,
            secure=cfg.secure,
            region=cfg.region,
            concurrency=cfg.concurrency,
            timeout=cfg.timeout,
            create_bucket=cfg.create_bucket,
            object_lock=cfg.object_lock,
        )
    if observer is not None:
        inner = MeteredStore(inner, observer)
    if cfg.bandwidth:
        inner = ThrottleStore(inner, TokenBucket(cfg.bandwidth))
    return RetryStore(inner, retry or RetryPolicy())
