"""One JSON shape for every API error: ``{"code": ..., "message": ..., "field"?: ..., "hint"?: ...}``.

Handlers raise ``ApiError``; the ``errors`` middleware turns it, aiohttp's own 404/405 and any unexpected
exception into that shape (an unexpected one is logged with its traceback and answers 500 ``internal``
without details). ``DRError``s that reach the middleware are mapped by their subtree.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from drsvc.core.errors import ConfigError, DRError, TransientStoreError

log = logging.getLogger("drsvc.api")

ERROR = web.ResponseKey("drsvc_error", dict)  # an error response's body, for the audit record


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code, and a message naming the problem."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.hint = hint
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.hint:
            out["hint"] = self.hint
        return out

    def response(self) -> web.Response:
        resp = web.json_response(self.body(), status=self.status, headers=self.headers)
        resp[ERROR] = self.body()
        return resp


def bad_request(message: str, field: str | None = None, code: str = "invalid") -> ApiError:
    return ApiError(400, code, message, field=field)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def from_dr_error(exc: DRError) -> ApiError:
    """A domain error that escaped a handler: a site that cannot be reached is 503, a config complaint
    (an unknown source or site, a target outside the roots) 400, anything else 500 with its message."""
    if isinstance(exc, TransientStoreError):
        return ApiError(503, "unavailable", exc.message, hint=exc.hint)
    if isinstance(exc, ConfigError):
        return ApiError(400, "invalid", exc.message, field=exc.fields.get("key"), hint=exc.hint)
    return ApiError(500, "failed", exc.message, hint=exc.hint)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return not_found(f"no such API path: {request.path}").response()
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        return ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}",
            headers={"Allow": ",".join(allowed)},
        ).response()
    except web.HTTPException as exc:  # e.g. 413 from aiohttp's body size limit
        return ApiError(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason).response()
    except DRError as exc:
        log.warning("API request failed", extra={"path": request.path, "error": str(exc)})
        return from_dr_error(exc).response()
    except Exception:
        log.exception("API request failed unexpectedly", extra={"path": request.path})
        return ApiError(500, "internal", "internal error; the daemon's log has the details").response()
