"""The HTTP endpoint (healthz, readyz, metrics, JSON errors), Metrics, serve() and parse_listen()."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from drsvc.http import HealthChecks, make_app, parse_listen, serve
from drsvc.metrics import Metrics

NOW = 1_700_000_000.0

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class FakeHealth:
    """A daemon's health as plain fields the test flips."""

    is_alive: bool = True
    reasons: list[str] = field(default_factory=list)
    fail_with: Exception | None = None

    def alive(self) -> bool:
        if self.fail_with is not None:
            raise self.fail_with
        return self.is_alive

    def ready(self) -> tuple[bool, list[str]]:
        if self.fail_with is not None:
            raise self.fail_with
        return not self.reasons, list(self.reasons)


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Factory: an in-process server and client for make_app(...); every one is closed at teardown."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(
        metrics: Metrics | None = None, health: FakeHealth | None = None, now: float = NOW
    ) -> TestClient[web.Request, web.Application]:
        app = make_app(metrics or Metrics(version="test"), health or FakeHealth(), clock=lambda: now)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample called ``name`` whose labels include ``labels``, or None."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def rendered(metrics: Metrics) -> str:
    return metrics.render()[0].decode()


# -- healthz / readyz / errors ------------------------------------------------------------------------------


async def test_healthz_ok_then_dead(make_client: ClientFactory) -> None:
    health = FakeHealth()
    client = await make_client(health=health)
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    health.is_alive = False
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "dead"


async def test_readyz_flips_from_503_with_reasons_to_200(make_client: ClientFactory) -> None:
    reasons = ["config not loaded", "only 1 of min_copies 2 sites reachable for source t1/db"]
    health = FakeHealth(reasons=list(reasons))
    client = await make_client(health=health)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.content_type == "application/json"
    assert await resp.json() == {"ready": False, "reasons": reasons}

    health.reasons.clear()
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"ready": True}


async def test_a_raising_check_is_not_alive_and_not_ready(make_client: ClientFactory) -> None:
    client = await make_client(health=FakeHealth(fail_with=RuntimeError("state db closed")))
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert "state db closed" in (await resp.json())["error"]
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["ready"] is False
    assert "state db closed" in body["reasons"][0]


async def test_health_checks_of_callables_fit_make_app() -> None:
    app = make_app(Metrics(version="test"), HealthChecks(lambda: True, lambda: (False, ["state not open"])))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {"ready": False, "reasons": ["state not open"]}


async def test_unknown_path_is_json_404(make_client: ClientFactory) -> None:
    client = await make_client()
    resp = await client.get("/nope/x?y=1")
    assert resp.status == 404
    assert await resp.json() == {"error": "not found", "path": "/nope/x"}


async def test_wrong_method_is_json_405(make_client: ClientFactory) -> None:
    client = await make_client()
    resp = await client.post("/metrics")
    assert resp.status == 405
    body = await resp.json()
    assert body["error"] == "method not allowed"
    assert "GET" in body["allowed"]
    assert "GET" in resp.headers["Allow"]


# -- /metrics ----------------------------------------------------------------------------------------------


async def test_metrics_endpoint_shows_every_helper(make_client: ClientFactory) -> None:
    m = Metrics(version="9.9.9")
    m.source_snapshot("t1", "db", "ok", 12.5, NOW - 100)
    m.source_snapshot("t1", "db", "ok", 7.5, NOW - 50)
    m.source_snapshot("t1", "db", "failed", 1.0, NOW - 10)  # must not move the last-snapshot time
    m.source_protected("t1", "db", NOW - 42)
    m.site_up("east", True)
    m.site_up("west", False)
    m.site_backlog("west", 17, 4096, 30.5)
    m.site_shipped("east", 1000)
    m.site_shipped("east", 24)
    m.site_error("west", "timeout")
    m.site_error("west", "timeout")
    m.site_error("west", "denied")
    m.observe_request("east", "put", 0.02)
    m.spool(900, 1000)

    client = await make_client(metrics=m, now=NOW)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()

    src = {"tenant": "t1", "source": "db"}
    assert (
        sample(text, "drsvc_source_rpo_seconds", **src) == 42.0
    )  # now - protected_until, via the app's clock
    assert sample(text, "drsvc_source_last_protected_timestamp_seconds", **src) == NOW - 42
    assert sample(text, "drsvc_source_last_snapshot_timestamp_seconds", **src) == NOW - 50
    assert sample(text, "drsvc_source_snapshots_total", **src, outcome="ok") == 2
    assert sample(text, "drsvc_source_snapshots_total", **src, outcome="failed") == 1
    assert sample(text, "drsvc_source_snapshots_total", **src, outcome="partial") == 0
    assert sample(text, "drsvc_source_snapshot_duration_seconds_count", **src) == 3
    assert sample(text, "drsvc_source_snapshot_duration_seconds_sum", **src) == 21.0
    assert sample(text, "drsvc_source_snapshot_duration_seconds_bucket", **src, le="5.0") == 1

    assert sample(text, "drsvc_site_up", site="east") == 1
    assert sample(text, "drsvc_site_up", site="west") == 0
    assert sample(text, "drsvc_site_backlog_objects", site="west") == 17
    assert sample(text, "drsvc_site_backlog_bytes", site="west") == 4096
    assert sample(text, "drsvc_site_backlog_oldest_age_seconds", site="west") == 30.5
    assert sample(text, "drsvc_site_shipped_bytes_total", site="east") == 1024
    assert sample(text, "drsvc_site_errors_total", site="west", kind="timeout") == 2
    assert sample(text, "drsvc_site_errors_total", site="west", kind="denied") == 1
    assert sample(text, "drsvc_site_request_seconds_count", site="east", op="put") == 1

    assert sample(text, "drsvc_spool_used_bytes") == 900
    assert sample(text, "drsvc_spool_quota_bytes") == 1000
    assert sample(text, "drsvc_spool_full") == 0
    assert sample(text, "drsvc_build_info", version="9.9.9") == 1


async def test_each_scrape_recomputes_rpo_from_the_clock(make_client: ClientFactory) -> None:
    m = Metrics(version="test")
    m.source_protected("t1", "db", NOW - 5)
    first = await make_client(metrics=m, now=NOW)
    later = await make_client(metrics=m, now=NOW + 60)
    assert sample(await (await first.get("/metrics")).text(), "drsvc_source_rpo_seconds") == 5
    assert sample(await (await later.get("/metrics")).text(), "drsvc_source_rpo_seconds") == 65


# -- Metrics on its own --------------------------------------------------------------------------------------


def test_update_rpo_covers_every_source_and_never_goes_negative() -> None:
    m = Metrics(version="test")
    m.source_protected("t1", "a", 100.0)
    m.source_protected("t2", "b", 250.0)
    m.update_rpo(200.0)
    text = rendered(m)
    assert sample(text, "drsvc_source_rpo_seconds", tenant="t1", source="a") == 100
    assert sample(text, "drsvc_source_rpo_seconds", tenant="t2", source="b") == 0  # clock behind: clamp
    m.source_protected("t1", "a", 190.0)
    m.update_rpo(200.0)
    assert sample(rendered(m), "drsvc_source_rpo_seconds", tenant="t1", source="a") == 10


def test_two_instances_share_nothing() -> None:
    a, b = Metrics(version="a"), Metrics(version="b")
    a.site_shipped("east", 5)
    a.source_protected("t1", "db", 1.0)
    a.spool(10, 0)
    text_b = rendered(b)
    assert sample(text_b, "drsvc_site_shipped_bytes_total", site="east") is None
    assert sample(text_b, "drsvc_source_last_protected_timestamp_seconds") is None
    assert sample(text_b, "drsvc_spool_used_bytes") == 0
    assert sample(text_b, "drsvc_build_info", version="b") == 1
    assert sample(text_b, "drsvc_build_info", version="a") is None
    assert sample(rendered(a), "drsvc_site_shipped_bytes_total", site="east") == 5


def test_remove_source_drops_its_series_and_keeps_the_others() -> None:
    m = Metrics(version="test")
    for source in ("db", "files"):
        m.source_snapshot("t1", source, "partial", 2.0, 50.0)
        m.source_protected("t1", source, 40.0)
    m.update_rpo(100.0)
    m.remove_source("t1", "db")
    m.remove_source("t1", "never-seen")  # ignored
    m.update_rpo(200.0)  # must not bring the removed source back
    text = rendered(m)
    assert 'source="db"' not in text
    assert sample(text, "drsvc_source_rpo_seconds", source="files") == 160
    assert sample(text, "drsvc_source_snapshots_total", source="files", outcome="partial") == 1

    m.source_snapshot("t1", "db", "ok", 1.0, 60.0)  # re-added after a reload: counters start from 0
    assert sample(rendered(m), "drsvc_source_snapshots_total", source="db", outcome="partial") == 0


def test_remove_site_drops_every_series_of_the_site() -> None:
    m = Metrics(version="test")
    for site in ("east", "west"):
        m.site_up(site, True)
        m.site_backlog(site, 1, 2, 3.0)
        m.site_shipped(site, 4)
        m.site_error(site, "timeout")
        m.observe_request(site, "get", 0.1)
    m.remove_site("west")
    m.remove_site("nowhere")  # ignored
    text = rendered(m)
    assert 'site="west"' not in text
    assert sample(text, "drsvc_site_errors_total", site="east", kind="timeout") == 1
    assert sample(text, "drsvc_site_request_seconds_count", site="east", op="get") == 1


@pytest.mark.parametrize(
    ("used", "quota", "full", "expected"),
    [(5, 10, None, 0), (10, 10, None, 1), (10**9, 0, None, 0), (5, 10, True, 1)],
)
def test_spool_full(used: int, quota: int, full: bool | None, expected: int) -> None:
    m = Metrics(version="test")
    m.spool(used, quota, full)
    assert sample(rendered(m), "drsvc_spool_full") == expected


def test_labels_outside_the_fixed_sets_are_refused() -> None:
    m = Metrics(version="test")
    with pytest.raises(ValueError, match="outcome must be one of"):
        m.source_snapshot("t1", "db", "weird", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="op must be one of"):
        m.observe_request("east", "patch", 1.0)  # type: ignore[arg-type]


# -- serve() and parse_listen() ------------------------------------------------------------------------------


async def test_serve_starts_a_real_listener() -> None:
    runner = await serve(make_app(Metrics(version="test"), FakeHealth()), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/healthz") as resp:
            assert resp.status == 200
            assert json.loads(await resp.text()) == {"status": "ok"}
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:9464", ("localhost", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen_good(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("127.0.0.1", "has no port"),
        ("", "has no port"),
        (":8080", "has no host"),
        ("[]:8080", "not an IPv6 address"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:+80", "is not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("::1:8080", "in brackets"),
        ("[::1]", "has no port"),
        ("[nothost]:80", "not an IPv6 address"),
        ("[::1:80", "unbalanced brackets"),
        ("host]:80", "unbalanced brackets"),
    ],
)
def test_parse_listen_bad(listen: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(listen)
