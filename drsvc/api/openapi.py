"""The OpenAPI 3.0 document of /v1, built as a dict and served at /v1/openapi.json.

Every operation documents its success answer and, as ``default``, the one error shape; the tests run
schemathesis against the served document (tests/test_api_schema.py), so the schemas below are checked
against what the handlers really send.
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
        responses["403"] = _error("the token's role or tenants do not allow this")
    for status, why in errors.items():
        responses[status] = _error(why)
    responses["default"] = _error("any other error, in the same shape")
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

_JOB = _obj(
    ["id", "kind", "tenants", "who", "request", "state", "created", "started", "finished", "progress",
     "result", "error"],
    id=_S,
    kind={"type": "string", "enum": ["restore", "drill"]},
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
    progress={
        **_OBJ,
        "description": "restores: phase, bytes_done, bytes_total, files_done, files_total, eta_s, site, "
        "fallbacks; drills: scenario, of, source, site, point, phase",
    },
    result=_n({**_OBJ, "description": "restores: RPO/RTO achieved and their verdicts, site, fallbacks, "
               "files, bytes; drills: verdict, level, misses and the whole report"}),
    error=_n({**_obj(["code", "message"], code=_S, message=_S, hint=_S), "additionalProperties": True}),
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
        "plan": {**_OBJ, "description": "a drill plan table (see docs/API.md)"},
        "plan_file": {**_S, "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,99}(\\.toml)?$",
                      "description": "a plan in <drill dir>/plans, by name"},
    },
}  # fmt: skip


def _list_of(key: str, item: str) -> dict[str, Any]:
    return _obj([key], **{key: {"type": "array", "items": _ref(item)}})


def document() -> dict[str, Any]:
    jobs = {"restore": "Restores", "drill": "Drills"}
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
                {"200": _json(_list_of("sources", "SourceSummary"), "sources")}, errors={}, tag="sources",
            )
        },
        "/v1/sources/{source}": {
            "get": _op(
                "getSource", "one source: policy, targets, live RPO, last snapshot, restorable range",
                {"200": _json(_ref("SourceDetail"), "the source")},
                errors={"404": "no such source"}, params=[_SOURCE], tag="sources",
            )
        },
        "/v1/sources/{source}/snapshots": {
            "post": _op(
                "snapshotNow", "take a snapshot now (after the one running, if any)",
                {"202": _json(_ref("SourceSummary"), "the snapshot is requested")},
                errors={"404": "no such source", "409": "a log source is streamed, not snapshotted",
                        "503": "the daemon is draining, or the audit log cannot be written"},
                params=[_SOURCE], tag="sources",
            )
        },
        "/v1/sites": {
            "get": _op(
                "listSites", "sites serving the token's tenants: health, backlog, last acknowledgement",
                {"200": _json(_list_of("sites", "Site"), "sites")}, errors={}, tag="sites",
            )
        },
        "/v1/restores": {
            "get": _op(
                "listRestores", "restore jobs of the token's tenants, newest first",
                {"200": _json(_list_of("restores", "Job"), "restore jobs")},
                errors={"400": "a bad limit"}, params=[_LIMIT], tag="restores",
            ),
            "post": _op(
                "startRestore", "start a restore (202 with the job) or, with dry_run, answer its plan",
                {"202": _json(_ref("Job"), "the restore job, queued"),
                 "200": _json(_ref("RestorePlan"), "the dry run's plan")},
                errors={"400": "a field is missing or wrong (named in field)", "404": "no such source",
                        "422": "the target is outside the restore roots (or there are none), or nothing "
                        "is restorable", "503": "draining, the sites cannot be read, or no audit log"},
                body=_ref("RestoreRequest"), tag="restores",
            ),
        },
        "/v1/drills": {
            "get": _op(
                "listDrills", "drill jobs of the token's tenants, newest first",
                {"200": _json(_list_of("drills", "Job"), "drill jobs")},
                errors={"400": "a bad limit"}, params=[_LIMIT], tag="drills",
            ),
            "post": _op(
                "startDrill", "start a drill from a plan table or a plan file",
                {"202": _json(_ref("Job"), "the drill job, queued")},
                errors={"400": "the plan is invalid (the key is named)", "404": "no such plan file",
                        "422": "the plan's scratch is outside the restore roots",
                        "503": "draining, or no audit log"},
                body=_ref("DrillRequest"), tag="drills",
            ),
        },
        "/v1/drills/{id}/report.html": {
            "get": _op(
                "drillReportHtml", "the drill's report as one HTML page",
                {"200": {"description": "the report", "content": {"text/html": {"schema": _S}}}},
                errors={"404": "no such drill, or it ended without a report",
                        "409": "the drill has not finished"},
                params=[_JOB_ID], tag="drills",
            )
        },
    }  # fmt: skip
    for kind, tag in jobs.items():
        paths[f"/v1/{kind}s/{{id}}"] = {
            "get": _op(
                f"get{tag[:-1]}",
                f"one {kind} job: state, progress, result or error",
                {"200": _json(_ref("Job"), f"the {kind} job")},
                errors={"404": f"no such {kind} job"},
                params=[_JOB_ID],
                tag=tag.lower(),
            ),
            "delete": _op(
                f"cancel{tag[:-1]}",
                f"cancel a queued or running {kind}; what it wrote is removed",
                {"200": _json(_ref("Job"), "the job, cancelled")},
                errors={"404": f"no such {kind} job", "409": "the job has already finished",
                        "503": "draining, or no audit log"},
                params=[_JOB_ID],
                tag=tag.lower(),
            ),
        }  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "drsvc API",
            "version": VERSION,
            "description": "Sources, sites, restores and drills of a drsvc daemon. Bearer tokens with roles "
            "viewer < operator < admin, scoped to tenants. Every error is {code, message[, field, hint]}; "
            "every POST and DELETE is written to the audit log. See docs/API.md.",
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
                "Job": _JOB,
                "RestoreRequest": _RESTORE_REQUEST,
                "RestorePlan": _RESTORE_PLAN,
                "DrillRequest": _DRILL_REQUEST,
            },
        },
    }  # fmt: skip
