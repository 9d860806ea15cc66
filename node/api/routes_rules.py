"""Routing rules: ``GET /api/rules`` (viewer) and ``POST /api/rules/dry-run`` (operator).

The dry-run takes either a JSON body ``{"study_uid": "..."}`` (a stored study) or a
multipart upload (field ``file``: a DICOM Part 10 file, read without pixel data and never
stored; optional field ``calling_ae``). :func:`node.api.app.create_app` includes ``router``
with the ``api_max_upload_mb`` body limit; a JSON body is limited to
:data:`node.api.limits.JSON_BODY_LIMIT` here. See :mod:`node.services.routing`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from node.api.deps import AUTH_ERRORS, Ctx, Operator, Viewer
from node.api.limits import JSON_BODY_LIMIT
from node.api.schemas import UID_PATTERN, ErrorOut, json_or_multipart_body
from node.services import routing
from node.services.errors import InputTooLarge, InvalidInput
from node.services.images import MIB

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, Any]] = {**AUTH_ERRORS}
router = APIRouter(prefix="/api/rules", tags=["rules"], responses=_ERRORS)
_UID = re.compile(UID_PATTERN)
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{0,16}$")

_DRY_RUN_BODY = json_or_multipart_body(
    {
        "type": "object",
        "required": ["study_uid"],
        "additionalProperties": False,
        "properties": {
            "study_uid": {
                "type": "string",
                "maxLength": 64,
                "pattern": UID_PATTERN,
                "description": "Study Instance UID (0020,000D) of a stored study",
            }
        },
    },
    {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {
                "type": "string",
                "format": "binary",
                "description": "DICOM Part 10 file (header read, never stored)",
            },
            "calling_ae": {
                "type": "string",
                "maxLength": 16,
                "description": "calling AE title to assume",
            },
        },
    },
)


@router.get("", summary="The routing rules, first match wins (viewer)")
def get_rules(ctx: Ctx, p: Viewer) -> dict[str, Any]:
    """The rule set: ``source`` (the rules file, or the default chest rule), ``rules`` in
    order (``name``, ``when``, ``draft``, ``model``, ``priority``, ``destinations``,
    ``action``), ``attributes`` a condition may name (with their tags), ``default``."""
    return routing.rule_set(ctx)


@router.post(
    "/dry-run",
    summary="Test a stored study or an uploaded DICOM header against the rules (operator)",
    openapi_extra=_DRY_RUN_BODY,
    responses={
        404: {"model": ErrorOut, "description": "no such study"},
        413: {"model": ErrorOut, "description": "body over its limit"},
        415: {"model": ErrorOut, "description": "neither JSON nor multipart/form-data"},
        422: {"model": ErrorOut, "description": "bad study UID, or not a DICOM file"},
    },
)
async def dry_run(request: Request, ctx: Ctx, p: Operator) -> dict[str, Any]:
    """The decision (``draft``, ``rule``, ``model``, ``priority``, ``destinations``,
    ``reason``) and ``results``: each evaluated rule, whether it matched and why. Nothing
    is changed or stored; explanations quote no free text."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await request.body()
        if len(body) > JSON_BODY_LIMIT:
            raise InputTooLarge(f"JSON body is larger than {JSON_BODY_LIMIT} bytes")
        uid = _study_uid(body)
        return await run_in_threadpool(routing.dry_run_study, ctx, uid)
    if ctype == "multipart/form-data":
        limit = ctx.settings.api_max_upload_mb * MIB
        async with request.form(max_files=1, max_fields=4) as form:
            upload = form.get("file")
            ae = form.get("calling_ae")
            if not isinstance(upload, UploadFile):
                raise InvalidInput("multipart field 'file' (a DICOM file) is missing")
            if ae is not None and (not isinstance(ae, str) or not _AE.match(ae)):
                raise InvalidInput("calling_ae must be an AE title (at most 16 characters)")
            data = await upload.read(limit + 1)
        return await run_in_threadpool(
            routing.dry_run_upload, ctx, data, max_bytes=limit, calling_ae=ae or None
        )
    from fastapi import HTTPException

    raise HTTPException(status_code=415, detail="send JSON {study_uid} or a multipart file")


def _study_uid(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("body is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"study_uid"}:
        raise InvalidInput('body must be {"study_uid": "<Study Instance UID>"}')
    uid = data["study_uid"]
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise InvalidInput("study_uid is not a UID (digits and dots, at most 64)")
    return uid
