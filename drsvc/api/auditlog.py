"""/v1/audit (admin): the audit log's records and the local ``verify()`` verdict.

1. ``since`` (ISO 8601, no zone: local time; or ``@`` epoch seconds; default: 24 hours ago) and ``limit``
   (1..1000, default 100) choose the records: those written at or after ``since``, oldest first, at most
   ``limit``; ``more`` says whether others follow, and ``next`` is the ``since`` that fetches them.
2. Scoped like everything else: a record is shown only when its tenant, and every tenant its target names
   (a drill's ``tenants``), are within the token's scope. Records of no tenant (an unknown token, a request
   refused before its tenant was known) are shown to tokens of every tenant (``"*"``) only.
3. ``verify`` is the local log's verdict (chain, anchors: ``AuditLog.verify``), of the whole log; the sites'
   copies are compared by ``drsvc audit verify``, which reads the sites.

Reading the log is not itself a mutating request and writes no audit record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from drsvc.api.auth import Principal
from drsvc.api.errors import bad_request
from drsvc.api.guard import principal
from drsvc.api.view import context
from drsvc.audit import AuditRecord
from drsvc.audit.record import iso

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
DEFAULT_SINCE_S = 86400.0
_FRACTION = re.compile(r"T\d\d:?\d\d:?\d\d[.,](\d+)")


def parse_since(text: str) -> int:
    """ISO 8601 (no zone: local time; fractions of a second to the nanosecond) or ``@`` epoch seconds ->
    UTC nanoseconds; ValueError otherwise."""
    if text.startswith("@"):
        try:
            seconds = Decimal(text[1:])
        except InvalidOperation:
            raise ValueError("@ must be followed by epoch seconds") from None
        if not seconds.is_finite() or not 0 <= seconds < 2**63 // 10**9:
            raise ValueError("epoch seconds out of range")
        return int(seconds * 10**9)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not ISO 8601 (e.g. 2026-11-25T08:00:00+08:00) nor @epoch-seconds") from None
    if t.tzinfo is None:
        t = t.astimezone()
    m = _FRACTION.search(text)
    fraction = int(m.group(1)[:9].ljust(9, "0")) if m else 0
    return int(t.replace(microsecond=0).timestamp()) * 10**9 + fraction


def visible(who: Principal, rec: AuditRecord) -> bool:
    """Whether the token may see the record (see the module docstring, 2)."""
    if "*" in who.tenants:
        return True
    if rec.tenant is None or not who.sees(rec.tenant):
        return False
    named = rec.target.get("tenants", [])
    return isinstance(named, list) and all(isinstance(t, str) and who.sees(t) for t in named)


def _query(request: web.Request, now: float) -> tuple[int, int]:
    text = request.query.get("since")
    if text is None:
        since = int((now - DEFAULT_SINCE_S) * 1e9)
    else:
        try:
            since = parse_since(text)
        except ValueError as exc:
            raise bad_request(f"since {text!r}: {exc}", field="since") from None
    limit_text = request.query.get("limit", str(DEFAULT_LIMIT))
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise bad_request(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit_text!r}", field="limit"
        )
    return max(0, since), int(limit_text)


async def get_audit(request: web.Request) -> web.Response:
    who = principal(request, "admin", "reading the audit log")
    ctx = context(request)
    since, limit = _query(request, ctx.clock())

    def read() -> tuple[list[dict[str, Any]], str | None]:
        out: list[dict[str, Any]] = []
        for rec in ctx.audit.records(since):
            if not visible(who, rec):
                continue
            if len(out) == limit:
                return out, rec.time
            out.append(rec.to_json())
        return out, None

    records, following = await asyncio.to_thread(read)
    verdict = await asyncio.to_thread(ctx.audit.verify)
    return web.json_response(
        {
            "since": iso(since),
            "records": records,
            "more": following is not None,
            "next": following,
            "verify": verdict.to_json(),
        }
    )
