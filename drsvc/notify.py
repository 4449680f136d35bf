"""The systemd notification protocol for a ``Type=notify`` service: sd_notify(3) without libsystemd.

1. ``Notifier.from_env()`` reads ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and
   ``WATCHDOG_USEC``/``WATCHDOG_PID``. Without ``NOTIFY_SOCKET`` every method is a no-op, so the daemon
   runs the same outside systemd.
2. Each notification is one datagram of ``KEY=value`` lines, sent on a fresh non-blocking ``AF_UNIX``
   ``SOCK_DGRAM`` socket. A failure (socket gone, queue full) is counted in ``errors`` and never raised: the
   service must not die because its supervisor's mailbox is unreachable.
3. ``WatchdogPinger`` sends ``WATCHDOG=1`` every ``interval`` seconds, but only while the supervised loop
   keeps calling ``progress()``. When the loop stalls for longer than ``stall_after`` the pings stop and
   systemd restarts the service after ``WatchdogSec``: a live process with a stuck loop is not a healthy one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol


class Notifier:
    """Sends state changes to the service manager; a no-op when not started by one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` is a filesystem path or ``"\\0name"`` for an abstract socket; None disables sending."""
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.errors = 0
        self.last_error: OSError | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(_parse_address(environ.get("NOTIFY_SOCKET", "")), _parse_watchdog(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the manager's timeout, as sd_watchdog_enabled(3) advises), or None."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + text.replace("\r", " ").replace("\n", " "))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """For ``Type=notify-reload`` (systemd >= 253), which wants the reload's start on CLOCK_MONOTONIC."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; returns whether it was delivered. Never raises."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode(errors="replace")
        flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        try:
            with socket.socket(socket.AF_UNIX, flags) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN (queue full), ENOBUFS, ...
            self.errors += 1
            self.last_error = exc
            return False
        return True


def _parse_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value:
        # A relative path, or vsock:/... of systemd >= 254 (not supported here), goes through as it is: the
        # send fails and is counted, as with any unreachable socket.
        return value
    return None


def _parse_watchdog(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (sd_watchdog_enabled(3)), else None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec if usec > 0 else None


class WatchdogTarget(Protocol):
    def watchdog(self) -> bool: ...


class WatchdogPinger:
    """Pings every ``interval`` seconds while ``progress()`` was called within the last ``stall_after``."""

    def __init__(
        self,
        target: WatchdogTarget,
        interval: float,
        stall_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval}")
        self.target = target
        self.interval = interval
        self.stall_after = 2 * interval if stall_after is None else stall_after
        self._clock = clock
        self.last_progress = clock()
        self.pings = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_notifier(cls, notifier: Notifier, stall_after: float | None = None) -> WatchdogPinger | None:
        """A pinger at the interval systemd asked for, or None when the watchdog is off."""
        interval = notifier.watchdog_interval
        return None if interval is None else cls(notifier, interval, stall_after)

    def progress(self) -> None:
        """Called by the supervised loop each time round: proof that it is not stuck."""
        self.last_progress = self._clock()

    def run_once(self, now: float | None = None) -> bool:
        """Ping if the loop made progress recently; returns whether it pinged."""
        now = self._clock() if now is None else now
        if now - self.last_progress > self.stall_after:
            return False
        self.target.watchdog()
        self.pings += 1
        return True

    async def run(self) -> None:
        while True:
            self.run_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self.progress()
            self._task = asyncio.create_task(self.run(), name="watchdog-pinger")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # stop() itself was cancelled, not only the pinger
