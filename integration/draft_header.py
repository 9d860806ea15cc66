"""What every draft object of the node shares, whatever its class (SR, KOS, Encapsulated PDF,
coded SR): the warning that begins its Series Description, the order it answers (Referenced
Request Sequence), its Content and Series Date/Time, the algorithm as device observer and as
Contributing Equipment, and highdicom's errors with the patient's values redacted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from integration.errors import SRBuildError
from integration.header_values import utc_offset
from integration.privacy import quiet_person_name_warnings, redact_patient_values

__all__ = [
    "SERIES_WARNING",
    "algorithm_equipment",
    "check_text_fields",
    "device_observer",
    "draft_local_time",
    "draft_series_description",
    "draft_timestamp",
    "finish_draft_header",
    "requested_procedures_from",
    "set_utc_offset",
    "sr_build_errors",
    "with_type2_patient_study",
]

SERIES_WARNING = "AI DRAFT UNVERIFIED"
"""The start of every draft series description (a cut-short description still warns)."""
_MAX_LO = 64  # VR LO maximum length (PS3.5 6.2)
#: the Type 2 Patient and General Study attributes (PS3.3 C.7.1.1, C.7.2.1) that highdicom's
#: SR constructors read from the first evidence dataset
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def draft_series_description(*, demo: bool, kind: str = "report") -> str:
    """Series Description (0008,103E) of a draft series (VR LO, <= 64 characters).

    Begins with :data:`SERIES_WARNING`, e.g. ``"AI DRAFT UNVERIFIED - report (DEMO)"``.
    """
    text = f"{SERIES_WARNING} - {kind}"
    return f"{text} (DEMO)" if demo else text


def requested_procedures_from(source: Dataset) -> list[Dataset]:
    """Referenced Request Sequence items (PS3.3 C.17.2.2) for the order of a source image.

    Lets a RIS/PACS match the SR to its order. Taken from the image's Request Attributes
    Sequence (0040,0275) when present, else built from Accession Number (0008,0050); empty
    when the image carries neither.

    Parameters
    ----------
    source
        The evidence image (header is enough).

    Returns
    -------
    list of pydicom.dataset.Dataset
        Items for ``build_draft_sr(requested_procedures=...)``.
    """
    accession = str(source.get("AccessionNumber", "") or "")
    requests = list(source.get("RequestAttributesSequence") or [])
    if not requests and not accession:
        return []
    items: list[Dataset] = []
    for request in requests or [Dataset()]:
        item = Dataset()
        item.AccessionNumber = str(request.get("AccessionNumber", "") or accession)
        item.ReferencedStudySequence = []
        item.StudyInstanceUID = source.StudyInstanceUID
        item.RequestedProcedureDescription = str(
            request.get("RequestedProcedureDescription", "") or source.get("StudyDescription", "")
        )[:_MAX_LO]
        item.RequestedProcedureCodeSequence = list(
            request.get("RequestedProcedureCodeSequence") or []
        )
        item.RequestedProcedureID = str(request.get("RequestedProcedureID", "") or "")
        item.PlacerOrderNumberImagingServiceRequest = str(
            source.get("PlacerOrderNumberImagingServiceRequest", "") or ""
        )
        item.FillerOrderNumberImagingServiceRequest = str(
            source.get("FillerOrderNumberImagingServiceRequest", "") or ""
        )
        items.append(item)
    return items


def with_type2_patient_study(source: Dataset) -> Dataset:
    """``source``, or a copy of it with the Type 2 Patient and General Study attributes it
    lacks present and empty (PS3.3 C.7.1.1, C.7.2.1: zero length when unknown).

    The SCP stores an image whatever it lacks (an anonymiser may remove Patient's Sex, an old
    modality never write Study ID); a draft object copies these attributes from it, and
    highdicom's SR constructors need each one present. ``source`` itself is not changed.
    """
    missing = [keyword for keyword in _TYPE2_PATIENT_STUDY if keyword not in source]
    if not missing:
        return source
    filled = Dataset(dict(source.items()))  # a new dict of the same elements
    for keyword in missing:
        setattr(filled, keyword, None)
    return filled


def draft_timestamp(created_at: dt.datetime | None) -> dt.datetime:
    """Content and Series Date/Time of a draft object: ``created_at`` or now (local time
    with its UTC offset), to the second (PS3.3 C.17.2, C.7.3.1)."""
    return (created_at or dt.datetime.now().astimezone()).replace(microsecond=0)


@contextmanager
def sr_build_errors(evidence: Sequence[Dataset]) -> Iterator[None]:
    """Around a highdicom SR constructor: ignore its single-component Patient Name warning
    and turn what it raises into :class:`~integration.errors.SRBuildError`, with the patient
    values of ``evidence`` redacted (:mod:`integration.privacy`) and not chained."""
    try:
        with quiet_person_name_warnings():
            yield
    except (ValueError, TypeError, AttributeError) as exc:
        # e.g. "Unable to convert '1951-03-14' to 'DA' object" for a malformed birth date
        # (not chained: the original's text would reach a logged traceback unredacted)
        reason = redact_patient_values(str(exc), evidence)
        raise SRBuildError(f"highdicom refused the SR: {reason}") from None


def draft_local_time(when: dt.datetime, source: Dataset) -> dt.datetime:
    """``when`` as a draft object of ``source`` states its dates and times.

    Timezone Offset From UTC (0008,0201) applies to every DA and TM of an instance (PS3.3
    C.12.1.1.8), the Study Date and Time the object copies from ``source`` included. So the
    object takes ``source``'s offset, and ``when`` in that zone; where ``source`` has none,
    its times are local and of an unknown zone, and the object states none either: ``when``
    in this host's local time.

    Parameters
    ----------
    when
        An aware time (the draft's creation).
    source
        The header of the image the object is about.

    Returns
    -------
    datetime.datetime
        ``when`` in the zone of ``source``'s Timezone Offset From UTC, else in local time.
    """
    offset = utc_offset(source)
    if offset:
        return when.astimezone(dt.datetime.strptime(offset, "%z").tzinfo)
    return when.astimezone()


def finish_draft_header(sr: Dataset, source: Dataset, when: dt.datetime) -> None:
    """Set Content, Series and Instance Creation Date/Time (PS3.3 C.17.2, C.7.3.1, C.12.1)
    of ``sr`` to ``when`` in the zone of ``source`` (:func:`draft_local_time`), copy Issuer
    of Accession Number Sequence (C.7.2.1) from ``source``, and state ``source``'s Timezone
    Offset From UTC (C.12.1; none where ``source`` has no valid one)."""
    local = draft_local_time(when, source)
    sr.ContentDate = sr.SeriesDate = sr.InstanceCreationDate = DA(local.strftime("%Y%m%d"))
    sr.ContentTime = sr.SeriesTime = sr.InstanceCreationTime = TM(local.strftime("%H%M%S"))
    if "IssuerOfAccessionNumberSequence" in source:
        sr.IssuerOfAccessionNumberSequence = source.IssuerOfAccessionNumberSequence
    set_utc_offset(sr, source)


def set_utc_offset(target: Dataset, source: Dataset) -> None:
    """State ``source``'s Timezone Offset From UTC (0008,0201) in ``target``, the zone
    :func:`draft_local_time` puts ``target``'s times in; remove it where ``source`` has no
    valid one (its times are then the host's local time, of no stated zone)."""
    offset = utc_offset(source)
    if offset:
        target.TimezoneOffsetFromUTC = offset
    elif "TimezoneOffsetFromUTC" in target:
        del target.TimezoneOffsetFromUTC


def device_observer(
    *, algorithm_name: str, algorithm_version: str, manufacturer: str, device_uid: str
) -> hd.sr.ObserverContext:
    """The algorithm as observer (PS3.16 TID 1002/1004): Observer Type (DCM 121005) =
    Device; Device Observer UID, Name, Manufacturer and Model Name ``"<name> <version>"``."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=f"{algorithm_name} {algorithm_version}",  # TEXT (UT): never cut
        ),
    )


def algorithm_equipment(
    *,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    institution_name: str | None,
    description: str,
) -> hd.ContributingEquipment:
    """The algorithm as Contributing Equipment (PS3.3 C.12.1.1.5, DCM 109102 "Processing
    Equipment"): Manufacturer's Model Name = its name, Software Versions = its version,
    Contribution Description = ``description`` (first 64 characters)."""
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        institution_name=institution_name,
        contribution_description=description[:_MAX_LO],
    )


def check_text_fields(fields: Mapping[str, str]) -> None:
    """Raise :class:`~integration.errors.SRBuildError` for an empty value or one longer
    than VR LO allows (64 characters, PS3.5 6.2); the message names the field only."""
    for label, value in fields.items():
        if not value or not value.strip():
            raise SRBuildError(f"{label} must not be empty")
        if len(value) > _MAX_LO:
            raise SRBuildError(f"{label} longer than {_MAX_LO} characters (VR LO)")
