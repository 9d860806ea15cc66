"""The draft report as a DICOM Comprehensive SR (highdicom).

Content tree (TID 2000 "Basic Diagnostic Imaging Report"-style narrative, PS3.16):

```
CONTAINER (LOINC 18748-4 "Diagnostic imaging study"), template 2000
 +-- HAS CONCEPT MOD  CODE (DCM 121049 "Language of Content Item and Descendants") = en
 +-- HAS OBS CONTEXT  TID 1002/1004 device observer: Observer Type (DCM 121005) = Device,
 |                    Device Observer UID / Name / Manufacturer / Model Name (121012-121015)
 +-- CONTAINS TEXT (DCM 121106 "Comment")  "AI-generated DRAFT ... not verified ..."
 +-- CONTAINS TEXT (DCM 121106 "Comment")  "DEMO MODEL ..."           (demo bundles only)
 +-- CONTAINS CONTAINER (DCM 121070 "Findings")
 |     +-- CONTAINS TEXT (DCM 121071 "Finding")  findings text          (when present)
 +-- CONTAINS CONTAINER (DCM 121072 "Impressions")
       +-- CONTAINS TEXT (DCM 121073 "Impression") impression text
```

Document flags (PS3.3 C.17.2 SR Document General module): Completion Flag PARTIAL,
Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY. Patient and study modules are
copied from the evidence (same Study Instance UID); the evidence images are listed in the
Current Requested Procedure Evidence Sequence (0040,A375). The algorithm is named as
contributing equipment (PS3.3 C.7.5.1, purpose DCM 109102 "Processing Equipment") and as
the device observer. Specific Character Set is ISO_IR 192 (UTF-8), so non-ASCII names and
text survive.

Privacy: highdicom's warning that quotes a single-component Patient Name ("DOE JOHN") is
ignored while the SR is built, and an error highdicom raises is wrapped with the evidence's
patient attribute values redacted (:mod:`integration.privacy`): the job error it becomes is
logged, stored and shown in the admin API.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from integration.errors import SRBuildError
from integration.privacy import quiet_person_name_warnings, redact_patient_values
from integration.uids import device_uid as default_device_uid

__all__ = [
    "AI_DRAFT_NOTE",
    "DEMO_NOTE",
    "build_draft_sr",
    "draft_series_description",
    "requested_procedures_from",
]

AI_DRAFT_NOTE = (
    "AI-generated DRAFT report, produced automatically by {algorithm} {version}. "
    "NOT VERIFIED by a radiologist: preliminary, for review only, not for diagnosis."
)
DEMO_NOTE = (
    "DEMO MODEL: randomly initialised weights. This output is meaningless and must not be "
    "used for any clinical purpose."
)
_REPORT_TITLE = hd.sr.CodedConcept(
    value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging study"
)
_LANGUAGE = hd.sr.CodedConcept(
    value="121049", scheme_designator="DCM", meaning="Language of Content Item and Descendants"
)
_ENGLISH = hd.sr.CodedConcept(value="en", scheme_designator="RFC5646", meaning="English")
_MAX_LO = 64  # VR LO maximum length (PS3.5 6.2)


def draft_series_description(*, demo: bool) -> str:
    """Series Description (0008,103E) of the draft SR series (VR LO, <= 64 characters)."""
    text = "AI DRAFT report - NOT VERIFIED"
    return f"{text} (DEMO MODEL)" if demo else text


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


def build_draft_sr(
    *,
    evidence: Sequence[Dataset],
    findings: str | None,
    impression: str,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    demo: bool,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    device_uid: str | None = None,
    institution_name: str | None = None,
    previous_versions: Sequence[Dataset] | None = None,
    requested_procedures: Sequence[Dataset] | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the preliminary, unverified draft report SR for one study.

    Parameters
    ----------
    evidence
        The image(s) the draft was drawn from (full datasets or headers), all of one study;
        patient and study attributes are copied from them (PS3.3 C.7.1.1, C.7.2.1) and they
        are referenced in the Current Requested Procedure Evidence Sequence (0040,A375).
    findings
        Findings text (TID 2000 "Findings" section, DCM 121070), or ``None``/empty to leave
        the section without text items.
    impression
        Impression text (DCM 121072 section); must not be empty.
    algorithm_name, algorithm_version
        The model's name and version (device observer, contributing equipment, notes).
    manufacturer
        Manufacturer (0008,0070) of the SR and of the device observer.
    demo
        Whether the demo (randomly initialised) model produced the text; adds a DEMO note
        and marks the series description.
    sop_instance_uid, series_instance_uid
        Use :func:`integration.uids.sr_instance_uid` / :func:`~integration.uids.sr_series_uid`
        so that a re-run replaces instead of duplicating.
    series_number, instance_number
        Series Number (0020,0011) and Instance Number (0020,0013).
    device_uid
        Device Observer UID (DCM 121012); default derived from name and version.
    institution_name
        Institution Name (0008,0080) of the SR's equipment.
    previous_versions
        Earlier SRs this one replaces (Predecessor Documents Sequence (0040,A360)).
    requested_procedures
        Request Attributes items (Referenced Request Sequence (0040,A370)).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        The SR dataset (Explicit VR Little Endian), ready for ``save_as``.

    Raises
    ------
    integration.errors.SRBuildError
        Missing evidence, several studies, empty impression, invalid UIDs or labels, or a
        value highdicom refuses (the message never quotes a patient attribute value).
    """
    if not evidence:
        raise SRBuildError("evidence is empty: the SR must reference the image it was drawn from")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1 or "" in studies:
        raise SRBuildError(
            f"evidence must come from exactly one study (Study Instance UID), got {len(studies)}"
        )
    if not impression or not impression.strip():
        raise SRBuildError("impression text is empty (TID 2000 Impressions, DCM 121072)")
    for label, value in (
        ("algorithm_name", algorithm_name),
        ("algorithm_version", algorithm_version),
        ("manufacturer", manufacturer),
    ):
        if not value or not value.strip():
            raise SRBuildError(f"{label} must not be empty")
        if len(value) > _MAX_LO:
            raise SRBuildError(f"{label} longer than {_MAX_LO} characters (VR LO)")
    for label, uid in (
        ("SOP Instance UID", sop_instance_uid),
        ("Series Instance UID", series_instance_uid),
    ):
        if not UID(uid).is_valid:
            raise SRBuildError(f"{label} {uid!r} is not a valid UID")
    observer_uid = device_uid or default_device_uid(algorithm_name, algorithm_version)
    if not UID(observer_uid).is_valid:
        raise SRBuildError(f"Device Observer UID {observer_uid!r} is not a valid UID")

    content = _content_tree(
        findings=findings,
        impression=impression,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        manufacturer=manufacturer,
        device_uid=observer_uid,
        demo=demo,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        institution_name=institution_name,
        contribution_description=(
            f"AI draft report generation ({'DEMO model, ' if demo else ''}not verified)"
        )[:_MAX_LO],
    )
    try:
        with quiet_person_name_warnings():
            sr = hd.sr.ComprehensiveSR(
                evidence=list(evidence),
                content=content,
                series_instance_uid=series_instance_uid,
                series_number=series_number,
                sop_instance_uid=sop_instance_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                is_complete=False,
                is_final=False,
                is_verified=False,
                institution_name=institution_name,
                requested_procedures=list(requested_procedures) if requested_procedures else None,
                previous_versions=list(previous_versions) if previous_versions else None,
                contributing_equipment=[equipment],
                series_description=draft_series_description(demo=demo),
                manufacturer_model_name=algorithm_name,
                software_versions=algorithm_version,
                specific_character_set="ISO_IR 192",
            )
    except (ValueError, TypeError, AttributeError) as exc:
        # e.g. "Unable to convert '1951-03-14' to 'DA' object" for a malformed birth date
        # (not chained: the original's text would reach a logged traceback unredacted)
        reason = redact_patient_values(str(exc), evidence)
        raise SRBuildError(f"highdicom refused the SR: {reason}") from None
    return sr


def _content_tree(
    *,
    findings: str | None,
    impression: str,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    device_uid: str,
    demo: bool,
) -> hd.sr.ContainerContentItem:
    root = hd.sr.ContainerContentItem(name=_REPORT_TITLE, template_id="2000")
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=_LANGUAGE,
            value=_ENGLISH,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=f"{algorithm_name} {algorithm_version}"[:_MAX_LO],
        ),
    )
    items.extend(observer)  # type: ignore[arg-type]  # a ContentSequence of items
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=AI_DRAFT_NOTE.format(algorithm=algorithm_name, version=algorithm_version),
            relationship_type=contains,
        )
    )
    if demo:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=DEMO_NOTE, relationship_type=contains
            )
        )
    findings_section = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type=contains
    )
    if findings and findings.strip():
        findings_section.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=codes.DCM.Finding, value=findings.strip(), relationship_type=contains
                )
            ]
        )
    impression_section = hd.sr.ContainerContentItem(
        name=codes.DCM.Impressions, relationship_type=contains
    )
    impression_section.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Impression, value=impression.strip(), relationship_type=contains
            )
        ]
    )
    items.extend([findings_section, impression_section])
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root
