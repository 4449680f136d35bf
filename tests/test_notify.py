"""The systemd notification protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drsvc.notify import Notifier, WatchdogPinger


@dataclass
class FakeManager:
    """The receiving end of NOTIFY_SOCKET, as systemd binds it."""

    sock: socket.socket
    env: dict[str, str]

    def recv(self, timeout: float = 1.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    def notifier(self, **env: str) -> Notifier:
        return Notifier.from_env({**self.env, **env})


@pytest.fixture
def manager_factory(tmp_path: Path) -> Iterator[Callable[[bool], FakeManager]]:
    """Binds a datagram socket, on a path in tmp_path or (abstract=True) in the abstract namespace."""
    socks: list[socket.socket] = []

    def make(abstract: bool = False) -> FakeManager:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        socks.append(sock)
        if abstract:
            name = f"drsvc-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            return FakeManager(sock, {"NOTIFY_SOCKET": "@" + name})
        path = str(tmp_path / f"notify-{len(socks)}")
        assert len(path) < 108, f"unix socket path too long: {path}"
        sock.bind(path)
        return FakeManager(sock, {"NOTIFY_SOCKET": path})

    yield make
    for sock in socks:
        sock.close()


def test_notifications_arrive(manager_factory: Callable[[bool], FakeManager]) -> None:
    manager = manager_factory(False)
    notifier = manager.notifier()

    assert notifier.ready()
    assert manager.recv() == "READY=1"
    assert notifier.status("syncing\n3 sites\r\nok")
    assert manager.recv() == "STATUS=syncing 3 sites  ok"
    assert notifier.watchdog()
    assert manager.recv() == "WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reload_line, usec_line = manager.recv().split("\n")
    assert reload_line == "RELOADING=1"
    key, value = usec_line.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert notifier.stopping()
    assert manager.recv() == "STOPPING=1"
    assert notifier.errors == 0


def test_abstract_socket(manager_factory: Callable[[bool], FakeManager]) -> None:
    manager = manager_factory(True)
    notifier = manager.notifier()
    assert notifier.address is not None and notifier.address.startswith("\0")
    assert notifier.ready()
    assert manager.recv() == "READY=1"


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    for call in (notifier.ready, notifier.stopping, notifier.reloading, notifier.watchdog):
        assert call() is False
    assert notifier.status("x") is False
    assert notifier.errors == 0
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", **env})
    assert notifier.watchdog_interval == interval
    assert (WatchdogPinger.for_notifier(notifier) is None) == (interval is None)


def test_missing_socket_counts_an_error(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.errors == 2
    assert isinstance(notifier.last_error, FileNotFoundError)


def test_full_queue_neither_blocks_nor_raises(manager_factory: Callable[[bool], FakeManager]) -> None:
    manager = manager_factory(False)  # never reads: its receive queue fills after a few datagrams
    notifier = manager.notifier()
    results = [notifier.watchdog() for _ in range(200)]
    assert any(results)
    assert notifier.errors == results.count(False) > 0
    assert notifier.last_error is not None
    assert notifier.last_error.errno in (errno.EAGAIN, errno.ENOBUFS)


def test_pinger_run_once_follows_progress(manager_factory: Callable[[bool], FakeManager]) -> None:
    manager = manager_factory(False)
    now = [100.0]
    pinger = WatchdogPinger(manager.notifier(), interval=1.0, clock=lambda: now[0])
    assert pinger.stall_after == 2.0

    assert pinger.run_once()
    assert manager.recv() == "WATCHDOG=1"
    now[0] = 101.9
    assert pinger.run_once()
    assert manager.recv() == "WATCHDOG=1"
    now[0] = 102.1  # 2.1 s without progress
    assert not pinger.run_once()
    assert manager.drain() == []
    pinger.progress()
    assert pinger.run_once()
    assert pinger.run_once(now=now[0] + 2.5) is False
    assert manager.drain() == ["WATCHDOG=1"]
    assert pinger.pings == 3


def test_pinger_rejects_nonpositive_interval(manager_factory: Callable[[bool], FakeManager]) -> None:
    with pytest.raises(ValueError, match="positive"):
        WatchdogPinger(manager_factory(False).notifier(), interval=0)


async def test_pinger_pings_while_loop_progresses_and_stops_when_stalled(
    manager_factory: Callable[[bool], FakeManager],
) -> None:
    manager = manager_factory(False)
    notifier = manager.notifier(WATCHDOG_USEC="100000")  # 0.1 s: ping every 0.05 s, stall after 0.1 s
    pinger = WatchdogPinger.for_notifier(notifier)
    assert pinger is not None and pinger.interval == 0.05

    pinger.start()
    try:
        for _ in range(25):  # the supervised loop, 0.25 s of progress
            pinger.progress()
            await asyncio.sleep(0.01)
        healthy = manager.drain()
        assert len(healthy) >= 3
        assert set(healthy) == {"WATCHDOG=1"}

        await asyncio.sleep(0.25)  # the loop is stuck: no progress for longer than stall_after
        manager.drain()  # pings sent in the first 0.1 s of the stall
        await asyncio.sleep(0.15)
        assert manager.drain() == []
        assert pinger.run_once() is False
        assert manager.drain() == []

        pinger.progress()  # the loop recovers
        await asyncio.sleep(0.12)
        assert manager.drain()
    finally:
        await pinger.stop()
    assert notifier.errors == 0
