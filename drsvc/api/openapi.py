"""The OpenAPI 3.0 document of /v1, built as a dict and served at /v1/openapi.json.

Every operation documents its success answers and each error status it can give, no ``default``: the tests
run schemathesis against the served document (tests/test_api_schema.py), so an answer with a status the
document does not list, or a body that does not match its schema, fails them. Every operation may answer
500 ``internal`` (an unexpected exception; the details are only in the daemon's log) and every one that
needs a token 401. The results of jobs are described with their required keys: a restore's (RPO/RTO achieved
and their verdicts, site, fallbacks, files, bytes) and a drill's report (verdict, level, misses, scenarios
with their RPO and RTO).
"""

from __future__ import annotations

from typing import Any

VERSION = "1.0.0"

_ERR = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _n(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_S = {"type": "string"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_OBJ: dict[str, Any] = {"type": "object", "additionalProperties": True}
_STRS = {"type": "array", "items": _S}
_TIME = {"type": "string", "format": "date-time"}


def _obj(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERR, description)


def _op(
    op_id: str,
    summary: str,
    ok: dict[str, dict[str, Any]],
    *,
    errors: dict[str, str],
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
    tag: str,
) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    if not public:
        responses["401"] = _error("no bearer token, or one the daemon does not know")
    for status, why in errors.items():
        responses[status] = _error(why)
    responses["500"] = _error("an unexpected error; the details are only in the daemon's log")
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _S}


_LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "description": "at most this many, newest first",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
}
_JOB_ID = _path("id", "the job id (32 hexadecimal digits)")
_SINCE = {
    "name": "since",
    "in": "query",
    "required": False,
    "description": "records written at or after this time: ISO 8601 (no zone: local time) or @epoch-seconds; "
    "default: 24 hours ago",
    "schema": _S,
}
_AUDIT_LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "description": "at most this many, oldest first",
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}
_SOURCE = _path("source", "the source's name in the config")

_SOURCE_SUMMARY = _obj(
    [
        "name", "tenant", "type", "sites", "min_copies", "rpo_s", "rpo_target_s", "rpo_ok", "protected_until",
        "protected_until_at", "last_snapshot", "last_snapshot_at", "last_error", "snapshot_running",
        "snapshot_requested",
    ],
    name=_S,
    tenant=_S,
    type={"type": "string", "enum": ["tree", "log", "postgres"]},
    sites=_STRS,
    min_copies=_INT,
    rpo_s=_n({**_NUM, "description": "live RPO: now minus protected_until (null: never protected)"}),
    rpo_target_s=_n(_NUM),
    rpo_ok=_n(_BOOL),
    protected_until=_n({**_NUM, "description": "Unix seconds: all changes to here are at min_copies sites"}),
    protected_until_at=_n(_TIME),
    last_snapshot=_n(_NUM),
    last_snapshot_at=_n(_TIME),
    last_error=_n(_S),
    snapshot_running=_BOOL,
    snapshot_requested=_BOOL,
)  # fmt: skip

_SOURCE_DETAIL = {
    "allOf": [
        _ref("SourceSummary"),
        _obj(
            ["policy", "targets", "last_snapshot_record", "restorable", "problems"],
            policy=_obj(
                ["sites", "min_copies"],
                sites=_STRS,
                min_copies=_INT,
                interval_s=_n(_NUM),
                at=_STRS,
                watch=_BOOL,
                rpo_target_s=_n(_NUM),
                rto_target_s=_n(_NUM),
                retention=_n(_OBJ),
            ),
            targets={
                "type": "array",
                "items": _obj(
                    ["site", "up", "backlog_objects", "backlog_bytes", "holds_last_snapshot"],
                    site=_S,
                    up=_n(_BOOL),
                    last_error=_n(_S),
                    backlog_objects=_INT,
                    backlog_bytes=_INT,
                    holds_last_snapshot=_n(_BOOL),
                ),
            },
            last_snapshot_record=_n(
                _obj(["id", "time", "time_at", "partial", "sites"], id=_S, time=_NUM, time_at=_TIME,
                     partial=_BOOL, sites=_STRS)
            ),
            restorable=_n(
                _obj(["earliest", "latest"], earliest=_NUM, latest=_NUM, earliest_at=_TIME, latest_at=_TIME)
            ),
            problems=_STRS,
        ),
    ]
}  # fmt: skip

_SITE = _obj(
    ["name", "type", "tenants", "up", "last_error", "last_ack", "backlog_objects", "backlog_bytes"],
    name=_S,
    type={"type": "string", "enum": ["local", "s3"]},
    tenants=_STRS,
    up=_n({**_BOOL, "description": "null: no source ships to this site"}),
    last_error=_n(_S),
    last_ack=_n({**_NUM, "description": "Unix seconds of the last object the site acknowledged"}),
    last_ack_at=_n(_TIME),
    backlog_objects=_INT,
    backlog_bytes=_INT,
    backlog_oldest_age_s=_n(_NUM),
)

_VERDICT = {"type": "string", "enum": ["met", "missed", "unknown", "no target"]}
_NUM_N = _n(_NUM)

_FALLBACKS = {
    "type": "array",
    "description": "objects a site could not give (missing or corrupt) and that another site supplied",
    "items": _obj(["site", "key", "error"], site=_S, key=_S, error=_S),
}

_RESTORE_PROGRESS = {
    "type": "object",
    "additionalProperties": True,
    "description": "empty while queued; then the phase and the counts so far",
    "properties": {
        "phase": {"type": "string", "enum": ["planning", "restoring", "verifying", "done"]},
        "site": _S,
        "fallbacks": {**_INT, "description": "how many objects another site had to supply"},
        "bytes_done": _INT,
        "bytes_total": _INT,
        "files_done": _INT,
        "files_total": _INT,
        "eta_s": _NUM_N,
        "verify_files": _INT,
        "verify_bytes": _INT,
    },
}

_RESTORE_RESULT = {
    **_obj(
        ["source", "kind", "target", "requested_point", "restored_point", "rpo_achieved_s", "rto_achieved_s",
         "targets", "verdict", "verified", "site", "fallbacks", "files", "bytes", "warnings"],
        source=_S,
        kind={"type": "string", "enum": ["tree", "log", "postgres"]},
        target=_S,
        requested=_S,
        requested_point=_n({**_S, "description": "the point asked for (for 'latest': the request's time)"}),
        restored_point=_n({**_S, "description": "the recovery point actually restored"}),
        rpo_achieved_s=_n({**_NUM, "description": "requested point minus restored point"}),
        rto_achieved_s={**_NUM, "description": "from the request to verified data in place"},
        targets=_obj(["rpo_s", "rto_s"], rpo_s=_NUM_N, rto_s=_NUM_N),
        verdict=_obj(["rpo", "rto", "overall"], rpo=_VERDICT, rto=_VERDICT, overall=_VERDICT),
        verified={**_BOOL, "description": "the data in place was read back and checked against the sites"},
        verify=_n(_OBJ),
        site={**_S, "description": "the site the restore read first"},
        fallbacks=_FALLBACKS,
        files=_INT,
        bytes=_INT,
        bytes_fetched=_INT,
        warnings=_STRS,
    ),
    "additionalProperties": True,
    "description": "a restore's result; tree, log and postgres restores add their own details (snapshot, "
    "segments, base backup and WAL)",
}  # fmt: skip

_DRILL_PROGRESS = {
    "type": "object",
    "additionalProperties": True,
    "description": "empty while queued; then the scenario running and its phase",
    "properties": {
        "scenario": _INT,
        "of": _INT,
        "source": _S,
        "site": _S,
        "point": {"type": "string", "enum": ["latest", "earlier"]},
        "label": _S,
        "phase": _S,
        "bytes": _INT,
        "verdict": _S,
        "rto_s": _NUM_N,
    },
}

_LEVEL = _obj(
    ["gbt20988", "name", "reason"],
    gbt20988={**_INT, "minimum": 0, "maximum": 6, "description": "the GB/T 20988-2007 level (0: none)"},
    name=_S,
    reason=_S,
)

_SCENARIO = {
    **_obj(
        ["source", "site", "point", "requested", "restored_point", "rpo_s", "rto_s", "rpo_target_s",
         "rto_target_s", "verdict", "failures"],
        source=_S,
        tenant=_S,
        kind={"type": "string", "enum": ["tree", "log", "postgres"]},
        site={**_S, "description": "the site restored from, alone"},
        point={"type": "string", "enum": ["latest", "earlier"]},
        requested=_n(_S),
        restored_point=_n(_S),
        rpo_s=_n({**_NUM, "description": "requested minus restored point; null: did not recover alone"}),
        rto_s=_n({**_NUM, "description": "scenario start to verified data; null: did not recover alone"}),
        rpo_target_s=_NUM_N,
        rto_target_s=_NUM_N,
        fallback_rpo_s=_NUM_N,
        fallback_rto_s=_NUM_N,
        lag_s=_NUM_N,
        verdict={"type": "string", "enum": ["pass", "fail"]},
        failures=_STRS,
        fallbacks=_FALLBACKS,
        files=_INT,
        bytes=_INT,
        isolated=_BOOL,
    ),
    "additionalProperties": True,
}  # fmt: skip

_DRILL_REPORT = {
    **_obj(
        ["id", "plan", "verdict", "misses", "level", "scenarios"],
        id=_S,
        plan={**_S, "description": "the plan's name"},
        started=_S,
        finished=_S,
        verdict={"type": "string", "enum": ["pass", "fail"]},
        misses=_STRS,
        level=_LEVEL,
        seed=_INT,
        scenarios={"type": "array", "items": _SCENARIO},
    ),
    "additionalProperties": True,
    "description": "the drill report (docs/DRILLS.md)",
}

_DRILL_RESULT = {
    **_obj(
        ["verdict", "level", "misses", "report"],
        drill=_n(_S),
        verdict={"type": "string", "enum": ["pass", "fail"]},
        level=_LEVEL,
        misses=_STRS,
        evidence={"type": "object", "additionalProperties": _S},
        report=_DRILL_REPORT,
    ),
    "additionalProperties": True,
}


def _job(kind: str, progress: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        ["id", "kind", "tenants", "who", "request", "state", "created", "started", "finished", "progress",
         "result", "error"],
        id=_S,
        kind={"type": "string", "enum": [kind]},
        tenants=_STRS,
        who={**_S, "description": "the name of the token that started it"},
        request=_OBJ,
        state={"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled",
                                          "failed-interrupted"]},
        created=_NUM,
        started=_n(_NUM),
        finished=_n(_NUM),
        created_at=_n(_TIME),
        started_at=_n(_TIME),
        finished_at=_n(_TIME),
        progress=progress,
        result=_n({**result, "description": "set when the job succeeded"}),
        error=_n({**_obj(["code", "message"], code=_S, message=_S, hint=_n(_S)),
                  "additionalProperties": True}),
    )  # fmt: skip


_RESTORE_JOB = _job("restore", _RESTORE_PROGRESS, _RESTORE_RESULT)
_DRILL_JOB = _job("drill", _DRILL_PROGRESS, _DRILL_RESULT)

_AUDIT_RECORD = {
    **_obj(
        ["seq", "time", "time_ns", "who", "action", "target", "result", "status", "tenant", "remote",
         "request_id", "prev", "hash"],
        v=_INT,
        seq=_INT,
        time={**_S, "description": "UTC, to the nanosecond"},
        time_ns=_INT,
        who={**_S, "description": "the token's name, or anonymous"},
        action={**_S, "description": "method and route, e.g. POST /v1/restores"},
        target=_OBJ,
        result={**_S, "description": "attempt, ok, or refused: <code>: <message>, or failed: ..."},
        status={**_INT, "description": "the HTTP status (0 in an attempt record)"},
        tenant=_n(_S),
        remote=_n(_S),
        request_id=_n(_S),
        prev=_S,
        hash=_S,
    ),
    "additionalProperties": False,
}  # fmt: skip

_AUDIT_PAGE = _obj(
    ["since", "records", "more", "next", "verify"],
    since=_S,
    records={"type": "array", "items": _ref("AuditRecord")},
    more={**_BOOL, "description": "more records follow: ask again with since = next"},
    next=_n(_S),
    verify={
        **_obj(["intact", "records", "findings"], intact=_BOOL, records=_INT, files=_INT,
               first_seq=_INT, last_seq=_INT, directory=_S, replicated=_n(_BOOL),
               findings={"type": "array", "items": _OBJ}),
        "additionalProperties": True,
        "description": "the local log's verdict (chain and anchors), of the whole log",
    },
)  # fmt: skip

_RESTORE_REQUEST = {
    "type": "object",
    "required": ["source", "target"],
    "additionalProperties": False,
    "properties": {
        "source": {**_S, "minLength": 1},
        "at": {**_S, "default": "latest", "description": "'latest', ISO 8601, or @epoch-seconds"},
        "site": _n({**_S, "minLength": 1, "description": "read this site first (others only on failure)"}),
        "target": {**_S, "minLength": 1, "description": "absolute path inside the restore roots"},
        "verify": {**_BOOL, "default": True},
        "dry_run": {**_BOOL, "default": False, "description": "answer the plan; write nothing"},
    },
}

_RESTORE_PLAN = {
    **_obj(
        ["dry_run", "source", "kind", "target", "site"],
        dry_run=_BOOL,
        source=_S,
        kind=_S,
        target=_S,
        site=_S,
        requested=_S,
        requested_point=_n(_TIME),
        recovery_point=_n(_TIME),
        rpo_expected_s=_n(_NUM),
        warnings=_STRS,
    ),
    "additionalProperties": True,
    "description": "what the restore would read: the snapshot (or checkpoint and segments, or base backup "
    "and WAL), the bytes, the sites holding them",
}

_DRILL_REQUEST = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
    "properties": {
        "plan": {**_OBJ, "description": "a drill plan table (see docs/API.md); no postgres probes: those "
                 "come only from plan files"},
        "plan_file": {**_S, "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,99}(\\.toml)?$",
                      "description": "a plan in <drill dir>/plans, by name"},
    },
}  # fmt: skip


def _list_of(key: str, item: str) -> dict[str, Any]:
    return _obj([key], **{key: {"type": "array", "items": _ref(item)}})


_MUTATE_503 = "the daemon is draining (stopping or reloading), or the audit log cannot be written"
_BAD_BODY = "the body is not a JSON object, or a field is missing or wrong (named in field)"
_TOO_LARGE = "the body is larger than the daemon accepts"


def document() -> dict[str, Any]:
    jobs = {"restore": "Restores", "drill": "Drills"}
    job_ref = {"restore": "RestoreJob", "drill": "DrillJob"}
    paths: dict[str, Any] = {
        "/v1/openapi.json": {
            "get": _op(
                "openapi", "this document", {"200": _json(_OBJ, "the OpenAPI document")},
                errors={}, public=True, tag="meta",
            )
        },
        "/v1/sources": {
            "get": _op(
                "listSources", "the sources of the token's tenants, with live RPO",
                {"200": _json(_list_of("sources", "SourceSummary"), "sources")},
                errors={"503": "the daemon is starting or reloading"}, tag="sources",
            )
        },
        "/v1/sources/{source}": {
            "get": _op(
                "getSource", "one source: policy, targets, live RPO, last snapshot, restorable range",
                {"200": _json(_ref("SourceDetail"), "the source")},
                errors={"403": "the source is outside the token's tenants", "404": "no such source",
                        "503": "the daemon is starting or reloading"},
                params=[_SOURCE], tag="sources",
            )
        },
        "/v1/sources/{source}/snapshots": {
            "post": _op(
                "snapshotNow", "take a snapshot now (after the one running, if any)",
                {"202": _json(_ref("SourceSummary"), "the snapshot is requested")},
                errors={"403": "not the operator role, or the source is outside the token's tenants",
                        "404": "no such source", "409": "a log source is streamed, not snapshotted",
                        "503": _MUTATE_503 + ", or the source is not running yet"},
                params=[_SOURCE], tag="sources",
            )
        },
        "/v1/sites": {
            "get": _op(
                "listSites", "sites serving the token's tenants: health, backlog, last acknowledgement",
                {"200": _json(_list_of("sites", "Site"), "sites")},
                errors={"503": "the daemon is starting or reloading"}, tag="sites",
            )
        },
        "/v1/restores": {
            "get": _op(
                "listRestores", "restore jobs whose tenants are all the token's, newest first",
                {"200": _json(_list_of("restores", "RestoreJob"), "restore jobs")},
                errors={"400": "a bad limit"}, params=[_LIMIT], tag="restores",
            ),
            "post": _op(
                "startRestore", "start a restore (202 with the job) or, with dry_run, answer its plan",
                {"202": _json(_ref("RestoreJob"), "the restore job, queued"),
                 "200": _json(_ref("RestorePlan"), "the dry run's plan")},
                errors={"400": _BAD_BODY + ", or the site is not in the source's policy",
                        "403": "not the operator role, or the source is outside the token's tenants",
                        "404": "no such source", "413": _TOO_LARGE,
                        "422": "the target is outside the restore roots (or there are none), or nothing "
                        "is restorable", "503": _MUTATE_503 + ", or the sites cannot be read (dry run)"},
                body=_ref("RestoreRequest"), tag="restores",
            ),
        },
        "/v1/drills": {
            "get": _op(
                "listDrills", "drill jobs whose tenants are all the token's, newest first",
                {"200": _json(_list_of("drills", "DrillJob"), "drill jobs")},
                errors={"400": "a bad limit"}, params=[_LIMIT], tag="drills",
            ),
            "post": _op(
                "startDrill", "start a drill from a plan table or a plan file",
                {"202": _json(_ref("DrillJob"), "the drill job, queued")},
                errors={"400": "the plan is invalid (the key is named in field), or an inline plan has "
                        "probes", "403": "not the operator role, or a source of the plan is not one of "
                        "the token's tenants' sources", "404": "no such plan file", "413": _TOO_LARGE,
                        "422": "the plan's scratch is outside the restore roots", "503": _MUTATE_503},
                body=_ref("DrillRequest"), tag="drills",
            ),
        },
        "/v1/drills/{id}/report.html": {
            "get": _op(
                "drillReportHtml", "the drill's report as one HTML page",
                {"200": {"description": "the report", "content": {"text/html": {"schema": _S}}}},
                errors={"403": "the drill is outside the token's tenants",
                        "404": "no such drill, or it ended without a report",
                        "409": "the drill has not finished"},
                params=[_JOB_ID], tag="drills",
            )
        },
        "/v1/audit": {
            "get": _op(
                "getAudit", "audit records of the token's tenants, oldest first, and the log's verdict "
                "(admin role)",
                {"200": _json(_AUDIT_PAGE, "records and the local verdict")},
                errors={"400": "a bad since or limit", "403": "not the admin role"},
                params=[_SINCE, _AUDIT_LIMIT], tag="audit",
            )
        },
    }  # fmt: skip
    for kind, tag in jobs.items():
        paths[f"/v1/{kind}s/{{id}}"] = {
            "get": _op(
                f"get{tag[:-1]}",
                f"one {kind} job: state, progress, result or error",
                {"200": _json(_ref(job_ref[kind]), f"the {kind} job")},
                errors={"403": f"the {kind} touches a tenant outside the token's",
                        "404": f"no such {kind} job"},
                params=[_JOB_ID],
                tag=tag.lower(),
            ),
            "delete": _op(
                f"cancel{tag[:-1]}",
                f"cancel a queued or running {kind}; what it wrote is removed",
                {"200": _json(_ref(job_ref[kind]), "the job, cancelled")},
                errors={"403": f"not the operator role, or the {kind} touches a tenant outside the token's",
                        "404": f"no such {kind} job", "409": "the job has already finished",
                        "503": _MUTATE_503},
                params=[_JOB_ID],
                tag=tag.lower(),
            ),
        }  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "drsvc API",
            "version": VERSION,
            "description": "Sources, sites, restores, drills and the audit log of a drsvc daemon. Bearer "
            "tokens with roles viewer < operator < admin, scoped to tenants. Every error is {code, message[, "
            "field, hint]}; every POST and DELETE is written to the audit log. See docs/API.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    **_obj(
                        ["code", "message"],
                        code={**_S, "description": "stable, machine-readable: unauthorized, forbidden, "
                              "not_found, invalid, finished, draining, audit_unavailable, ..."},
                        message={**_S, "description": "what is wrong, naming the field, source, job or path"},
                        field=_n({**_S, "description": "the request field at fault"}),
                        hint=_S,
                    ),
                },
                "SourceSummary": _SOURCE_SUMMARY,
                "SourceDetail": _SOURCE_DETAIL,
                "Site": _SITE,
                "RestoreJob": _RESTORE_JOB,
                "DrillJob": _DRILL_JOB,
                "RestoreResult": _RESTORE_RESULT,
                "DrillReport": _DRILL_REPORT,
                "AuditRecord": _AUDIT_RECORD,
                "RestoreRequest": _RESTORE_REQUEST,
                "RestorePlan": _RESTORE_PLAN,
                "DrillRequest": _DRILL_REQUEST,
            },
        },
    }  # fmt: skip
