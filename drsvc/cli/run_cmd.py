"""drsvc run: the long-running replication daemon (systemd Type=notify).

READY=1 after start-up; STATUS= each tick; WATCHDOG=1 only while the supervisor makes progress. SIGTERM (and
SIGINT) stop intake, drain uploads within daemon.drain_timeout, persist state and exit 0. SIGHUP reloads the
config: an invalid one is refused with a log line and the running one stays; the API's tokens (and tokens
file) and TLS certificate are read again either way. The API (/v1, ``DaemonApi``) lives across reloads: its
jobs keep running; while the supervisor restarts it answers 503. With tokens on a non-loopback listener
without TLS, the start logs a warning (``plaintext_api_exposure``). /metrics shows the newest drill report
(``<drill dir>/last.json``, written by ``drsvc drill``), followed to a new ``[drill] dir`` after a reload.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
from pathlib import Path
from typing import Any

from drsvc import logs
from drsvc.app import App
from drsvc.core.config import Config, S3SiteConfig, load_config
from drsvc.core.errors import DRError
from drsvc.daemon_api import DaemonApi
from drsvc.drill.report import LAST, report_dir
from drsvc.http import HealthChecks, make_app, parse_listen, serve
from drsvc.metrics import Metrics
from drsvc.notify import Notifier, WatchdogPinger
from drsvc.site_loop import request_observer
from drsvc.supervisor import Supervisor

log = logging.getLogger("drsvc.run")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the replication daemon in the foreground")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=run)


class Daemon:
    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.metrics = Metrics()
        self.metrics.watch_drill_report(report_dir(config) / LAST)  # `drsvc drill` runs outside the daemon
        self.notifier = Notifier.from_env()
        self.pinger = WatchdogPinger.for_notifier(self.notifier)
        self.app: App | None = None
        self.supervisor: Supervisor | None = None
        self.api: DaemonApi | None = None
        self.reload_error: str | None = None

    def ready(self) -> tuple[bool, list[str]]:
        if self.supervisor is None:
            return False, ["starting or reloading"]
        return self.supervisor.ready()

    async def start_supervisor(self) -> None:
        self.app = App(self.config, observer=request_observer(self.metrics))
        self.supervisor = Supervisor(
            self.app, self.metrics, on_progress=self._progress, on_status=self._status
        )
        await self.supervisor.start()
        if self.api is not None:
            self.api.attach(self.supervisor)

    def _status(self, line: str) -> None:
        # a refused reload stays visible in `systemctl status` until a reload succeeds
        self.notifier.status(line + (f"; reload refused: {self.reload_error}" if self.reload_error else ""))

    def _progress(self) -> None:
        if self.pinger is not None:
            self.pinger.progress()

    async def stop_supervisor(self) -> None:
        if self.api is not None:
            self.api.detach()
        if self.supervisor is not None:
            await self.supervisor.stop(self.config.daemon.drain_timeout)
        if self.app is not None:
            await self.app.close()
        self.supervisor, self.app = None, None

    async def reload(self, stop: asyncio.Event) -> None:
        try:
            new = load_config(self.config_path)
            _read_secrets(new)  # before anything stops: an unreadable secret refuses the reload
        except DRError as exc:
            log.error(
                "reload refused: the new config is invalid; the running one stays",
                extra={"error": str(exc), "config": str(self.config_path)},
            )
            self.reload_error = exc.message[:120]
            self.notifier.status(f"reload refused: {exc}")
            if self.api is not None:
                self.api.reload(self.config)  # the tokens file is read again all the same
            return
        self.notifier.reloading()
        log.info("reloading", extra={"config": str(self.config_path)})
        old = self.config
        await self.stop_supervisor()
        if stop.is_set():  # SIGTERM arrived during the drain: do not start again
            return
        try:
            self.config = new
            await self.start_supervisor()
        except Exception as exc:
            log.exception("reload failed while starting; going back to the previous config")
            await self.stop_supervisor()
            self.config = old
            await self.start_supervisor()
            self.reload_error = str(exc)[:120]
            self.notifier.ready()
            return
        self.reload_error = None
        self.metrics.watch_drill_report(report_dir(new) / LAST)  # [drill] dir may have moved
        if self.api is not None:
            self.api.reload(new)
        for gone in {(s.tenant, n) for n, s in old.sources.items()} - {
            (s.tenant, n) for n, s in new.sources.items()
        }:
            self.metrics.remove_source(*gone)
        for site in _used_sites(old) - _used_sites(new):
            self.metrics.remove_site(site)
        for tenant in set(old.tenants) - set(new.tenants):
            self.metrics.remove_tenant(tenant)
        self.notifier.ready()
        log.info("reloaded", extra={"sources": len(new.sources), "sites": len(new.sites)})

    async def main(self) -> int:
        for key in self.config.inline_secrets():
            log.warning(
                "secret written inline in the config; use file = ... or env = ...", extra={"key": key}
            )
        exposed = plaintext_api_exposure(self.config)
        if exposed is not None:
            log.warning(exposed, extra={"listen": self.config.daemon.listen})
        host, port = parse_listen(self.config.daemon.listen)
        self.api = api = DaemonApi(self.config, self.metrics)
        try:
            http = make_app(self.metrics, HealthChecks(lambda: True, self.ready), api=api.web_app())
            runner = await serve(http, host, port, ssl_context=api.tls)
        except BaseException:
            await api.close()
            raise
        await api.start()
        loop = asyncio.get_running_loop()
        stop, hup = asyncio.Event(), asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        try:
            await self.start_supervisor()
            if self.pinger is not None:
                self.pinger.start()
            self.notifier.ready()
            log.info(
                "started",
                extra={
                    "listen": self.config.daemon.listen,
                    "sources": len(self.config.sources),
                    "sites": len(self.config.sites),
                },
            )
            while not stop.is_set():
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if hup.is_set() and not stop.is_set():
                    hup.clear()
                    await self.reload(stop)
            self.notifier.stopping()
            log.info("stopping", extra={"drain_timeout": self.config.daemon.drain_timeout})
            api.stopping = True  # the API refuses changes from now on; reads go on until the listener closes
            await self.stop_supervisor()
            log.info("stopped")
            return 0
        finally:
            if self.pinger is not None:
                await self.pinger.stop()
            await self.stop_supervisor()
            try:
                await runner.cleanup()  # the listener first: no request finds the job store closed
            finally:
                await api.close()


def plaintext_api_exposure(config: Config) -> str | None:
    """A warning when the API has tokens and listens beyond loopback without TLS (bearer tokens and tenant
    data would cross the network in clear), else None. A host name other than ``localhost`` counts as
    beyond loopback: what it resolves to is not known here."""
    api = config.api
    if not (api.tokens or api.tokens_file is not None) or api.tls_cert is not None:
        return None
    host, _port = parse_listen(config.daemon.listen)
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        "the API accepts bearer tokens on a non-loopback address without TLS: tokens and tenant data cross "
        "the network in clear; set [api] tls_cert and tls_key, or listen on 127.0.0.1"
    )


def _read_secrets(config: Config) -> None:
    """Read every key and credential the config names (files, environment), raising ConfigError naming the
    key: a config can parse and still point at a secret that is not there."""
    for name, tenant in config.tenants.items():
        tenant.key.material(name)
    for name, site in config.sites.items():
        if isinstance(site, S3SiteConfig):
            site.access_key.read_text(f"sites.{name}.access_key")
            site.secret_key.read_text(f"sites.{name}.secret_key")


def _used_sites(config: Config) -> set[str]:
    return {site for sc in config.sources.values() for site in sc.sites}


async def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    path = Path(args.config)
    return await Daemon(path, load_config(path)).main()
