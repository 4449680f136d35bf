"""MeteredStore: every request timed and reported, failed attempts under the retries counted one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from drsvc.core.config import LocalSiteConfig
from drsvc.core.errors import ObjectNotFound, StoreError, TransientStoreError
from drsvc.core.stores import ObjectStore
from drsvc.core.stores.compose import open_site
from drsvc.core.stores.faults import Fault, FaultyStore
from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.metered import MeteredStore, Observer
from drsvc.core.stores.retry import RetryPolicy, RetryStore
from drsvc.metrics import Metrics
from drsvc.supervisor import Supervisor

Seen = list[tuple[str, str, float, str | None]]


def _recorder() -> tuple[Seen, Observer]:
    seen: Seen = []

    def observe(site: str, op: str, seconds: float, error: str | None) -> None:
        seen.append((site, op, seconds, error))

    return seen, observe


async def test_each_operation_is_timed_and_reported(tmp_path: Path) -> None:
    seen, observe = _recorder()
    store = MeteredStore(LocalStore("a", tmp_path / "a"), observe)
    assert isinstance(store, ObjectStore) and store.name == "a"
    try:
        await store.put("k/one", b"hello")
        (tmp_path / "f").write_bytes(b"from a file")
        await store.put_file("k/two", tmp_path / "f")
        assert await store.get("k/one") == b"hello"
        assert (await store.stat("k/two")) is not None
        assert await store.stat("k/none") is None  # a missing object is an answer, not an error
        assert sorted([i.key async for i in store.list("k/")]) == ["k/one", "k/two"]
        await store.delete("k/one")
        with pytest.raises(ObjectNotFound):
            await store.get("k/one")
    finally:
        await store.close()
    assert [(s, op, err) for s, op, _, err in seen] == [
        ("a", "put", None),
        ("a", "put", None),  # put_file counts as a put
        ("a", "get", None),
        ("a", "stat", None),
        ("a", "stat", None),
        ("a", "list", None),
        ("a", "delete", None),
        ("a", "get", "ObjectNotFound"),
    ]
    assert all(seconds > 0 for _, _, seconds, _ in seen)


async def test_scripted_errors_are_reported_by_kind(tmp_path: Path) -> None:
    seen, observe = _recorder()
    faulty = FaultyStore(
        LocalStore("b", tmp_path / "b"),
        [
            Fault("put", error=TransientStoreError("timed out", site="b"), times=1),
            Fault("get", error=StoreError("access denied", site="b"), times=1),
            Fault("list", error=TransientStoreError("reset", site="b"), times=1),
        ],
    )
    store = MeteredStore(faulty, observe)
    try:
        with pytest.raises(TransientStoreError):
            await store.put("x", b"1")
        await store.put("x", b"1")
        with pytest.raises(StoreError):
            await store.get("x")
        with pytest.raises(TransientStoreError):
            [i async for i in store.list("")]
        assert [i.key async for i in store.list("")] == ["x"]
    finally:
        await store.close()
    assert [(op, err) for _, op, _, err in seen] == [
        ("put", "TransientStoreError"),
        ("put", None),
        ("get", "StoreError"),
        ("list", "TransientStoreError"),
        ("list", None),
    ]
    assert all(site == "b" and seconds > 0 for site, _, seconds, _ in seen)


async def test_open_site_meters_each_attempt_under_the_retries(tmp_path: Path) -> None:
    seen, observe = _recorder()
    cfg = LocalSiteConfig(type="local", path=tmp_path / "c")
    store = open_site("c", cfg, RetryPolicy(initial_wait=0.001, max_wait=0.01), observer=observe)
    assert isinstance(store, RetryStore) and isinstance(store.inner, MeteredStore)
    metered = store.inner
    metered.inner = FaultyStore(  # faults under the meter: what a flaky site answers
        metered.inner, [Fault("put", error=TransientStoreError("503", site="c"), times=2)]
    )
    try:
        await store.put("k", b"data")  # two failed attempts, then one that succeeds
        assert await store.get("k") == b"data"
    finally:
        await store.close()
    assert [(op, err) for _, op, _, err in seen] == [
        ("put", "TransientStoreError"),
        ("put", "TransientStoreError"),
        ("put", None),
        ("get", None),
    ]
    plain = open_site("c", cfg)
    assert isinstance(plain, RetryStore) and isinstance(plain.inner, LocalStore)  # no observer, no meter
    await plain.close()


async def test_the_supervisor_turns_observations_into_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    observe = Supervisor.request_observer(metrics)
    observe("a", "put", 0.02, None)
    observe("a", "put", 0.5, "TransientStoreError")
    observe("a", "get", 0.01, "ObjectNotFound")  # an answer: timed, not counted as a failure
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics.render()[0].decode())
        for s in fam.samples
    }
    assert samples[("drsvc_site_request_seconds_count", (("op", "put"), ("site", "a")))] == 2
    assert samples[("drsvc_site_request_seconds_count", (("op", "get"), ("site", "a")))] == 1
    assert samples[("drsvc_site_errors_total", (("kind", "TransientStoreError"), ("site", "a")))] == 1
    assert not any(k[0] == "drsvc_site_errors_total" and ("kind", "ObjectNotFound") in k[1] for k in samples)


async def test_a_daemon_pass_with_the_observer_fills_the_request_metrics(tmp_path: Path) -> None:
    from helpers import FAST_SCRYPT, local_sites, make_config
    from prometheus_client.parser import text_string_to_metric_families

    from drsvc.app import App

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n" * 1000)
    metrics = Metrics()
    app = App(
        make_config(tmp_path, src, local_sites(tmp_path, ["a"])),
        workers=2,
        observer=Supervisor.request_observer(metrics),
    )
    try:
        await app.init_tenant("fin", FAST_SCRYPT)
        await Supervisor(app, metrics).run_once()
    finally:
        await app.close()
    counts = {
        s.labels["op"]: s.value
        for fam in text_string_to_metric_families(metrics.render()[0].decode())
        for s in fam.samples
        if s.name == "drsvc_site_request_seconds_count" and s.labels["site"] == "a"
    }
    assert counts["put"] >= 3  # key slot and config, a pack, an index, the snapshot record
    assert counts["get"] >= 1
