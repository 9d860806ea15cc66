"""The segments of the draft ORU^R01 after MSH: PID, ORC, OBR, NTE and OBX (HL7 v2.5.1).

:mod:`integration.hl7_oru` assembles the message; these functions add one segment (in its
hl7apy group) each, filled from the image header (PS3.3 C.7.1.1 Patient, C.4.10 / C.7.2.1
Study and request) through :mod:`integration.hl7_values`, which escapes every text value
(HL7 v2.5.1 section 2.7). An optional field without data is left absent (section 2.5.3)
unless the segment's fields are set with ``keep_empty``.
"""

from __future__ import annotations

from collections.abc import Mapping

from hl7apy.core import Group, Segment
from pydicom.dataset import Dataset

from integration.header_values import header_text
from integration.hl7_values import (
    digits,
    escape,
    order_number,
    patient_identifier,
    patient_names,
    service,
    study_ts,
    text_field,
)

__all__ = [
    "ObxCode",
    "add_note",
    "add_observation",
    "add_order",
    "add_patient",
    "set_fields",
]

ObxCode = tuple[str, str, str]
"""CE (OBX-3): identifier ^ text ^ name of coding system."""

_SEX = {"M": "M", "F": "F", "O": "O"}  # DICOM (0010,0040) -> HL7 table 0001


def set_fields(segment: Segment, fields: Mapping[str, str], *, keep_empty: bool = False) -> None:
    """Assign hl7apy fields in order (``{"obr_7": value, ...}``).

    Parameters
    ----------
    segment
        The hl7apy segment.
    fields
        Field name (lower-case hl7apy attribute, e.g. ``"pid_3"``) to ER7 value, in the
        order they are to be set.
    keep_empty
        Also assign empty values; by default a field whose value is ``""`` is left absent
        (an optional field with no data, HL7 v2.5.1 section 2.5.3).
    """
    for name, value in fields.items():
        if value or keep_empty:
            setattr(segment, name, value)


def add_patient(patient_result: Group, source: Dataset) -> None:
    """Add the ORU_R01_PATIENT group with its PID (HL7 v2.5.1 section 3.4.2).

    PID-1 ``1``, PID-3 from :func:`~integration.hl7_values.patient_identifier`, one PID-5
    repetition per name group (:func:`~integration.hl7_values.patient_names`), PID-7
    Patient's Birth Date (0010,0030) when it is a full DA, PID-8 Patient's Sex (0010,0040)
    mapped to table 0001 when it is M, F or O.

    Raises
    ------
    integration.errors.Hl7BuildError
        Patient ID (0010,0020) is empty.
    """
    patient: Group = patient_result.add_group("ORU_R01_PATIENT")
    pid: Segment = patient.add_segment("PID")
    set_fields(pid, {"pid_1": "1", "pid_3": patient_identifier(source)})
    for repetition in patient_names(source.get("PatientName")):
        pid.add_field("PID_5").value = repetition
    sex = _SEX.get(header_text(source, "PatientSex").upper(), "")
    set_fields(pid, {"pid_7": digits(source, "PatientBirthDate", 8), "pid_8": sex})


def add_order(order: Group, source: Dataset, *, report_ts: str, status: str) -> None:
    """Add ORC (v2.5.1 section 4.5.1) and OBR (section 7.4.1) to the order group.

    ORC-1 ``RE``; ORC-2/OBR-2 and ORC-3/OBR-3 the Placer/Filler Order Number (0040,2016)/
    (0040,2017) when present, also from an SR's Referenced Request Sequence
    (:func:`~integration.hl7_values.order_number`); OBR-4
    :func:`~integration.hl7_values.service`; OBR-7 the study date/time; OBR-18 Accession
    Number (0008,0050) when present; OBR-22 ``report_ts``; OBR-24 ``RAD``; OBR-25
    ``status`` (table 0123).
    """
    placer = text_field(order_number(source, "PlacerOrderNumberImagingServiceRequest"))
    filler = text_field(order_number(source, "FillerOrderNumberImagingServiceRequest"))
    set_fields(order.add_segment("ORC"), {"orc_1": "RE", "orc_2": placer, "orc_3": filler})
    obr: Segment = order.add_segment("OBR")
    obr_fields = {
        "obr_1": "1",
        "obr_2": placer,
        "obr_3": filler,
        "obr_4": service(source),
        "obr_7": study_ts(source),
        "obr_18": escape(header_text(source, "AccessionNumber")),
        "obr_22": report_ts,
        "obr_24": "RAD",
        "obr_25": status,
    }
    set_fields(obr, obr_fields)


def add_note(order: Group, comment: str) -> None:
    """Add the NTE after the OBR (v2.5.1 section 2.15.10): source ``O``, type ``RE``."""
    nte_fields = {
        "nte_1": "1",
        "nte_2": "O",  # table 0105: other system
        "nte_3": escape(comment),
        "nte_4": "RE",  # table 0364: remark
    }
    set_fields(order.add_segment("NTE"), nte_fields, keep_empty=True)


def add_observation(
    order: Group, set_id: int, code: ObxCode, line: str, *, status: str, time: str, equipment: str
) -> None:
    """Add one ORU_R01_OBSERVATION group with its TX OBX (v2.5.1 section 7.4.2).

    OBX-1 ``set_id``, OBX-2 ``TX``, OBX-3 ``code`` (CE), OBX-4 ``1``, OBX-5 ``line``,
    OBX-11 ``status`` (table 0085), OBX-14 and OBX-19 ``time``, OBX-18 ``equipment``.
    """
    observation: Group = order.add_group("ORU_R01_OBSERVATION")
    obx_fields = {
        "obx_1": str(set_id),
        "obx_2": "TX",
        "obx_3": "^".join(escape(c) for c in code),
        "obx_4": "1",
        "obx_5": escape(line),
        "obx_11": status,
        "obx_14": time,
        "obx_18": equipment,
        "obx_19": time,
    }
    set_fields(observation.add_segment("OBX"), obx_fields, keep_empty=True)
