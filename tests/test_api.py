"""The /v1 API through aiohttp's test client, on a daemon of local-directory sites with one snapshot taken.

Every endpoint, the auth matrix (no token, bad token, viewer vs operator, another tenant), restore targets
outside the roots, dry runs, cancel, concurrent restores under max_restores, a daemon stop or kill during a
restore, drills, the audit trail (and a failing audit log), TLS and `drsvc token new`. The findings of the
security review each have a test: inline plans with probes, listings of multi-tenant jobs, plan sources
checked before the plan, explicit token scopes, GET /v1/audit, staging directories of a killed restore, the
plain-HTTP warning and 403s that do not name the other tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import FAST_SCRYPT, PASSPHRASE, tree_state

from drsvc.api.auth import hash_token, read_tokens_file
from drsvc.api.openapi import document
from drsvc.app import App
from drsvc.cli.main import main as cli_main
from drsvc.cli.run_cmd import plaintext_api_exposure
from drsvc.core.config import Config, parse_config
from drsvc.core.errors import ConfigError
from drsvc.daemon_api import DaemonApi, remove_restore_leftovers, tls_context
from drsvc.http import HealthChecks, make_app, serve
from drsvc.jobs import Job
from drsvc.metrics import Metrics
from drsvc.supervisor import Supervisor

TOKENS = {  # name: (token, role, tenants)
    "viewer-fin": ("v-fin-secret", "viewer", ["fin"]),
    "op-fin": ("o-fin-secret", "operator", ["fin"]),
    "op-hr": ("o-hr-secret", "operator", ["hr"]),
    "admin": ("a-all-secret", "admin", ["*"]),
    "admin-fin": ("a-fin-secret", "admin", ["fin"]),
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def corpus(src: Path, files: int = 12, seed: int = 5) -> None:
    rng = random.Random(seed)
    src.mkdir(parents=True)
    for i in range(files):
        (src / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(1000, 120_000)))
    (src / "sub").mkdir()
    (src / "sub" / "note.txt").write_text("hello\n")


def config_data(tmp: Path, **api: Any) -> dict[str, Any]:
    sites = {n: {"type": "local", "path": str(tmp / "sites" / n)} for n in ("a", "b")}
    return {
        "state": {"dir": str(tmp / "state")},
        "api": {
            "tokens": {
                name: {"hash": hash_token(tok), "role": role, "tenants": tenants}
                for name, (tok, role, tenants) in TOKENS.items()
            },
            **api,
        },
        "restore": {"roots": [str(tmp / "restores")]},
        "audit": {"tenant": "fin"},
        "tenants": {
            "fin": {"key": {"passphrase": {"value": PASSPHRASE}}},
            "hr": {"key": {"passphrase": {"value": PASSPHRASE}}},
        },
        "sites": sites,
        "sources": {
            "docs": {"tenant": "fin", "type": "tree", "path": str(tmp / "src"), "sites": ["a", "b"]},
            "staff": {"tenant": "hr", "type": "tree", "path": str(tmp / "staff"), "sites": ["b"]},
        },
    }


class GatedStore:
    """A store whose reads wait while the gate is closed: a restore that stays running until the test
    lets it go."""

    def __init__(self, inner: Any, gate: asyncio.Event) -> None:
        self.inner, self.gate = inner, gate
        self.name, self.lock_period = inner.name, inner.lock_period

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await self.gate.wait()
        data: bytes = await self.inner.get(key, offset, length)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GatedApi(DaemonApi):
    """The daemon's API whose jobs read the sites through a gate (open unless a test closes it)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        super().__init__(config, metrics)
        self.gate = asyncio.Event()
        self.gate.set()

    def job_app(self, config: Config) -> contextlib.AbstractAsyncContextManager[App]:
        app = App(config, workers=1)
        for name in config.sites:
            app._stores[name] = GatedStore(app.store(name), self.gate)  # type: ignore[assignment]
        return app


@dataclass
class Daemon:
    tmp: Path
    config: Config
    app: App
    sup: Supervisor
    api: GatedApi
    client: TestClient[web.Request, web.Application]

    async def call(
        self, method: str, path: str, token: str | None = "op-fin", body: Any = None, raw: str | None = None
    ) -> tuple[int, Any]:
        headers = bearer(token) if token is not None else {}
        kw: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kw["data"] = raw
        elif body is not None:
            kw["json"] = body
        resp = await self.client.request(method, path, **kw)
        ctype = resp.headers.get("Content-Type", "")
        data = await resp.json() if ctype.startswith("application/json") else await resp.text()
        return resp.status, data

    async def wait(self, job_id: str) -> dict[str, Any]:
        await asyncio.wait_for(self.api.runner.wait(job_id), 60)
        status, body = await self.call("GET", f"/v1/restores/{job_id}", "viewer-fin")
        assert status == 200, body
        return dict(body)

    def audit(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.api.audit.records()]


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Factory: a config of two local sites, tenants fin and hr, one snapshot of each source; a Supervisor
    (driven by run_once, not started) and the DaemonApi behind aiohttp's test client. Everything is closed
    at teardown."""
    built: list[Daemon] = []

    async def factory(**api: Any) -> Daemon:
        corpus(tmp_path / "src")
        corpus(tmp_path / "staff", files=3, seed=9)
        (tmp_path / "restores").mkdir()
        config = parse_config(config_data(tmp_path, **api))
        app = App(config, workers=2)
        for tenant in ("fin", "hr"):
            await app.init_tenant(tenant, FAST_SCRYPT)
        metrics = Metrics(version="test")
        sup = Supervisor(app, metrics)
        await sup.run_once()
        dapi = GatedApi(config, metrics)
        dapi.attach(sup)
        http = make_app(metrics, HealthChecks(lambda: True, sup.ready), api=dapi.web_app())
        client = TestClient(TestServer(http))
        await client.start_server()
        d = Daemon(tmp_path, config, app, sup, dapi, client)
        built.append(d)
        return d

    yield factory
    for d in built:
        d.api.gate.set()
        await d.client.close()
        await d.api.close()
        await d.app.close()


# -- the document, errors ------------------------------------------------------------------------------


async def test_openapi_is_public_and_describes_every_route(daemon: DaemonFactory) -> None:
    d = await daemon()
    status, doc = await d.call("GET", "/v1/openapi.json", token=None)
    assert status == 200
    assert doc == json.loads(json.dumps(document()))
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    served = set()
    for resource in d.client.app.router.resources():
        info = resource.get_info()
        if "app" in info:
            for sub in info["app"].router.resources():
                for route in sub:
                    served.add((sub.canonical, route.method))
    assert served == documented


async def test_errors_are_json_with_a_code_and_a_message(daemon: DaemonFactory) -> None:
    d = await daemon()
    status, body = await d.call("GET", "/v1/nothing-here")
    assert status == 404 and body["code"] == "not_found" and "/v1/nothing-here" in body["message"]
    status, body = await d.call("PUT", "/v1/sources")
    assert status == 405 and body["code"] == "method_not_allowed" and "GET" in body["message"]
    status, body = await d.call("POST", "/v1/restores", raw="{not json")
    assert status == 400 and body["code"] == "invalid" and "not valid JSON" in body["message"]
    status, body = await d.call("POST", "/v1/restores", body=[1, 2])
    assert status == 400 and "JSON object" in body["message"]
    status, body = await d.call("GET", "/v1/restores?limit=0")
    assert status == 400 and body["field"] == "limit"
    status, body = await d.call("GET", "/healthz", token=None)  # outside /v1: no token, own shape
    assert status == 200 and body == {"status": "ok"}


# -- auth ----------------------------------------------------------------------------------------------


async def test_auth_matrix(daemon: DaemonFactory) -> None:
    d = await daemon()
    resp = await d.client.get("/v1/sources")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await resp.json())["code"] == "unauthorized"
    for header in ("Bearer wrong-token", "Basic dXNlcjpwdw==", "Bearer ", "v-fin-secret"):
        resp = await d.client.get("/v1/sources", headers={"Authorization": header})
        assert resp.status == 401, header
        assert (await resp.json())["code"] == "unauthorized"

    # viewer: reads its tenant, may not start or cancel anything
    assert (await d.call("GET", "/v1/sources", "viewer-fin"))[0] == 200
    assert (await d.call("GET", "/v1/sources/docs", "viewer-fin"))[0] == 200
    target = str(d.tmp / "restores" / "v")
    for method, path, body in (
        ("POST", "/v1/restores", {"source": "docs", "target": target}),
        ("POST", "/v1/sources/docs/snapshots", None),
        ("POST", "/v1/drills", {"plan": {"sources": [{"source": "docs"}]}}),
        ("DELETE", "/v1/restores/" + "0" * 32, None),
    ):
        status, err = await d.call(method, path, "viewer-fin", body)
        assert status == 403, (method, path, err)
        assert err["code"] == "forbidden" and "operator role" in err["message"] and "viewer" in err["message"]
    assert not (d.tmp / "restores" / "v").exists()

    # another tenant: hidden from listings, 403 when named, naming the token and its own tenants only
    status, body = await d.call("GET", "/v1/sources", "op-hr")
    assert [s["name"] for s in body["sources"]] == ["staff"]
    status, body = await d.call("GET", "/v1/sites", "op-hr")
    assert [s["name"] for s in body["sites"]] == ["b"] and body["sites"][0]["tenants"] == ["hr"]
    status, err = await d.call("GET", "/v1/sources/docs", "op-hr")
    assert status == 403 and "token 'op-hr' (tenants: hr)" in err["message"]
    assert "fin" not in err["message"]
    status, err = await d.call("POST", "/v1/restores", "op-hr", {"source": "docs", "target": target})
    assert status == 403 and "fin" not in err["message"]
    status, err = await d.call("POST", "/v1/sources/docs/snapshots", "op-hr")
    assert status == 403
    status, job = await d.call("POST", "/v1/restores", "op-fin", {"source": "docs", "target": target})
    assert status == 202
    status, err = await d.call("GET", f"/v1/restores/{job['id']}", "op-hr")
    assert status == 403 and "fin" not in err["message"]
    assert (await d.call("DELETE", f"/v1/restores/{job['id']}", "op-hr"))[0] == 403
    assert (await d.call("GET", "/v1/restores", "op-hr"))[1] == {"restores": []}
    assert [j["id"] for j in (await d.call("GET", "/v1/restores", "admin"))[1]["restores"]] == [job["id"]]
    await d.wait(job["id"])


async def test_tokens_file_is_read_again_on_reload(daemon: DaemonFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[tokens.robot]\nhash = "{hash_token("robot-1")}"\nrole = "viewer"\ntenants = ["fin"]\n'
    )
    d = await daemon(tokens_file=str(tokens))
    resp = await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-1"})
    assert resp.status == 200
    tokens.write_text(
        f'[tokens.robot]\nhash = "{hash_token("robot-2")}"\nrole = "viewer"\ntenants = ["fin"]\n'
    )
    d.api.reload(d.config)
    assert (await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-1"})).status == 401
    assert (await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-2"})).status == 200
    tokens.write_text("[tokens.robot]\nhash = 'not a hash'\n")  # unusable: the previous tokens stay
    d.api.reload(d.config)
    assert (await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-2"})).status == 200
    # a token without tenants: the file is unusable (a scope is never implied), the previous tokens stay
    tokens.write_text(f'[tokens.robot]\nhash = "{hash_token("robot-3")}"\nrole = "viewer"\n')
    with pytest.raises(ConfigError) as info:
        read_tokens_file(tokens, d.config)
    assert info.value.fields["key"] == "tokens.robot.tenants"
    d.api.reload(d.config)
    assert (await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-3"})).status == 401
    assert (await d.client.get("/v1/sources", headers={"Authorization": "Bearer robot-2"})).status == 200


# -- sources, sites, snapshot now ----------------------------------------------------------------------


async def test_sources_list_and_detail(daemon: DaemonFactory) -> None:
    d = await daemon()
    status, body = await d.call("GET", "/v1/sources", "admin")
    assert status == 200 and [s["name"] for s in body["sources"]] == ["docs", "staff"]
    docs = body["sources"][0]
    assert docs["tenant"] == "fin" and docs["sites"] == ["a", "b"] and docs["min_copies"] == 1
    assert docs["rpo_s"] is not None and 0 <= docs["rpo_s"] < 60
    assert docs["last_snapshot"] == d.sup.sources["docs"].last_snapshot
    status, one = await d.call("GET", "/v1/sources/docs", "viewer-fin")
    assert status == 200, one
    assert one["policy"]["sites"] == ["a", "b"] and one["problems"] == []
    rec = one["last_snapshot_record"]
    assert rec["sites"] == ["a", "b"] and rec["time"] == pytest.approx(docs["last_snapshot"])
    assert one["restorable"]["earliest"] == one["restorable"]["latest"] == rec["time"]
    assert [t["site"] for t in one["targets"]] == ["a", "b"]
    assert all(t["up"] and t["holds_last_snapshot"] and t["backlog_objects"] == 0 for t in one["targets"])
    status, err = await d.call("GET", "/v1/sources/nope")
    assert status == 404 and "'nope'" in err["message"]


async def test_sites_show_health_backlog_and_last_ack(daemon: DaemonFactory) -> None:
    d = await daemon()
    status, body = await d.call("GET", "/v1/sites", "viewer-fin")
    assert status == 200
    sites = {s["name"]: s for s in body["sites"]}
    assert set(sites) == {"a", "b"}
    for s in sites.values():
        assert s["up"] is True and s["backlog_objects"] == 0 and s["last_ack"] is not None
        assert s["tenants"] == ["fin"]  # op-fin does not see that b also serves hr


async def test_snapshot_now(daemon: DaemonFactory) -> None:
    d = await daemon()
    before = d.sup.sources["docs"].last_snapshot
    (d.tmp / "src" / "new.txt").write_text("new\n")
    status, body = await d.call("POST", "/v1/sources/docs/snapshots")
    assert status == 202 and body["snapshot_requested"] is True
    assert d.sup.due(d.sup.clock()) == ["docs"]  # due at once, although the interval has not passed
    await d.sup.run_once()
    st = d.sup.sources["docs"]
    assert st.last_snapshot > before and not st.requested and st.last_error is None
    status, body = await d.call("GET", "/v1/sources/docs")
    assert body["snapshot_requested"] is False and body["last_snapshot"] == st.last_snapshot
    assert (await d.call("POST", "/v1/sources/nope/snapshots"))[0] == 404


# -- restores ------------------------------------------------------------------------------------------


async def test_restore_runs_reports_progress_and_result(daemon: DaemonFactory) -> None:
    d = await daemon()
    target = d.tmp / "restores" / "docs"
    status, job = await d.call("POST", "/v1/restores", body={"source": "docs", "target": str(target)})
    assert status == 202, job
    assert job["kind"] == "restore" and job["who"] == "op-fin" and job["tenants"] == ["fin"]
    assert job["state"] in ("queued", "running")
    done = await d.wait(job["id"])
    assert done["state"] == "succeeded", done
    r = done["result"]
    assert r["verified"] is True and r["site"] in ("a", "b") and r["rpo_achieved_s"] >= 0
    assert r["files"] == 13 and r["bytes"] > 0
    p = done["progress"]
    assert p["bytes_done"] == p["bytes_total"] == r["bytes"] and p["files_done"] == 13
    assert tree_state(target) == tree_state(d.tmp / "src")


async def test_dry_run_returns_the_plan_and_writes_nothing(daemon: DaemonFactory) -> None:
    d = await daemon()
    target = d.tmp / "restores" / "dry"
    body = {"source": "docs", "target": str(target), "dry_run": True, "site": "b"}
    status, plan = await d.call("POST", "/v1/restores", body=body)
    assert status == 200, plan
    assert plan["dry_run"] is True and plan["site"] == "b" and plan["target"] == str(target)
    assert plan["snapshot"] and plan["recovery_point"] is not None
    assert not target.exists()
    assert (await d.call("GET", "/v1/restores"))[1] == {"restores": []}


async def test_restore_requests_that_are_refused(daemon: DaemonFactory) -> None:
    d = await daemon()
    roots = str(d.tmp / "restores")
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"source": "docs", "target": "/etc/drsvc-restore"}, 422, "target_outside_roots", "target"),
        ({"source": "docs", "target": f"{roots}/../escape"}, 422, "target_outside_roots", "target"),
        ({"source": "docs", "target": "relative/dir"}, 400, "bad_request", "target"),
        ({"source": "docs"}, 400, "bad_request", "target"),
        ({"source": "nope", "target": f"{roots}/x"}, 404, "unknown_source", "source"),
        ({"source": "docs", "target": f"{roots}/x", "site": "zz"}, 400, "unknown_site", "site"),
        ({"source": "docs", "target": f"{roots}/x", "at": "yesterday"}, 400, "bad_request", "at"),
        ({"source": "docs", "target": f"{roots}/x", "verify": "yes"}, 400, "bad_request", "verify"),
        ({"source": "docs", "target": f"{roots}/x", "colour": "red"}, 400, "bad_request", "colour"),
    ]
    for body, status, code, field in cases:
        got, err = await d.call("POST", "/v1/restores", body=body)
        assert (got, err["code"], err.get("field")) == (status, code, field), (body, err)
    got, err = await d.call("POST", "/v1/restores", body=cases[0][0])
    assert "/etc/drsvc-restore" in err["message"] and roots in err["message"]  # names the target and roots
    os.symlink("/etc", d.tmp / "restores" / "link")  # a symlink inside the roots that leads out
    got, err = await d.call("POST", "/v1/restores", body={"source": "docs", "target": f"{roots}/link/x"})
    assert got == 422 and err["code"] == "target_outside_roots"
    assert (await d.call("GET", "/v1/restores"))[1] == {"restores": []}


async def test_cancel_a_running_restore(daemon: DaemonFactory) -> None:
    d = await daemon()
    d.api.gate.clear()
    target = d.tmp / "restores" / "c"
    status, job = await d.call("POST", "/v1/restores", body={"source": "docs", "target": str(target)})
    assert status == 202
    await until(lambda: d.api.jobs.get(job["id"]).state == "running")  # type: ignore[union-attr]
    status, cancelled = await d.call("DELETE", f"/v1/restores/{job['id']}")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert cancelled["error"]["code"] == "cancelled"
    assert not target.exists() and list((d.tmp / "restores").iterdir()) == []  # nothing half-written
    status, err = await d.call("DELETE", f"/v1/restores/{job['id']}")
    assert status == 409 and err["code"] == "finished" and "cancelled" in err["message"]
    assert (await d.call("DELETE", "/v1/restores/" + "f" * 32))[0] == 404
    assert (await d.call("GET", "/v1/restores/" + "f" * 32))[0] == 404


async def test_concurrent_restores_queue_under_max_restores(daemon: DaemonFactory) -> None:
    d = await daemon(max_restores=1)
    d.api.gate.clear()
    jobs = []
    for name in ("one", "two"):
        body = {"source": "docs", "target": str(d.tmp / "restores" / name)}
        status, job = await d.call("POST", "/v1/restores", body=body)
        assert status == 202
        jobs.append(job["id"])
    await until(lambda: d.api.jobs.get(jobs[0]).state == "running")  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    assert (await d.call("GET", f"/v1/restores/{jobs[1]}"))[1]["state"] == "queued"
    d.api.gate.set()
    first, second = [await d.wait(j) for j in jobs]
    assert first["state"] == second["state"] == "succeeded"
    assert second["started"] >= first["finished"]
    for name in ("one", "two"):
        assert tree_state(d.tmp / "restores" / name) == tree_state(d.tmp / "src")


async def test_a_daemon_stop_during_a_restore_leaves_it_failed_interrupted(daemon: DaemonFactory) -> None:
    d = await daemon()
    d.api.gate.clear()
    target = d.tmp / "restores" / "r"
    _, job = await d.call("POST", "/v1/restores", body={"source": "docs", "target": str(target)})
    await until(lambda: d.api.jobs.get(job["id"]).state == "running")  # type: ignore[union-attr]
    await d.api.close()  # the daemon stops (SIGTERM) with the restore in flight
    again = DaemonApi(d.config, Metrics(version="test"))
    try:
        again.attach(d.sup)
        found = again.jobs.get(job["id"])
        assert found is not None and found.state == "failed-interrupted"
        assert found.error is not None and found.error["code"] == "interrupted"
        assert not target.exists()
    finally:
        await again.close()
    d.api = GatedApi(d.config, Metrics(version="test"))  # for the fixture's teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def staging(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".drsvc-restore-" in p.name)


def test_drsvc_run_killed_during_a_restore_then_restarted(tmp_path: Path) -> None:
    """`drsvc run` gets SIGKILL while a restore runs (the site's bandwidth keeps it running), leaving a
    partial copy in the staging directory beside the target; after the next start the job reads
    failed-interrupted, the target holds nothing and the staging directory is gone."""
    corpus(tmp_path / "src", files=30, seed=3)  # ~1.8 MB
    port = _free_port()
    token, digest = "kill-test-token", hash_token("kill-test-token")
    base = (
        f'[state]\ndir = "{tmp_path}/state"\n'
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntick = 0.2\ndrain_timeout = 2\n'
        f'[restore]\nroots = ["{tmp_path}/restores"]\n'
        f'[api.tokens.ops]\nhash = "{digest}"\nrole = "operator"\ntenants = ["fin"]\n'
        '[audit]\ntenant = "fin"\n'
        '[tenants.fin.key.passphrase]\nvalue = "pw"\n'
        f'[sources.docs]\ntenant = "fin"\ntype = "tree"\npath = "{tmp_path}/src"\nsites = ["a"]\n'
        'interval = "1h"\n'
        f'[sites.a]\ntype = "local"\npath = "{tmp_path}/sites/a"\n'
    )
    cfg = tmp_path / "drsvc.toml"
    cfg.write_text(base)
    (tmp_path / "restores").mkdir()
    cli = [sys.executable, "-m", "drsvc.cli.main", "-c", str(cfg)]
    subprocess.run([*cli, "init", "fin", "--scrypt-n", "1024"], check=True, capture_output=True)
    subprocess.run([*cli, "snapshot", "docs"], check=True, capture_output=True)
    cfg.write_text(base + 'bandwidth = "300KiB"\n')  # restores from site a now take several seconds
    url = f"http://127.0.0.1:{port}"
    target = tmp_path / "restores" / "docs"
    procs = []
    try:
        procs.append(subprocess.Popen([*cli, "run"], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while _http("GET", f"{url}/v1/restores", token)[0] != 200:
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        status, job = _http("POST", f"{url}/v1/restores", token, {"source": "docs", "target": str(target)})
        assert status == 202, job
        while (state := _http("GET", f"{url}/v1/restores/{job['id']}", token)[1]["state"]) == "queued":
            time.sleep(0.05)
        assert state == "running"
        deadline = time.monotonic() + 30
        while not staging(tmp_path / "restores"):  # Staging.create runs once the plan is read
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        assert staging(tmp_path / "restores")  # the partial copy a kill leaves
        procs.append(subprocess.Popen([*cli, "run"], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while (got := _http("GET", f"{url}/v1/restores/{job['id']}", token))[0] != 200:
            assert time.monotonic() < deadline, "the daemon did not start again"
            time.sleep(0.1)
        assert got[1]["state"] == "failed-interrupted", got
        assert got[1]["error"]["code"] == "interrupted"
        assert "staging directory" in got[1]["error"]["hint"]
        assert not target.exists()
        assert staging(tmp_path / "restores") == []  # removed at the start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


# -- drills --------------------------------------------------------------------------------------------


async def test_drills_start_read_report_and_html(daemon: DaemonFactory) -> None:
    d = await daemon()
    scratch = str(d.tmp / "restores" / "scratch")
    plan = {"name": "api", "scratch": scratch, "sources": [{"source": "docs", "points": ["latest"]}]}
    status, job = await d.call("POST", "/v1/drills", body={"plan": plan})
    assert status == 202, job
    assert job["kind"] == "drill" and job["tenants"] == ["fin"]
    await asyncio.wait_for(d.api.runner.wait(job["id"]), 120)
    status, done = await d.call("GET", f"/v1/drills/{job['id']}", "viewer-fin")
    assert status == 200 and done["state"] == "succeeded", done
    report = done["result"]["report"]
    assert done["result"]["verdict"] == report["verdict"] == "pass", report
    assert {(s["site"], s["point"]) for s in report["scenarios"]} == {("a", "latest"), ("b", "latest")}
    resp = await d.client.get(f"/v1/drills/{job['id']}/report.html", headers=bearer("viewer-fin"))
    assert resp.status == 200 and resp.content_type == "text/html"
    assert report["id"] in await resp.text()
    assert [j["id"] for j in (await d.call("GET", "/v1/drills"))[1]["drills"]] == [job["id"]]
    assert (await d.call("GET", f"/v1/drills/{job['id']}", "op-hr"))[0] == 403
    assert (await d.call("GET", f"/v1/restores/{job['id']}"))[0] == 404  # a drill is not a restore
    assert (await d.call("DELETE", f"/v1/drills/{job['id']}"))[0] == 409


async def test_drill_requests_that_are_refused_and_plan_files(daemon: DaemonFactory) -> None:
    d = await daemon()
    cases: list[tuple[Any, int, str]] = [
        ({"plan": {"sources": []}}, 400, "plan.sources"),
        ({"plan": {"sources": [{"source": "nope"}]}}, 403, "plan.sources[0].source"),  # op-fin: not its
        ({"plan": {"sources": [{"source": "docs"}], "scratch": "/tmp/elsewhere"}}, 422, "plan.scratch"),
        ({"plan": {"sources": [{"source": "docs"}]}}, 422, "plan.scratch"),  # default scratch: outside roots
        ({"plan_file": "../../etc/passwd"}, 400, "plan_file"),
        ({"plan": {}, "plan_file": "x"}, 400, "plan"),
        ({}, 400, "plan"),
    ]
    for body, status, field in cases:
        got, err = await d.call("POST", "/v1/drills", body=body)
        assert (got, err.get("field")) == (status, field), (body, err)
    assert (await d.call("POST", "/v1/drills", body={"plan_file": "missing"}))[0] == 404
    plans = d.tmp / "state" / "drills" / "plans"
    plans.mkdir(parents=True)
    scratch = d.tmp / "restores" / "s"
    (plans / "weekly.toml").write_text(f'scratch = "{scratch}"\n[[sources]]\nsource = "staff"\n')
    status, err = await d.call("POST", "/v1/drills", "op-fin", {"plan_file": "weekly"})
    assert status == 403 and "hr" not in err["message"] and err["field"] == "plan.sources[0].source"
    d.api.gate.clear()
    status, job = await d.call("POST", "/v1/drills", "op-hr", {"plan_file": "weekly"})
    assert status == 202 and job["request"]["plan_file"] == "weekly"
    status, err = await d.call("GET", f"/v1/drills/{job['id']}/report.html", "op-hr")
    assert status == 409 and err["code"] == "not_finished"
    status, cancelled = await d.call("DELETE", f"/v1/drills/{job['id']}", "op-hr")
    assert status == 200 and cancelled["state"] == "cancelled"
    status, err = await d.call("GET", f"/v1/drills/{job['id']}/report.html", "op-hr")
    assert status == 404


async def test_plan_sources_are_checked_for_scope_before_the_plan_is_parsed(daemon: DaemonFactory) -> None:
    """Another tenant's source, or an unknown one, gets one 403 that names neither the other tenant nor
    anything of it (its sites, the other sources); only sources in scope reach the parser's errors."""
    d = await daemon()
    answers = []
    for plan in (
        {"sources": [{"source": "nope"}]},  # unknown
        {"sources": [{"source": "staff"}]},  # hr's
        {"sources": [{"source": "staff", "sites": ["zz"]}]},  # hr's, with a bad site: hr's sites unnamed
        {"sources": [{"source": "docs"}, {"source": "staff", "points": ["never"]}]},
    ):
        status, err = await d.call("POST", "/v1/drills", "op-fin", {"plan": plan})
        assert status == 403 and err["code"] == "forbidden", err
        for other in ("'hr'", "tenant 'hr'", "configured", "'b'", "'a'"):
            assert other not in err["message"], err
        assert "its sources: docs" in err["message"]
        answers.append(err["message"].replace("'nope'", "'staff'"))
    assert answers[0] == answers[1]  # unknown or another tenant's: the same answer, no existence oracle
    status, err = await d.call(
        "POST", "/v1/drills", "op-fin", {"plan": {"sources": [{"source": "docs", "sites": ["zz"]}]}}
    )
    assert status == 400 and err["field"] == "plan.sources[0].sites" and "'a', 'b'" not in err["message"]
    status, err = await d.call("POST", "/v1/drills", "admin", {"plan": {"sources": [{"source": "nope"}]}})
    assert status == 400 and err["field"] == "plan.sources[0].source" and "docs, staff" in err["message"]
    assert (await d.call("GET", "/v1/drills", "admin"))[1] == {"drills": []}
    refused = [r for r in d.audit() if r["who"] == "op-fin"]
    assert refused and all(r["status"] == 403 for r in refused[:4])
    assert refused[1]["tenant"] == "hr"  # the audit log (admins only) records whose source it was


@dataclass
class Bare:
    """A DaemonApi with no supervisor behind it (reads of jobs and the audit log, refusals), on a config
    that may have more sources (a postgres one) than the daemon fixture's."""

    api: DaemonApi
    client: TestClient[web.Request, web.Application]

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        resp = await self.client.request(method, path, headers=bearer(token), json=body)
        return resp.status, await resp.json()


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[Bare]:
    data = config_data(tmp_path)
    data["sources"]["ledger"] = {
        "tenant": "fin", "type": "postgres", "path": str(tmp_path / "pg"), "sites": ["a"],
    }  # fmt: skip
    (tmp_path / "restores").mkdir()
    dapi = DaemonApi(parse_config(data), Metrics(version="test"))
    client = TestClient(TestServer(make_app(Metrics(version="test"), HealthChecks(lambda: True,
                        lambda: (True, [])), api=dapi.web_app())))  # fmt: skip
    await client.start_server()
    yield Bare(dapi, client)
    await client.close()
    dapi.stopping = True
    await dapi.runner.close()
    await asyncio.to_thread(dapi.audit.close)
    await asyncio.to_thread(dapi.jobs.close)


async def test_an_inline_plan_may_not_carry_postgres_probes(bare: Bare, tmp_path: Path) -> None:
    """Probes are SQL run as the restored cluster's superuser (pg_read_file, COPY ... TO PROGRAM): an
    inline plan with probes is refused for every role; a plan file (the administrator's) may have them."""
    scratch = str(tmp_path / "restores" / "scratch")
    probe = [{"sql": "SELECT pg_read_file('/etc/drsvc/drsvc.toml')", "expect": "x"}]
    plan = {"scratch": scratch, "sources": [{"source": "docs"}, {"source": "ledger", "probes": probe}]}
    for token in ("op-fin", "admin"):
        status, err = await bare.call("POST", "/v1/drills", token, {"plan": plan})
        assert status == 400 and err["code"] == "invalid_plan", err
        assert err["field"] == "plan.sources[1].probes" and "plan_file" in err["message"]
    assert bare.api.jobs.list() == []
    plans = tmp_path / "state" / "drills" / "plans"
    plans.mkdir(parents=True)
    (plans / "pg.toml").write_text(
        f'scratch = "{scratch}"\n[[sources]]\nsource = "ledger"\n'
        '[[sources.probes]]\nsql = "SELECT 1"\nexpect = 1\n'
    )
    status, err = await bare.call("POST", "/v1/drills", "op-fin", {"plan_file": "pg"})
    assert status == 503 and err["code"] == "draining", err  # accepted up to the act (no supervisor here)


async def test_listings_show_only_jobs_wholly_within_the_tokens_scope(bare: Bare) -> None:
    both = bare.api.jobs.create("drill", ["fin", "hr"], "admin", {"plan": {"name": "both"}})
    fin = bare.api.jobs.create("drill", ["fin"], "op-fin", {"plan": {"name": "fin"}})
    restore = bare.api.jobs.create("restore", ["hr"], "op-hr", {"source": "staff"})
    status, body = await bare.call("GET", "/v1/drills", "op-fin")
    assert status == 200 and [j["id"] for j in body["drills"]] == [fin.id]
    assert [j["id"] for j in (await bare.call("GET", "/v1/drills", "op-hr"))[1]["drills"]] == []
    assert [j["id"] for j in (await bare.call("GET", "/v1/drills", "admin"))[1]["drills"]] == [
        fin.id,
        both.id,
    ]
    assert (await bare.call("GET", f"/v1/drills/{both.id}", "op-fin"))[0] == 403
    assert [j["id"] for j in (await bare.call("GET", "/v1/restores", "op-hr"))[1]["restores"]] == [restore.id]
    assert (await bare.call("GET", "/v1/restores", "op-fin"))[1] == {"restores": []}


async def test_audit_endpoint_is_for_admins_and_scoped(bare: Bare) -> None:
    log = bare.api.audit
    for who, tenant, target in (
        ("op-fin", "fin", {"source": "docs"}),
        ("op-hr", "hr", {"source": "staff"}),
        ("anonymous", None, {}),
        ("admin", "fin", {"plan": "both", "tenants": ["fin", "hr"]}),
        ("op-fin", "fin", {"job": "1" * 32}),
    ):
        log.append(who=who, action="POST /v1/x", target=target, result="ok", status=202, tenant=tenant)
    for token in ("viewer-fin", "op-fin"):
        status, err = await bare.call("GET", "/v1/audit", token)
        assert status == 403 and "admin role" in err["message"], err
    status, body = await bare.call("GET", "/v1/audit", "admin")
    assert status == 200 and [r["who"] for r in body["records"]] == [
        "op-fin",
        "op-hr",
        "anonymous",
        "admin",
        "op-fin",
    ]
    assert body["verify"]["intact"] is True and body["verify"]["records"] == 5 and body["more"] is False
    status, body = await bare.call("GET", "/v1/audit", "admin-fin")
    assert status == 200 and [r["target"] for r in body["records"]] == [{"source": "docs"}, {"job": "1" * 32}]
    status, page = await bare.call("GET", "/v1/audit?limit=1", "admin-fin")
    assert [r["seq"] for r in page["records"]] == [1] and page["more"] is True
    status, rest = await bare.call("GET", f"/v1/audit?since={page['next']}", "admin-fin")
    assert [r["seq"] for r in rest["records"]] == [5] and rest["more"] is False
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    status, none = await bare.call("GET", f"/v1/audit?since=@{future.timestamp():.3f}", "admin")
    assert status == 200 and none["records"] == []
    for bad in ("since=yesterday", "limit=0", "limit=1001"):
        status, err = await bare.call("GET", f"/v1/audit?{bad}", "admin")
        assert status == 400 and err["field"] == bad.split("=")[0], err


def test_interrupted_restores_staging_directories_are_removed(tmp_path: Path) -> None:
    config = parse_config(config_data(tmp_path))
    roots = tmp_path / "restores"
    (roots / "deep").mkdir(parents=True)
    target = roots / "deep" / "docs"
    leftovers = [".docs.drsvc-restore-0123456789ab", ".docs.drsvc-restore-0123456789ab.gens"]
    kept = [".docs.drsvc-restore-0123", ".docs2.drsvc-restore-0123456789ab", "docs", ".other"]
    for name in leftovers + kept:
        (roots / "deep" / name).mkdir()
    (roots / "deep" / leftovers[0] / "f.bin").write_bytes(b"tenant data")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", roots / "deep" / ".docs.drsvc-restore-ba9876543210")
    outside = tmp_path / "out" / ".x.drsvc-restore-0123456789ab"
    outside.mkdir(parents=True)

    def job(kind: str, target: str) -> Job:
        return Job("0" * 32, kind, ("fin",), "op-fin", {"target": target}, "failed-interrupted",  # type: ignore[arg-type]
                   0.0, None, 1.0, {}, None, None)  # fmt: skip

    removed = remove_restore_leftovers(
        [job("restore", str(target)), job("drill", str(target)), job("restore", str(tmp_path / "out" / "x"))],
        config,
    )
    assert sorted(removed) == sorted(str(roots / "deep" / n) for n in leftovers)
    left = sorted(p.name for p in (roots / "deep").iterdir())
    assert left == sorted([*kept, ".docs.drsvc-restore-ba9876543210"])  # a symlink is never followed
    assert (tmp_path / "elsewhere").exists() and outside.exists()  # outside the roots: left alone


# -- audit ---------------------------------------------------------------------------------------------


async def test_every_mutating_request_is_audited(daemon: DaemonFactory) -> None:
    d = await daemon()
    target = str(d.tmp / "restores" / "audited")
    _, job = await d.call("POST", "/v1/restores", body={"source": "docs", "target": target})
    await d.wait(job["id"])
    await d.call("POST", "/v1/restores", token=None, body={"source": "docs", "target": target})
    await d.call("POST", "/v1/restores", "viewer-fin", {"source": "docs", "target": target})
    await d.call("POST", "/v1/restores", body={"source": "docs", "target": "/etc/x"})
    await d.call("GET", "/v1/sources")  # a read: not audited
    recs = d.audit()
    assert [(r["who"], r["result"].split(":")[0], r["status"]) for r in recs] == [
        ("op-fin", "attempt", 0),
        ("op-fin", "ok", 202),
        ("anonymous", "refused", 401),
        ("viewer-fin", "refused", 403),
        ("op-fin", "refused", 422),
    ]
    attempt, ok = recs[0], recs[1]
    assert attempt["request_id"] == ok["request_id"] and attempt["action"] == "POST /v1/restores"
    assert attempt["target"] == {"source": "docs", "target": target, "at": "latest"}
    assert ok["target"]["job"] == job["id"] and ok["tenant"] == "fin" and ok["remote"] == "127.0.0.1"
    assert "target_outside_roots" in recs[4]["result"] and recs[4]["target"]["target"] == "/etc/x"
    assert d.api.audit.verify().intact


class BrokenAudit:
    def append(self, **record: Any) -> None:
        raise OSError(28, "No space left on device")


async def test_a_failing_audit_log_refuses_the_request_and_nothing_happens(daemon: DaemonFactory) -> None:
    d = await daemon()
    d.api.context.audit = BrokenAudit()
    target = d.tmp / "restores" / "never"
    status, err = await d.call("POST", "/v1/restores", body={"source": "docs", "target": str(target)})
    assert status == 503 and err["code"] == "audit_unavailable"
    status, err = await d.call("POST", "/v1/sources/docs/snapshots")
    assert status == 503 and not d.sup.sources["docs"].requested
    status, err = await d.call("POST", "/v1/restores", token=None, body={})  # a refusal is not recorded
    assert status == 503
    assert d.api.jobs.list() == [] and not target.exists()
    assert (await d.call("GET", "/v1/sources"))[0] == 200  # reads go on


async def test_a_draining_daemon_refuses_changes(daemon: DaemonFactory) -> None:
    d = await daemon()
    d.api.stopping = True
    body = {"source": "docs", "target": str(d.tmp / "restores" / "late")}
    status, err = await d.call("POST", "/v1/restores", body=body)
    assert status == 503 and err["code"] == "draining"
    assert (await d.call("GET", "/v1/sources/docs"))[0] == 200
    d.api.stopping = False
    d.api.detach()  # reloading: no supervisor behind the API
    assert (await d.call("POST", "/v1/sources/docs/snapshots"))[0] == 503
    assert (await d.call("GET", "/v1/sources"))[1]["code"] == "unavailable"


# -- TLS, tokens -----------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_tls_when_configured(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    data = config_data(tmp_path, tls_cert=str(cert), tls_key=str(key))
    ctx = tls_context(parse_config(data))
    assert ctx is not None
    runner = await serve(make_app(Metrics(version="test"), HealthChecks(lambda: True, lambda: (True, []))),
                         "127.0.0.1", 0, ssl_context=ctx)  # fmt: skip
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://{host}:{port}/healthz", ssl=False) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://{host}:{port}/healthz") as r:
                    await r.read()
    finally:
        await runner.cleanup()
    assert tls_context(parse_config(config_data(tmp_path))) is None


def test_token_new_prints_the_token_once_and_its_hashed_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["token", "new", "alice", "--role", "operator", "--tenant", "fin"]) == 0
    out = capsys.readouterr().out
    token, entry = out.split("\n", 1)
    table = tomllib.loads(entry)["api"]["tokens"]["alice"]
    assert table == {
        "hash": "sha256:" + hashlib.sha256(token.encode()).hexdigest(),
        "role": "operator",
        "tenants": ["fin"],
    }
    assert len(token) >= 43 and token not in entry
    cmd = ["token", "new", "bot", "--role", "viewer", "--tokens-file", "--json"]
    assert cli_main([*cmd, "--all-tenants"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tenants"] == ["*"] and doc["hash"] == hash_token(doc["token"])
    assert cli_main([*cmd, "--tenant", "fin", "--tenant", "hr"]) == 0
    assert json.loads(capsys.readouterr().out)["tenants"] == ["fin", "hr"]
    for scope in ([], ["--tenant", "fin", "--all-tenants"]):  # the scope is explicit, and one of the two
        with pytest.raises(SystemExit) as exit_:
            cli_main([*cmd, *scope])
        assert exit_.value.code == 2
        assert "--tenant" in capsys.readouterr().err
    assert cli_main(["token", "new", "Bad Name", "--role", "viewer", "--tenant", "fin"]) == 2


def test_a_plain_http_api_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    def warning(listen: str, **api: Any) -> str | None:
        data = config_data(tmp_path, **api)
        data["daemon"] = {"listen": listen}
        return plaintext_api_exposure(parse_config(data))

    assert warning("0.0.0.0:8080") is not None and "tls_cert" in (warning("0.0.0.0:8080") or "")
    assert warning("10.1.2.3:8080") is not None and warning("[::]:8080") is not None
    assert warning("drsvc.example:8080") is not None
    for loopback in ("127.0.0.1:8080", "127.0.0.5:8080", "[::1]:8080", "localhost:8080"):
        assert warning(loopback) is None, loopback
    cert, key = _self_signed(tmp_path)
    assert warning("0.0.0.0:8080", tls_cert=str(cert), tls_key=str(key)) is None
    data = config_data(tmp_path)
    data["daemon"] = {"listen": "0.0.0.0:8080"}
    del data["api"]["tokens"]
    assert plaintext_api_exposure(parse_config(data)) is None  # no API tokens: nothing to protect


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):
        while not cond():  # noqa: ASYNC110 - the job store has no change notification to wait on
            await asyncio.sleep(0.01)
