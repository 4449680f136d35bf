"""The daemon's HTTP endpoint: liveness, readiness and Prometheus metrics.

1. ``make_app(metrics, health)`` builds the ``aiohttp`` app; its state sits under typed ``web.AppKey``s.
2. ``GET /healthz`` asks ``health.alive()``: 200 ``{"status": "ok"}`` or 503 ``{"status": "dead"}``.
3. ``GET /readyz`` asks ``health.ready()``: 200 ``{"ready": true}`` or
   503 ``{"ready": false, "reasons": [...]}``.
   A check that raises counts as not alive / not ready, with the error as the reason.
4. ``GET /metrics`` refreshes every RPO gauge from the clock, then renders the registry.
5. Unknown paths answer 404 ``{"error": "not found", "path": ...}``; wrong methods 405 in the same shape.
6. ``make_app(..., api=sub)`` mounts the API application (built by the daemon from ``drsvc.api``, a layer
   above this one) under ``/v1``; it has its own middlewares (auth, audit, errors in the API's shape).
7. ``serve(app, host, port, ssl_context=...)`` starts a TCP (with a context: TLS-only) site and returns
   the runner; the caller calls ``runner.cleanup()``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from drsvc.core.config import parse_listen
from drsvc.metrics import Metrics


class Health(Protocol):
    """What the endpoint asks the daemon; both calls must be cheap and must not block."""

    def alive(self) -> bool: ...

    def ready(self) -> tuple[bool, list[str]]:
        """Whether the daemon can do its job, and when not, why (one line per reason, for an operator)."""
        ...


@dataclass(frozen=True)
class HealthChecks:
    """A ``Health`` made of two callables, for wiring and tests."""

    alive_fn: Callable[[], bool]
    ready_fn: Callable[[], tuple[bool, list[str]]]

    def alive(self) -> bool:
        return self.alive_fn()

    def ready(self) -> tuple[bool, list[str]]:
        return self.ready_fn()


METRICS_KEY = web.AppKey("drsvc_metrics", Metrics)
HEALTH_KEY = web.AppKey[Health]("drsvc_health")
CLOCK_KEY = web.AppKey[Callable[[], float]]("drsvc_clock")


API_PREFIX = "/v1"


def make_app(
    metrics: Metrics,
    health: Health,
    *,
    clock: Callable[[], float] = time.time,
    api: web.Application | None = None,
) -> web.Application:
    """The HTTP application; each scrape computes RPO gauges against ``clock()`` (Unix seconds). ``api``,
    when given, is mounted under ``/v1``."""
    app = web.Application(middlewares=[_json_errors])
    app[METRICS_KEY] = metrics
    app[HEALTH_KEY] = health
    app[CLOCK_KEY] = clock
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    if api is not None:
        app.add_subapp(API_PREFIX, api)
    return app


async def _healthz(request: web.Request) -> web.Response:
    try:
        alive = request.app[HEALTH_KEY].alive()
    except Exception as exc:
        return web.json_response({"status": "dead", "error": f"liveness check failed: {exc!r}"}, status=503)
    if alive:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "dead"}, status=503)


async def _readyz(request: web.Request) -> web.Response:
    try:
        ready, reasons = request.app[HEALTH_KEY].ready()
    except Exception as exc:
        ready, reasons = False, [f"readiness check failed: {exc!r}"]
    if ready:
        return web.json_response({"ready": True})
    return web.json_response({"ready": False, "reasons": list(reasons)}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    metrics.update_rpo(request.app[CLOCK_KEY]())
    body, content_type = metrics.render()
    # content_type carries parameters (version, charset), which web.Response(content_type=...) refuses.
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"error": "not found", "path": request.path}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        body = {"error": "method not allowed", "path": request.path, "allowed": sorted(exc.allowed_methods)}
        return web.json_response(body, status=405, headers={"Allow": ",".join(sorted(exc.allowed_methods))})


async def serve(
    app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Start ``app`` on ``host:port`` (port 0: any free port, see ``runner.addresses``), over TLS with
    ``ssl_context``; the caller cleans up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


__all__ = ["API_PREFIX", "Health", "HealthChecks", "make_app", "parse_listen", "serve"]
