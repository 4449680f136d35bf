"""The bandwidth limit: a token bucket per site, checked on virtual time, and its place in the stack."""

from __future__ import annotations

from pathlib import Path

from drsvc.core.config import LocalSiteConfig
from drsvc.core.stores.compose import open_site
from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.throttle import ThrottleStore, TokenBucket


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_long_run_rate_is_the_configured_one(tmp_path: Path) -> None:
    t = VirtualTime()
    bucket = TokenBucket(1_000_000, clock=t.clock, sleep=t.sleep)  # 1 MB/s, one second of burst
    store = ThrottleStore(LocalStore("a", tmp_path), bucket)
    for i in range(10):
        await store.put(f"t/data/aa/{i:032x}", b"x" * 500_000)  # 5 MB in all
    # the first second's worth goes at once; the remaining 4 MB take 4 s (the last put leaves a debt)
    assert 3.4 <= t.now <= 4.1, t.now
    src = tmp_path / "pack"
    src.write_bytes(b"y" * 3_000_000)
    before = t.now
    await store.put_file("t/data/bb/" + "b" * 32, src)  # larger than the bucket: let through, in debt
    await store.get("t/data/bb/" + "b" * 32, 0, 10)
    assert t.now - before >= 2.4  # the get waited out the pack's debt
    assert await store.get("t/data/bb/" + "b" * 32) == src.read_bytes()


async def test_open_site_stacks_the_throttle_only_when_configured(tmp_path: Path) -> None:
    plain = open_site("a", LocalSiteConfig(type="local", path=tmp_path))
    limited = open_site("a", LocalSiteConfig(type="local", path=tmp_path, bandwidth="20MiB"))  # type: ignore[arg-type]
    try:
        assert not isinstance(plain.inner, ThrottleStore)  # type: ignore[attr-defined]
        assert isinstance(limited.inner, ThrottleStore)  # type: ignore[attr-defined]
        assert limited.inner.bucket.rate == 20 * 1024 * 1024  # type: ignore[attr-defined]
    finally:
        await plain.close()
        await limited.close()
