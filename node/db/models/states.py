"""The states and kinds the tables store (string enums, stored by value)."""

from __future__ import annotations

import enum

__all__ = [
    "ApiRole",
    "DeliveryKind",
    "DeliveryObject",
    "DeliveryState",
    "FinalSource",
    "JobState",
    "StudyState",
]


class StudyState(enum.StrEnum):
    """Where a study stands in assembly."""

    receiving = "receiving"
    complete = "complete"
    skipped = "skipped"


class JobState(enum.StrEnum):
    """Job life cycle: received -> queued -> running -> done | failed | cancelled."""

    received = "received"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class DeliveryKind(enum.StrEnum):
    """How an object is delivered: the destination's protocol.

    ``dimse`` C-STORE (PS3.4 Annex B), ``stow`` STOW-RS (PS3.18 §10.5), ``hl7`` an HL7 v2.5.1
    ORU^R01 over MLLP, ``fhir`` a FHIR R4 transaction Bundle.
    """

    dimse = "dimse"
    stow = "stow"
    hl7 = "hl7"
    fhir = "fhir"


class DeliveryObject(enum.StrEnum):
    """What a delivery carries (:attr:`Delivery.object`).

    ``sr`` the Comprehensive SR (TID 2000), ``basic-sr`` a Basic Text SR, ``pdf`` the AI
    DRAFT Encapsulated PDF, ``report`` the draft as an HL7 ORU or FHIR Bundle,
    ``withdrawal`` the withdrawal of a sent draft (an IOCM Key Object Selection rejection
    note, an HL7 ORU with OBR-25 ``C``/OBX-11 ``W``, a FHIR ``entered-in-error`` update),
    ``sc`` a synthetic Secondary Capture sent on request (no job), ``coded-sr`` the draft's
    CheXpert observations coded (TID 1500, :mod:`integration.coded_findings`).
    """

    sr = "sr"
    basic_sr = "basic-sr"
    pdf = "pdf"
    coded_sr = "coded-sr"
    report = "report"
    withdrawal = "withdrawal"
    sc = "sc"


class DeliveryState(enum.StrEnum):
    """Delivery of one object to one destination.

    ``cancelled``: not sent because the draft was withdrawn first, or superseded first by a
    later job of the study that queued its draft to the same destination.
    """

    pending = "pending"
    sent = "sent"
    failed = "failed"
    cancelled = "cancelled"


class FinalSource(enum.StrEnum):
    """How a final report reached the node."""

    dicom_sr = "dicom-sr"
    """A Structured Report over DICOM (Verification Flag VERIFIED, or from a report source)."""
    dicom_pdf = "dicom-pdf"
    """An Encapsulated PDF over DICOM from a configured report source."""
    hl7 = "hl7"
    """An HL7 v2 ORU^R01 with result status F (or C) over the MLLP listener."""
    review = "review"
    """A reviewer's decision at the node: the draft accepted or edited (the final text), or
    rejected (no text; not scored)."""


class ApiRole(enum.StrEnum):
    """Roles of API tokens: viewer < operator < admin, and reviewer beside them.

    ``reviewer`` is a radiologist: sees what a viewer sees and reviews drafts (accept, edit,
    reject); no other role may review, and a reviewer cannot operate the queue.
    """

    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    reviewer = "reviewer"

    @property
    def rank(self) -> int:
        """0 for viewer and reviewer, 1 for operator, 2 for admin."""
        return {"viewer": 0, "reviewer": 0, "operator": 1, "admin": 2}[self.value]
