"""The IHE IOCM rejection note that withdraws AI drafts from a study (highdicom).

A rejection note is a Key Object Selection Document (PS3.3 A.35.4, SOP Class
1.2.840.10008.5.1.4.1.1.88.59) whose Document Title says why the referenced instances are
rejected (IHE Imaging Object Change Management). The titles come from CID 7010 "Key Object
Selection Document Title" (they are also in CID 7031 "Reason for Removal from Operational
Use"). The request named CID 7011, but CID 7011 "Rejected for Quality Reasons" lists the
*kinds* of quality failure (motion blur, under-exposed, ...), not document titles.

An IOCM archive (e.g. dcm4chee-arc) hides the rejected instances from queries and viewers;
the node uses it to withdraw a draft SR and its PDF that went to the wrong study
or turned out wrong.

Content tree (TID 2010 "Key Object Selection")::

    CONTAINER Document Title = (113001, DCM, "Rejected for Quality Reasons")
                               or (113037, DCM, "Rejected for Patient Safety Reasons")
     +-- CONTAINS TEXT (113012, DCM, "Key Object Description")  "AI draft withdrawn: ..."
     +-- CONTAINS COMPOSITE  each withdrawn SR / Encapsulated PDF (SOP Class + Instance UID)

Every referenced instance is also listed in the Current Requested Procedure Evidence
Sequence (0040,A375), the list IOCM archives act on. Patient and study attributes and the
Specific Character Set come from the withdrawn objects (one study only). The note has its own
series whose description begins with ``AI DRAFT WITHDRAWN``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from integration.draft_header import draft_local_time, draft_timestamp, set_utc_offset
from integration.errors import KosBuildError
from integration.privacy import quiet_person_name_warnings

__all__ = [
    "KEY_OBJECT_SELECTION_STORAGE",
    "REJECTED_FOR_PATIENT_SAFETY",
    "REJECTED_FOR_QUALITY",
    "REJECTION_TITLES",
    "build_rejection_note",
    "rejection_series_description",
]

KEY_OBJECT_SELECTION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.59")
REJECTED_FOR_QUALITY = Code("113001", "DCM", "Rejected for Quality Reasons")
REJECTED_FOR_PATIENT_SAFETY = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
REJECTION_TITLES = (REJECTED_FOR_QUALITY, REJECTED_FOR_PATIENT_SAFETY)
"""The CID 7010 titles this builder accepts (IOCM also has 113038 "Incorrect Modality Worklist
Entry" and 113039 "Data Retention Policy Expired", which do not describe a wrong draft)."""
_MAX_LO = 64


def rejection_series_description(*, demo: bool) -> str:
    """Series Description (0008,103E) of the rejection note series (VR LO)."""
    return "AI DRAFT WITHDRAWN - rejection note" + (" (DEMO)" if demo else "")


def build_rejection_note(
    withdrawn: Sequence[Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    manufacturer: str,
    reason: str,
    title: Code = REJECTED_FOR_QUALITY,
    demo: bool = False,
    instance_number: int = 1,
    institution_name: str | None = None,
    created_at: dt.datetime | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the IOCM rejection note for withdrawn AI drafts of one study.

    Parameters
    ----------
    withdrawn
        The draft SR(s) and Encapsulated PDF(s) to reject (full datasets or headers with
        patient/study attributes, SOP Class/Instance UID and Series Instance UID), all of
        one study.
    sop_instance_uid, series_instance_uid
        The note's own UIDs (a new series, not the drafts').
    series_number, instance_number
        Series Number (0020,0011) and Instance Number (0020,0013).
    manufacturer
        Manufacturer (0008,0070) of the node.
    reason
        Key Object Description text (no patient data), e.g. ``"sent for the wrong study"``.
    title
        Document Title from :data:`REJECTION_TITLES`.
    demo
        DEMO model drafts: said in the Series Description.
    institution_name
        Institution Name (0008,0080), or ``None``.
    created_at
        When the note is made (aware; ``None``: now): its Content and Instance Creation
        Date/Time, in the zone of the drafts' Timezone Offset From UTC, which the note
        states too; where they have none, the host's local time and no offset
        (:func:`integration.draft_header.draft_local_time`).

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        The note (Explicit VR Little Endian), ready for ``save_as`` / C-STORE.

    Raises
    ------
    integration.errors.KosBuildError
        No instances, several studies, an instance without UIDs, an unknown title, an
        empty reason, invalid UIDs, or a dataset highdicom refuses.
    """
    if not withdrawn:
        raise KosBuildError("nothing to reject: no withdrawn instances given")
    studies = {str(ds.get("StudyInstanceUID", "") or "") for ds in withdrawn}
    if len(studies) != 1 or "" in studies:
        raise KosBuildError("withdrawn instances must belong to exactly one study")
    for ds in withdrawn:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                raise KosBuildError(f"a withdrawn instance has no {keyword}")
    if title not in REJECTION_TITLES:
        raise KosBuildError(f"Document Title {title.value} is not an accepted rejection title")
    if not reason or not reason.strip():
        raise KosBuildError("a rejection note needs a reason (Key Object Description)")
    for label, uid in (
        ("SOP Instance UID", sop_instance_uid),
        ("Series Instance UID", series_instance_uid),
    ):
        if not _is_uid(uid):
            raise KosBuildError(f"{label} {uid!r} is not a valid UID")
    if sop_instance_uid in {str(ds.SOPInstanceUID) for ds in withdrawn}:
        raise KosBuildError("the note's SOP Instance UID equals a withdrawn instance's")

    content = hd.ko.KeyObjectSelection(
        document_title=title,
        referenced_objects=list(withdrawn),
        description=f"AI draft withdrawn: {reason.strip()}"[:1024],
    )
    try:
        with quiet_person_name_warnings():  # the warning quotes the patient's name
            note = hd.ko.KeyObjectSelectionDocument(
                evidence=list(withdrawn),
                content=content,
                series_instance_uid=series_instance_uid,
                series_number=series_number,
                sop_instance_uid=sop_instance_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                institution_name=institution_name,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        # the text may quote a patient attribute value: name the type only, do not chain
        raise KosBuildError(
            f"highdicom refused the rejection note ({type(exc).__name__})"
        ) from None
    note.SeriesDescription = rejection_series_description(demo=demo)[:_MAX_LO]
    # the note copies the drafts' Study Date/Time: it states their offset and its own times
    # in that zone (PS3.3 C.12.1.1.8), as the drafts do (highdicom: the host's clock, no zone)
    local = draft_local_time(draft_timestamp(created_at), withdrawn[0])
    note.ContentDate = note.InstanceCreationDate = DA(local.strftime("%Y%m%d"))
    note.ContentTime = note.InstanceCreationTime = TM(local.strftime("%H%M%S"))
    set_utc_offset(note, withdrawn[0])
    return note


def _is_uid(value: str) -> bool:
    """A valid UID (PS3.5 9.1): <= 64 characters, dot-separated numbers without leading 0."""
    return (
        len(value) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", value) is not None
    )
