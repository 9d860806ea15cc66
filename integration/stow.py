"""STOW-RS client: store the draft SR through DICOMweb (PS3.18 10.5 Store Transaction).

One ``POST {base}/studies`` with a ``multipart/related; type="application/dicom"`` body
holding the Part 10 file, ``Accept: application/dicom+json``. The response (PS3.18 10.5.3)
is 200 (all stored), 202 (some warnings or failures), 409 (all failed) or another error; its
JSON body lists Referenced SOP Sequence (0008,1199) with optional Warning Reason
(0008,1196) and Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197). The
Authorization header value is never logged nor shown in ``repr``; nor is the response's
free text, which may quote the data set's patient attributes (errors name the HTTP status and
the Failure Reason).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from integration.destinations import StowDestination
from integration.errors import StowError
from integration.scu import SendResult

__all__ = ["SendResult", "StowDestination", "stow"]

LOGGER = logging.getLogger(__name__)

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def stow(
    dataset_or_path: Dataset | str | Path,
    dest: StowDestination,
    *,
    client: httpx.Client | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> SendResult:
    """Store one object with STOW-RS (PS3.18 10.5).

    Parameters
    ----------
    dataset_or_path
        Dataset (written as a Part 10 file) or the path of a Part 10 file.
    dest
        The STOW-RS endpoint.
    client
        An ``httpx.Client`` to reuse (connection pooling); one is created if ``None``.
    extra_headers
        More request headers.

    Returns
    -------
    SendResult
        ``status`` is the HTTP status (200, or 202 with ``warning=True``).

    Raises
    ------
    integration.errors.StowError
        Connection failure or timeout (transient), HTTP error (``http_status`` set; 5xx, 408,
        429 transient), or a 2xx response that lists the instance as failed (with its
        Failure Reason as ``dicom_status``) or does not list it at all.
    """
    payload, sop_instance = _part10(dataset_or_path)
    boundary = f"dicom-{uuid.uuid4().hex}"
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"),
            payload,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        ]
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if dest.authorization:
        headers["Authorization"] = dest.authorization
    if extra_headers:
        headers.update(extra_headers)

    own_client = client is None
    http = client or httpx.Client(verify=dest.verify, timeout=dest.timeout)
    try:
        response = http.post(dest.studies_url, content=body, headers=headers)
    except httpx.TimeoutException as exc:
        raise StowError(f"STOW-RS to {dest} timed out: {exc}", transient=True) from exc
    except httpx.TransportError as exc:
        raise StowError(f"STOW-RS to {dest} failed: {exc}", transient=True) from exc
    finally:
        if own_client:
            http.close()

    code = response.status_code
    doc = _json(response)
    failed = _failed_reason(doc, sop_instance)
    if code not in (200, 202):
        detail = f", Failure Reason 0x{failed:04X}" if failed is not None else ""
        raise StowError(
            # not the body: the server's free text may quote the data set's patient attributes
            f"STOW-RS to {dest} answered HTTP {code}{detail}",
            http_status=code,
            dicom_status=failed,
        )
    if failed is not None:
        raise StowError(
            f"STOW-RS to {dest}: {sop_instance} failed with Failure Reason 0x{failed:04X}",
            http_status=code,
            dicom_status=failed,
            transient=(failed & 0xFF00) == 0xA700,
        )
    referenced, warning_reason = _referenced(doc, sop_instance)
    if doc is not None and not referenced:
        raise StowError(
            f"STOW-RS to {dest}: HTTP {code} but {sop_instance} is not in Referenced SOP "
            "Sequence (0008,1199)",
            http_status=code,
        )
    warned = code == 202 or warning_reason is not None
    LOGGER.info("STOW-RS %s to %s: HTTP %d", sop_instance, dest, code)
    message = "stored"
    if warning_reason is not None:
        message = f"stored with Warning Reason 0x{warning_reason:04X}"
    elif code == 202:
        message = "stored (HTTP 202: accepted with warnings)"
    return SendResult(
        status=code,
        ok=True,
        message=message,
        sop_instance_uid=sop_instance,
        destination=str(dest),
        warning=warned,
    )


def _part10(dataset_or_path: Dataset | str | Path) -> tuple[bytes, str]:
    if isinstance(dataset_or_path, Dataset):
        ds = dataset_or_path
        buffer = io.BytesIO()
        try:
            dcmwrite(buffer, ds, enforce_file_format=True)
        except Exception as exc:
            raise StowError(f"cannot encode the dataset as a Part 10 file: {exc}") from exc
        payload = buffer.getvalue()
    else:
        path = Path(dataset_or_path)
        try:
            payload = path.read_bytes()
            ds = dcmread(io.BytesIO(payload), stop_before_pixels=True)
        except Exception as exc:
            raise StowError(f"cannot read {path.name}: {exc}") from exc
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    if not sop_instance:
        raise StowError("the object has no SOP Instance UID (0008,0018)", transient=False)
    return payload, sop_instance


def _json(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _items(doc: Any, tag: str) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        return []
    element = doc.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _first_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if isinstance(element, dict) and isinstance(element.get("Value"), list) and element["Value"]:
        return element["Value"][0]
    return None


def _failed_reason(doc: Any, sop_instance: str) -> int | None:
    for item in _items(doc, _FAILED_SOP_SEQUENCE):
        if _first_value(item, _REFERENCED_SOP_INSTANCE_UID) in (sop_instance, None):
            reason = _first_value(item, _FAILURE_REASON)
            return int(reason) if reason is not None else 0xC000
    return None


def _referenced(doc: Any, sop_instance: str) -> tuple[bool, int | None]:
    """Whether our instance is in Referenced SOP Sequence, and its Warning Reason if any."""
    for item in _items(doc, _REFERENCED_SOP_SEQUENCE):
        if _first_value(item, _REFERENCED_SOP_INSTANCE_UID) == sop_instance:
            reason = _first_value(item, _WARNING_REASON)
            return True, int(reason) if reason is not None else None
    return False, None
