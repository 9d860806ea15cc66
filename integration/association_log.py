"""The storage SCP's receive log hook: what the node is told about every association.

The node keeps a receive log (calling AE, address, TLS or not, start and end, the C-STORE
requests accepted and refused with their statuses and reasons). ``integration`` never
imports ``node``, so the log is a protocol here, :class:`AssociationLog`, that the node
implements (``node.runtime.receive_log``), and :class:`AssociationRecorder` ties it to
pynetdicom's events:

- ``EVT_ACCEPTED`` (A-ASSOCIATE-AC sent, PS3.8 7.1.1): :meth:`AssociationLog.opened`, which
  returns the log's id of the association; the C-STORE handler passes that id to the sink
  (:attr:`integration.scp.ReceivedMeta.association_id`);
- A-ASSOCIATE-RJ (PS3.8 9.3.4): from the access policy's ``EVT_REQUESTED`` handler with its
  reason (:meth:`AssociationRecorder.rejected`), or pynetdicom's own rejection
  (``EVT_REJECTED``: called AE title, local limit) with the reason read from the
  rejection's Result, Source and Diagnostic (PS3.8 Table 9-21);
- each C-STORE response (PS3.4 B.2.3, statuses of PS3.4 Table B.2-1 and PS3.7 Annex C):
  :meth:`AssociationLog.stored`;
- ``EVT_RELEASED`` (A-RELEASE, PS3.8 7.2), ``EVT_ABORTED`` (A-ABORT or A-P-ABORT, PS3.8 7.3
  and 7.4) and, as the fallback for any other end, ``EVT_CONN_CLOSE``:
  :meth:`AssociationLog.ended`.

The recorder never raises into pynetdicom and never lets the log fail a C-STORE: an error
of the log is logged (its class only) and the association goes on.
"""

from __future__ import annotations

import enum
import logging
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pynetdicom import evt
from pynetdicom.events import Event

__all__ = [
    "AssociationInfo",
    "AssociationLog",
    "AssociationOutcome",
    "AssociationRecorder",
    "StoreRecord",
    "association_info",
    "reject_reason",
]

LOG = logging.getLogger(__name__)

# A-ASSOCIATE-RJ Source and Diagnostic (PS3.8 Table 9-21) -> words for the receive log
_RJ_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "rejected by the service user, no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "rejected by the service provider (ACSE), no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded (too many associations)",
}


class AssociationOutcome(enum.StrEnum):
    """How an association ended (``open`` while it lasts)."""

    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class AssociationInfo:
    """Who asked for an association (A-ASSOCIATE-RQ, PS3.8 9.3.2) and how.

    Parameters
    ----------
    calling_ae, called_ae
        Calling and Called AE Titles, without padding.
    address, port
        The peer's IP address and TCP port.
    tls
        Whether the connection is DICOM TLS (PS3.15 B.1).
    """

    calling_ae: str
    called_ae: str
    address: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class StoreRecord:
    """One answered C-STORE request as the receive log keeps it (no patient data).

    Parameters
    ----------
    status
        The DIMSE status sent (PS3.4 Table B.2-1).
    reason
        The node's reason for a failure (its Error Comment), else ``""``.
    sop_class_uid, sop_instance_uid
        Affected SOP Class and Instance UIDs of the request.
    study_uid
        Study Instance UID of the data set when the sink read it, else ``None``.
    """

    status: int
    reason: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str | None = None

    @property
    def refused(self) -> bool:
        """Whether the status is a failure: neither Success nor Warning (PS3.7 C.1, C.3)."""
        code = int(self.status)
        return code != 0x0000 and code & 0xF000 != 0xB000 and code not in (0x0001, 0x0107, 0x0116)


@runtime_checkable
class AssociationLog(Protocol):
    """Where the receive log goes (the node's SQL implements it).

    Every method must return quickly and must not raise: it runs in the association's thread,
    before the A-ASSOCIATE-AC was answered by the first request (``opened``) or before the
    C-STORE response goes out (``stored``).
    """

    def opened(self, info: AssociationInfo) -> int | None:
        """An association was accepted; return its id in the log (``None``: not logged)."""
        ...

    def rejected(self, info: AssociationInfo, reason: str) -> None:
        """An association was rejected (A-ASSOCIATE-RJ) for ``reason``."""
        ...

    def stored(self, association_id: int, record: StoreRecord) -> None:
        """A C-STORE request of the association was answered."""
        ...

    def ended(self, association_id: int, outcome: AssociationOutcome, reason: str | None) -> None:
        """The association ended: released or aborted."""
        ...


@dataclass(slots=True)
class _State:
    association_id: int | None = None
    done: bool = False


def reject_reason(assoc: Any) -> str:
    """Why pynetdicom rejected ``assoc``: its A-ASSOCIATE-RJ Source and Diagnostic in words."""
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    try:
        key = (int(source), int(diagnostic))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "association rejected"
    return _RJ_REASONS.get(key, f"association rejected (source {key[0]}, diagnostic {key[1]})")


def _is_tls(assoc: Any) -> bool:
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    return isinstance(sock, ssl.SSLSocket)


def association_info(assoc: Any) -> AssociationInfo:
    """The requestor's side of ``assoc`` (a pynetdicom acceptor association)."""
    requestor = assoc.requestor
    primitive = getattr(requestor, "primitive", None)
    calling = getattr(primitive, "calling_ae_title", None) or getattr(requestor, "ae_title", "")
    called = getattr(primitive, "called_ae_title", None) or getattr(
        getattr(assoc, "acceptor", None), "ae_title", ""
    )
    try:
        port = int(requestor.port)
    except (TypeError, ValueError):
        port = 0
    return AssociationInfo(
        calling_ae=str(calling or "").strip(),
        called_ae=str(called or "").strip(),
        address=str(getattr(requestor, "address", "") or ""),
        port=port,
        tls=_is_tls(assoc),
    )


class AssociationRecorder:
    """Binds an :class:`AssociationLog` to one AE's associations (pynetdicom events).

    Parameters
    ----------
    log
        The receive log.
    """

    def __init__(self, log: AssociationLog) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()

    def handlers(self) -> list[Any]:
        """The ``evt_handlers`` entries that feed the log (bound by ``NodeAE.start_server``)."""
        return [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def _state(self, assoc: Any) -> _State:
        with self._lock:
            state = self._states.get(assoc)
            if state is None:
                state = self._states[assoc] = _State()
            return state

    def association_id(self, assoc: Any) -> int | None:
        """The log's id of ``assoc`` (``None`` before it was accepted or when not logged)."""
        with self._lock:
            state = self._states.get(assoc)
        return None if state is None else state.association_id

    def rejected(self, assoc: Any, reason: str) -> None:
        """Record that ``assoc`` is rejected for ``reason`` (the access policy calls this
        just before it sends A-ASSOCIATE-RJ); never raises."""
        state = self._state(assoc)
        if state.done:
            return
        state.done = True
        try:
            self.log.rejected(association_info(assoc), reason)
        except Exception as exc:  # the log must never break the association handling
            LOG.warning("receive log: rejection not recorded (%s)", type(exc).__name__)

    def stored(self, assoc: Any, record: StoreRecord) -> None:
        """Record one answered C-STORE of ``assoc``; never raises."""
        association_id = self.association_id(assoc)
        if association_id is None:
            return
        try:
            self.log.stored(association_id, record)
        except Exception as exc:
            LOG.warning("receive log: C-STORE not recorded (%s)", type(exc).__name__)

    def _end(self, assoc: Any, outcome: AssociationOutcome, reason: str | None) -> None:
        with self._lock:
            state = self._states.get(assoc)
            if state is None or state.done or state.association_id is None:
                return
            state.done = True
            association_id = state.association_id
        try:
            self.log.ended(association_id, outcome, reason)
        except Exception as exc:
            LOG.warning("receive log: association end not recorded (%s)", type(exc).__name__)

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        state = self._state(assoc)
        if state.done or state.association_id is not None:
            return
        try:
            state.association_id = self.log.opened(association_info(assoc))
        except Exception as exc:
            LOG.warning("receive log: association not recorded (%s)", type(exc).__name__)

    def _on_rejected(self, event: Event) -> None:
        try:
            reason = reject_reason(event.assoc)
        except Exception:  # never raise into pynetdicom
            reason = "association rejected"
        self.rejected(event.assoc, reason)

    def _on_released(self, event: Event) -> None:
        self._end(event.assoc, AssociationOutcome.RELEASED, None)

    def _on_aborted(self, event: Event) -> None:
        self._end(event.assoc, AssociationOutcome.ABORTED, "A-ABORT or A-P-ABORT")

    def _on_conn_close(self, event: Event) -> None:
        self._end(event.assoc, AssociationOutcome.ABORTED, "connection closed without release")
