"""Verification and Storage SCP handlers (PS3.4 Annex A and B) as plain functions.

Each handler has the shape ``(event, deps) -> status``; it never raises (an unexpected error
becomes :attr:`~integration.status.StoreStatus.INTERNAL_ERROR` with a logged traceback) and
never runs inference. The C-STORE handler hands the received file to an
:class:`InstanceSink` (the node's spool + SQL) and answers with whatever status the sink
returns; the sink must make the instance durable before it returns success, because the
response goes out only after this handler returns.

Use::

    ae = build_storage_ae(...)
    server = ae.start_server((host, port), block=False, evt_handlers=handlers(sink))
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from integration.association_log import AssociationRecorder, StoreRecord
from integration.status import StoreStatus

__all__ = [
    "InstanceSink",
    "ReceivedMeta",
    "StoreResult",
    "handle_conn_close",
    "handle_echo",
    "handle_store",
    "handlers",
]

LOG = logging.getLogger(__name__)

_ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO


@dataclass(frozen=True, slots=True)
class ReceivedMeta:
    """What the association and the C-STORE request say about a received instance.

    Parameters
    ----------
    calling_ae
        Calling AE Title of the association (the sender).
    peer_address, peer_port
        The sender's IP address and TCP port.
    transfer_syntax
        Transfer Syntax UID of the accepted presentation context (the data set's encoding).
    sop_class_uid
        Affected SOP Class UID (0000,0002) of the C-STORE-RQ.
    sop_instance_uid
        Affected SOP Instance UID (0000,1000) of the C-STORE-RQ.
    called_ae
        Called AE Title (the node's own).
    association_id
        The receive log's id of the association (PS3.8 7.1), when the AE keeps one
        (:mod:`integration.association_log`); the sink records it with the instance.
    """

    calling_ae: str
    peer_address: str
    peer_port: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    called_ae: str = ""
    association_id: int | None = None

    def __post_init__(self) -> None:
        if not self.transfer_syntax:
            raise ValueError("ReceivedMeta needs the presentation context's Transfer Syntax UID")


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The sink's answer for one C-STORE.

    Parameters
    ----------
    status
        DIMSE status to send (see :mod:`integration.status`).
    reason
        Why, for the log and the Error Comment of a failure; never patient data.
    outcome
        For success, what happened (e.g. ``"new"``, ``"duplicate_identical"``).
    study_uid
        Study Instance UID (0020,000D) of the data set when the sink could read it (for the
        receive log of a refused instance), else ``None``.
    """

    status: int
    reason: str = ""
    outcome: str | None = None
    study_uid: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= int(self.status) <= 0xFFFF:
            raise ValueError(f"DIMSE Status must be 0x0000..0xFFFF, got {self.status!r}")

    @property
    def ok(self) -> bool:
        """Whether the instance is stored (status 0x0000)."""
        return int(self.status) == 0


@runtime_checkable
class InstanceSink(Protocol):
    """Where received instances go (the node's spool + SQL implements it)."""

    def accept(self, path: Path, meta: ReceivedMeta) -> StoreResult:
        """Make the instance at ``path`` durable, or say why not.

        ``path`` is a Part 10 file (file meta + the data set bytes exactly as received) that
        pynetdicom deletes after the handler returns; the sink may rename it away.
        Must not raise and must not return success before the instance is durable.
        """
        ...


def _recorder(event: Event) -> AssociationRecorder | None:
    """The receive log's recorder of the AE that runs this association, if it has one."""
    recorder = getattr(getattr(event.assoc, "ae", None), "association_recorder", None)
    return recorder if isinstance(recorder, AssociationRecorder) else None


def _meta(event: Event, recorder: AssociationRecorder | None = None) -> ReceivedMeta:
    req = event.request
    requestor = event.assoc.requestor
    return ReceivedMeta(
        calling_ae=str(requestor.ae_title).strip(),
        peer_address=str(requestor.address),
        peer_port=int(requestor.port),
        transfer_syntax=str(event.context.transfer_syntax),
        sop_class_uid=str(getattr(req, "AffectedSOPClassUID", "") or ""),
        sop_instance_uid=str(getattr(req, "AffectedSOPInstanceUID", "") or ""),
        called_ae=str(event.assoc.acceptor.ae_title).strip(),
        association_id=recorder.association_id(event.assoc) if recorder is not None else None,
    )


def _response(result: StoreResult) -> int | Dataset:
    status = int(result.status)
    if status == 0 or not result.reason:
        return status
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = result.reason[:_ERROR_COMMENT_MAX]
    return rsp


def _received_file(event: Event) -> tuple[Path, bool]:
    """The received data set as a Part 10 file, and whether this function created it."""
    try:
        return Path(event.dataset_path), False
    except AttributeError:
        # Chunked receive is off (enable_chunked_receive() not called): write one.
        fd, name = tempfile.mkstemp(suffix=".dcm")
        with os.fdopen(fd, "wb") as fh:
            fh.write(event.encoded_dataset(include_meta=True))
        return Path(name), True


def handle_store(event: Event, sink: InstanceSink) -> int | Dataset:
    """``EVT_C_STORE`` handler: pass the received file to ``sink`` (PS3.4 B.2.2).

    Parameters
    ----------
    event
        pynetdicom's C-STORE event.
    sink
        The :class:`InstanceSink` that spools and records the instance.

    Returns
    -------
    int or pydicom.dataset.Dataset
        The status (a Dataset with Status and Error Comment for a failure).

    Notes
    -----
    When the AE has a receive log (:attr:`integration.ae.NodeAE.association_recorder`), the
    answer is recorded there with the request's UIDs (never patient data), and the
    association's log id goes to the sink in :attr:`ReceivedMeta.association_id`.
    """
    started = time.perf_counter()
    meta: ReceivedMeta | None = None
    created = False
    path: Path | None = None
    recorder: AssociationRecorder | None = None
    try:
        recorder = _recorder(event)
        meta = _meta(event, recorder)
        path, created = _received_file(event)
        result = sink.accept(path, meta)
    except Exception:
        LOG.exception(
            "C-STORE internal error (calling AE %r, SOP Instance %s)",
            meta.calling_ae if meta else "?",
            meta.sop_instance_uid if meta else "?",
        )
        result = StoreResult(status=StoreStatus.INTERNAL_ERROR, reason="internal error")
    finally:
        if created and path is not None:
            path.unlink(missing_ok=True)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if result.ok:
        LOG.info(
            "C-STORE 0x0000 %s from %r@%s sop=%s ts=%s (%.1f ms)",
            result.outcome or "stored",
            meta.calling_ae if meta else "?",
            meta.peer_address if meta else "?",
            meta.sop_instance_uid if meta else "?",
            meta.transfer_syntax if meta else "?",
            elapsed_ms,
        )
    else:
        LOG.warning(
            "C-STORE 0x%04X refused from %r@%s sop=%s: %s (%.1f ms)",
            int(result.status),
            meta.calling_ae if meta else "?",
            meta.peer_address if meta else "?",
            meta.sop_instance_uid if meta else "?",
            result.reason,
            elapsed_ms,
        )
    if recorder is not None:
        req = event.request
        recorder.stored(
            event.assoc,
            StoreRecord(
                status=int(result.status),
                reason=result.reason if not result.ok else "",
                sop_class_uid=str(getattr(req, "AffectedSOPClassUID", "") or ""),
                sop_instance_uid=str(getattr(req, "AffectedSOPInstanceUID", "") or ""),
                study_uid=result.study_uid,
            ),
        )
    return _response(result)


def _partial_received_file(assoc: Any) -> tuple[Any, Path] | None:
    """The open file and path of a C-STORE data set pynetdicom is still receiving, if any.

    With ``_config.STORE_RECV_CHUNKED_DATASET`` (pynetdicom 3.0), each C-STORE data set is
    written as it arrives to a ``NamedTemporaryFile(delete=False)`` that the DIMSE message
    being decoded, ``assoc.dimse.message``, holds as ``_data_set_file``; pynetdicom deletes
    the file after the C-STORE handler returns, but never when the association ends before
    the data set is complete. It has no public hook for that file, so this one function reads
    the private attribute; ``tests/ingest/test_received_data_bounds.py`` fails if pynetdicom
    changes it (``test_partial_file_hook_matches_pynetdicom``,
    ``test_aborted_transfer_leaves_no_file``).
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    name = getattr(handle, "name", None)
    if handle is None or not isinstance(name, str):
        return None
    return handle, Path(name)


def handle_conn_close(event: Event) -> None:
    """``EVT_CONN_CLOSE`` handler: delete the data set an association was still receiving.

    An A-ABORT (PS3.8 7.3), a dropped connection, a timeout or a release in the middle of a
    C-STORE leaves pynetdicom's partial file behind; the connection-close event fires on
    every one of these paths, in the thread that was writing the file, so nothing writes it
    any more. A crash leaves it too: :meth:`node.runtime.spool.Spool.clean_incoming` at start.
    """
    try:
        partial = _partial_received_file(event.assoc)
        if partial is None:
            return
        handle, path = partial
        with contextlib.suppress(OSError):  # flushed after every write: nothing to lose
            handle.close()
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        LOG.info(
            "association from %r closed mid-transfer: removed its partial data set (%d bytes)",
            str(event.assoc.requestor.ae_title).strip(),
            size,
        )
    except Exception:  # never let a handler raise into pynetdicom's reactor
        LOG.exception("could not remove the partial data set of a closed association")


def handle_echo(event: Event, sink: object = None) -> int:
    """``EVT_C_ECHO`` handler: answer Success (PS3.4 A.4) and log the caller."""
    try:
        requestor = event.assoc.requestor
        LOG.info("C-ECHO from %r@%s", str(requestor.ae_title).strip(), requestor.address)
    except Exception:  # logging must never fail the echo
        LOG.exception("C-ECHO logging failed")
    return 0x0000


def handlers(sink: InstanceSink) -> list[Any]:
    """The ``evt_handlers`` list for ``ae.start_server``: C-ECHO and C-STORE bound to ``sink``,
    and the removal of partial data sets when a connection closes (:func:`handle_conn_close`)."""
    return [
        (evt.EVT_C_ECHO, handle_echo, [sink]),
        (evt.EVT_C_STORE, handle_store, [sink]),
        (evt.EVT_CONN_CLOSE, handle_conn_close),
    ]
