"""Storage SCU: send the draft SR (or a Secondary Capture) to a PACS with C-STORE.

One association per call (PS3.8 7.1): propose the Storage SCU classes of
:data:`integration.conformance.STORAGE_SCU` (SR and SC storage, PS3.4 B.5) with Explicit and
Implicit VR Little Endian, plus the object's own SOP class / transfer syntax when it is not in
that table, send one C-STORE, release. Every failure raises a
:class:`~integration.errors.DeliveryError` subclass carrying ``transient`` (retry later may
help) and, for a failure status from the peer, ``dicom_status``. Only AE titles, addresses and
UIDs are logged.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from integration.conformance import STORAGE_SCU
from integration.destinations import DicomDestination, check_ae_title
from integration.errors import (
    AssociationAbortedError,
    AssociationRejectedError,
    ConnectionFailedError,
    DeliveryError,
    DeliveryTimeoutError,
    PresentationContextError,
    StoreFailedError,
)

__all__ = [
    "OUTPUT_SOP_CLASSES",
    "DicomDestination",
    "SendResult",
    "echo",
    "send_dataset",
]

LOGGER = logging.getLogger(__name__)

# The Storage SCU conformance table (integration.conformance, CONFORMANCE.md) is the one
# source of what the node proposes: SR and SC classes, uncompressed little endian.
OUTPUT_SOP_CLASSES: tuple[UID, ...] = tuple(UID(u) for u in STORAGE_SCU.sop_classes)
_UNCOMPRESSED: tuple[UID, ...] = tuple(UID(u) for u in STORAGE_SCU.transfer_syntaxes)
VERIFICATION = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 A.4)
# PS3.7 Annex C / PS3.4 B.2.3 warning statuses for C-STORE
_WARNINGS = frozenset({0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116})


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outcome of one successful (or warning) store to one destination.

    Attributes
    ----------
    status
        DICOM status of the C-STORE response (0x0000, or a warning 0xB000/0xB006/0xB007), or
        the HTTP status for STOW-RS.
    ok
        ``True`` when the object was stored (success or warning).
    message
        Short text for the delivery record (status meaning; no patient data).
    sop_instance_uid
        The stored object's SOP Instance UID.
    destination
        ``AET@host:port`` or the STOW-RS URL.
    warning
        Whether the peer returned a warning status (stored, but coerced or similar).
    """

    status: int
    ok: bool
    message: str
    sop_instance_uid: str = ""
    destination: str = ""
    warning: bool = False


def _source(dataset_or_path: Dataset | str | Path) -> tuple[Dataset | Path, Dataset]:
    """What to send (the dataset, or the file's path) and its header.

    Raises
    ------
    integration.errors.DeliveryError
        The file cannot be read as DICOM.
    """
    if isinstance(dataset_or_path, Dataset):
        return dataset_or_path, dataset_or_path
    path = Path(dataset_or_path)
    try:
        return path, dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DeliveryError(f"cannot read {path.name}: {exc}") from exc


def _store_result(
    status: Dataset | None,
    log: _Capture,
    dest: DicomDestination,
    sop_instance: str,
    dimse_timeout: float,
) -> SendResult:
    """The C-STORE response as a :class:`SendResult`, or the error it means (see
    :func:`send_dataset`)."""
    if status is None or "Status" not in status:
        if log.abort is not None:
            raise AssociationAbortedError(
                f"{dest} aborted the association during C-STORE ({log.abort})"
            )
        raise DeliveryTimeoutError(
            f"no C-STORE response from {dest} within dimse_timeout={dimse_timeout} s "
            "(or the connection dropped)"
        )
    code = int(status.Status)
    # The peer's Error Comment (0000,0902) is free text that may quote the data set's patient
    # attributes: like HL7 MSA-3/ERR-8 and FHIR diagnostics it is neither kept nor logged.
    if code == 0x0000 or code in _WARNINGS:
        warning = code != 0x0000
        message = "stored" if not warning else f"stored with warning 0x{code:04X}"
        LOGGER.info(
            "C-STORE %s to %s: status 0x%04X",
            sop_instance,
            dest,
            code,
            extra={"dest": str(dest)},
        )
        return SendResult(
            status=code,
            ok=True,
            message=message,
            sop_instance_uid=sop_instance,
            destination=str(dest),
            warning=warning,
        )
    LOGGER.warning("C-STORE %s to %s failed: status 0x%04X", sop_instance, dest, code)
    raise StoreFailedError(
        f"{dest} refused the C-STORE of {sop_instance}: status 0x{code:04X} "
        f"({_status_meaning(code)})",
        status=code,
    )


def send_dataset(
    dataset_or_path: Dataset | str | Path,
    dest: DicomDestination,
    *,
    calling_ae: str,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 30.0,
    network_timeout: float = 60.0,
    connection_timeout: float | None = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SendResult:
    """Store one object at ``dest`` with C-STORE (PS3.4 Annex B, PS3.7 9.1.1).

    Parameters
    ----------
    dataset_or_path
        The dataset (with file meta or SOP Class UID) or a DICOM Part 10 file.
    dest
        The destination AE.
    calling_ae
        Calling AE Title (this node).
    acse_timeout, dimse_timeout, network_timeout
        pynetdicom timeouts in seconds (association response, DIMSE response, idle network).
    connection_timeout
        TCP connect timeout in seconds (``None``: operating-system default).
    ssl_context
        TLS context for DICOM TLS (PS3.15 B.1); ``None`` for plain TCP.

    Returns
    -------
    SendResult
        ``ok=True`` with the success or warning status.

    Raises
    ------
    integration.errors.ConnectionFailedError
        TCP connection refused/unreachable (transient).
    integration.errors.AssociationRejectedError
        A-ASSOCIATE-RJ; transient unless rejected-permanent.
    integration.errors.AssociationAbortedError
        A-ABORT / A-P-ABORT from the peer (transient).
    integration.errors.DeliveryTimeoutError
        No association or DIMSE response in time (transient).
    integration.errors.PresentationContextError
        The peer accepted no context for the object's SOP class (permanent).
    integration.errors.StoreFailedError
        C-STORE failure status; ``dicom_status`` set, transient only for 0xA7xx / 0x0213.
    """
    _check_ae_title(calling_ae, "Calling AE Title")
    source, header = _source(dataset_or_path)
    sop_class = UID(str(header.get("SOPClassUID", "")))
    sop_instance = str(header.get("SOPInstanceUID", ""))
    if not sop_class or not sop_instance:
        raise DeliveryError("object has no SOP Class UID / SOP Instance UID")
    meta = getattr(header, "file_meta", None)
    tsyntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")

    ae = _make_ae(calling_ae, acse_timeout, dimse_timeout, network_timeout, connection_timeout)
    for abstract_syntax, transfer_syntaxes in _storage_contexts(sop_class, tsyntax):
        ae.add_requested_context(abstract_syntax, transfer_syntaxes)

    log = _Capture()
    assoc = _associate(ae, dest, log, ssl_context)
    try:
        try:
            status = assoc.send_c_store(source)
        except ValueError as exc:
            # pynetdicom: no accepted presentation context for this SOP class / syntax
            raise PresentationContextError(
                f"{dest} accepted no presentation context for {sop_class.name or sop_class}: {exc}"
            ) from exc
        except (OSError, RuntimeError) as exc:
            raise AssociationAbortedError(f"C-STORE to {dest} failed: {exc}") from exc
        return _store_result(status, log, dest, sop_instance, dimse_timeout)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def echo(
    dest: DicomDestination,
    calling_ae: str,
    *,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 30.0,
    network_timeout: float = 60.0,
    connection_timeout: float | None = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """C-ECHO the destination (Verification SOP Class, PS3.4 Annex A).

    Parameters
    ----------
    dest
        The destination AE.
    calling_ae
        Calling AE Title.
    acse_timeout, dimse_timeout, network_timeout, connection_timeout, ssl_context
        As in :func:`send_dataset`.

    Returns
    -------
    bool
        ``True`` when the association was accepted and C-ECHO returned 0x0000; ``False`` on
        any failure (the reason is logged).
    """
    _check_ae_title(calling_ae, "Calling AE Title")
    ae = _make_ae(calling_ae, acse_timeout, dimse_timeout, network_timeout, connection_timeout)
    ae.add_requested_context(VERIFICATION)
    try:
        assoc = _associate(ae, dest, _Capture(), ssl_context)
    except DeliveryError as exc:
        LOGGER.info("C-ECHO to %s failed: %s", dest, exc)
        ae.shutdown()
        return False
    try:
        status = assoc.send_c_echo()
        return status is not None and int(status.get("Status", -1)) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# --- internals ------------------------------------------------------------------------------


class _Capture:
    """What the ACSE layer received: used to tell refusal, rejection, abort and timeout apart."""

    def __init__(self) -> None:
        self.connected = False
        self.response: A_ASSOCIATE | None = None
        self.abort: str | None = None

    def on_open(self, event: evt.Event) -> None:
        self.connected = True

    def on_acse(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_ASSOCIATE) and primitive.result is not None:
            self.response = primitive
        elif isinstance(primitive, A_ABORT | A_P_ABORT):
            source = getattr(primitive, "abort_source", None)
            self.abort = f"{type(primitive).__name__}" + (
                f" source {source}" if source is not None else ""
            )


def _make_ae(
    calling_ae: str,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
    connection_timeout: float | None,
) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    ae.maximum_pdu_size = 0
    return ae


def _associate(
    ae: AE, dest: DicomDestination, log: _Capture, ssl_context: ssl.SSLContext | None
) -> Association:
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, log.on_open), (evt.EVT_ACSE_RECV, log.on_acse)]
    kwargs: dict[str, Any] = {"ae_title": dest.ae_title, "evt_handlers": handlers}
    if ssl_context is not None:
        kwargs["tls_args"] = (ssl_context, dest.host)
    assoc = ae.associate(dest.host, dest.port, **kwargs)
    if assoc.is_established:
        return assoc
    ae.shutdown()
    if not log.connected:
        raise ConnectionFailedError(f"cannot connect to {dest} (refused, unreachable or TLS)")
    rsp = log.response
    if assoc.is_rejected and rsp is not None:
        result, source, reason = (
            int(rsp.result or 0),
            int(rsp.result_source or 0),
            int(rsp.diagnostic or 0),
        )
        raise AssociationRejectedError(
            f"{dest} rejected the association: {rsp.result_str}, source {rsp.source_str}, "
            f"reason {rsp.reason_str}",
            result=result,
            source=source,
            reason=reason,
        )
    if rsp is not None and rsp.result == 0:
        raise PresentationContextError(
            f"{dest} accepted the association but none of the proposed presentation contexts"
        )
    if log.abort is not None:
        raise AssociationAbortedError(f"{dest} aborted the association request ({log.abort})")
    raise DeliveryTimeoutError(
        f"no association response from {dest} within acse_timeout={ae.acse_timeout} s "
        "(or the connection was closed)"
    )


def _storage_contexts(sop_class: UID, tsyntax: UID) -> list[tuple[UID, list[UID]]]:
    """(abstract syntax, transfer syntaxes) to propose: the output classes + the object's own."""
    contexts = [(uid, list(_UNCOMPRESSED)) for uid in OUTPUT_SOP_CLASSES]
    if sop_class not in OUTPUT_SOP_CLASSES or (tsyntax and tsyntax not in _UNCOMPRESSED):
        syntaxes = [tsyntax] if tsyntax and tsyntax not in _UNCOMPRESSED else []
        contexts.append((sop_class, [*syntaxes, *_UNCOMPRESSED]))
    return contexts


def _status_meaning(code: int) -> str:
    if (code & 0xFF00) == 0xA700:
        return "Refused: Out of Resources"
    if (code & 0xFF00) == 0xA900:
        return "Error: Data Set does not match SOP Class"
    if (code & 0xF000) == 0xC000:
        return "Error: Cannot understand"
    return {
        0x0117: "Invalid SOP Instance",
        0x0122: "SOP Class not supported",
        0x0124: "Not authorized",
        0x0210: "Duplicate invocation",
        0x0211: "Unrecognized operation",
        0x0212: "Mistyped argument",
        0x0213: "Resource limitation",
    }.get(code, "Failure")


def _check_ae_title(value: str, label: str) -> None:
    check_ae_title(value, label=label)
