"""The draft report as a DICOM SR: a TID 2000 Basic Diagnostic Imaging Report (highdicom).

Content tree (PS3.16 TID 2000, root-only and non-extensible: narrative lives only inside
CID 7001 headings, TID 2002 under them):

```
CONTAINER (LN 18748-4 "Diagnostic Imaging Report"), template 2000
 +-- HAS CONCEPT MOD  CODE (DCM 121049 "Language of Content Item and Descendants")
 |                    = (en-US, RFC5646)                                        TID 1204
 +-- HAS OBS CONTEXT  Observer Type (DCM 121005) = Device; Device Observer UID, Name,
 |                    Manufacturer, Model Name (DCM 121012-121015)          TID 1002/1004
 +-- CONTAINS CONTAINER (LN 55112-7 "Summary")                                 CID 7001
 |     +-- CONTAINS TEXT (LN 55112-7 "Summary") "AI-generated DRAFT ... NOT VERIFIED ..."
 |     +-- CONTAINS TEXT (LN 55112-7 "Summary") "DEMO MODEL ..."       (demo bundles only)
 +-- CONTAINS CONTAINER (LN 59776-5 "Findings")     (only with findings text or codes)
 |     +-- CONTAINS TEXT (DCM 121071 "Finding") findings                       TID 2002
 |     |     +-- INFERRED FROM IMAGE (DCM 121080 "Best illustration of finding")
 |     |                             = the image the model read                TID 2001
 |     +-- CONTAINS CODE (DCM 121071 "Finding") = the code of a positive CheXpert
 |           observation, one each (only with ``coded_findings``; no INFERRED FROM:
 |           Basic Text SR allows it from TEXT only, PS3.3 Table A.35.1-2)      TID 2002
 +-- CONTAINS CONTAINER (LN 19005-8 "Impressions")
       +-- CONTAINS TEXT (DCM 121073 "Impression") impression
             +-- INFERRED FROM IMAGE (DCM 121080) = the image the model read
```

The AI notice is the first heading, so a viewer that renders the tree as text (OHIF's SR
text viewport, Stone, Weasis) shows it first and labelled. Document flags (PS3.3 C.17.2):
Completion PARTIAL, Verification UNVERIFIED, Preliminary PRELIMINARY. Patient and study
attributes (with Issuer of Accession Number Sequence and Timezone Offset From UTC) are copied
from the evidence (a Type 2 one the image lacks is empty, PS3.3 C.7.1.1, C.7.2.1); every
instance of the study the node received is listed in the Current
Requested Procedure Evidence Sequence (0040,A375), and the image the model read also appears
in the tree. Series Description begins with "AI DRAFT UNVERIFIED" so that a viewer that cuts
it short still shows the warning; Series Date/Time are the SR's creation time.

The algorithm (IHE AI Results: name and version) is the TID 1004 device observer (name,
model name "<name> <version>") and Contributing Equipment (PS3.3 C.12.1.1.5, purpose DCM
109102 "Processing Equipment": Manufacturer's Model Name = algorithm name, Software Versions
= algorithm version). TID 4019 Algorithm Identification cannot be added: TID 2000 is
non-extensible. General Equipment (C.7.5.1) is the node itself: Manufacturer, Manufacturer's
Model Name and Software Versions are the node's.

A re-drafted study gets a new SOP Instance UID (:mod:`integration.uids`) and the Predecessor
Documents Sequence (0040,A360) references the earlier SRs it supersedes.

``kind="basic"`` builds the same tree as a Basic Text SR (1.2.840.10008.5.1.4.1.1.88.11,
PS3.3 A.35.1; IHE SINR's carrier), for PACS and RIS that accept only that class; highdicom
has no Basic Text SR class, so it is built as an Enhanced SR (the same modules and a
superset of value types) and given the Basic Text SR SOP Class, which the tree's value types
(CONTAINER, CODE, TEXT, UIDREF, IMAGE) and relationships allow.

Specific Character Set is ISO_IR 192 (UTF-8), so non-ASCII names and text survive.

Privacy: highdicom's warning that quotes a single-component Patient Name ("DOE JOHN") is
ignored while the SR is built, and an error highdicom raises is wrapped with the evidence's
patient attribute values redacted (:mod:`integration.privacy`): the job error it becomes is
logged, stored and shown in the admin API.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Literal

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from integration.coded_findings import coding_scheme_identification, positive_finding_codes
from integration.draft_header import (
    algorithm_equipment,
    check_text_fields,
    device_observer,
    draft_series_description,
    draft_timestamp,
    finish_draft_header,
    sr_build_errors,
    with_type2_patient_study,
)
from integration.errors import SRBuildError
from integration.uids import device_uid as default_device_uid

__all__ = ["AI_DRAFT_NOTE", "BASIC_TEXT_SR_STORAGE", "DEMO_NOTE", "build_draft_sr"]

AI_DRAFT_NOTE = (
    "AI-generated DRAFT report, produced automatically by {algorithm} {version}. "
    "NOT VERIFIED by a radiologist: preliminary, for review only, not for diagnosis."
)
DEMO_NOTE = (
    "DEMO MODEL: randomly initialised weights. This output is meaningless and must not be "
    "used for any clinical purpose."
)
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
_REPORT_TITLE = codes.LN.DiagnosticImagingReport  # CID 7000
_SUMMARY = codes.LN.Summary  # CID 7001 heading and CID 7002 element
_LANGUAGE = hd.sr.CodedConcept(
    value="121049", scheme_designator="DCM", meaning="Language of Content Item and Descendants"
)
_ENGLISH = hd.sr.CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)


def build_draft_sr(
    *,
    evidence: Sequence[Dataset],
    image_read: Dataset,
    findings: str | None,
    impression: str,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    software_version: str,
    demo: bool,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    kind: Literal["comprehensive", "basic"] = "comprehensive",
    created_at: dt.datetime | None = None,
    device_uid: str | None = None,
    institution_name: str | None = None,
    previous_versions: Sequence[Dataset] | None = None,
    requested_procedures: Sequence[Dataset] | None = None,
    coded_findings: Mapping[str, str] | None = None,
) -> Dataset:
    """Build the preliminary, unverified draft report SR for one study.

    Parameters
    ----------
    evidence
        Every instance of the study the node received (full datasets or headers), all of
        one study; patient and study attributes are copied from the first (PS3.3 C.7.1.1,
        C.7.2.1; a Type 2 one it lacks is empty), and all are listed in the Current
        Requested Procedure Evidence Sequence (0040,A375).
    image_read
        The image the model read (one of ``evidence``): an IMAGE content item (TID 2001)
        under each text item.
    findings
        Findings text (heading LN 59776-5), or ``None``/empty for no Findings heading.
    impression
        Impression text (heading LN 19005-8); must not be empty.
    algorithm_name, algorithm_version
        The model's name and version (device observer, contributing equipment, notes).
    manufacturer, software_version
        The node's Manufacturer (0008,0070) and Software Versions (0018,1020).
    demo
        Whether the demo (randomly initialised) model produced the text; adds a DEMO note
        and marks the series description.
    sop_instance_uid, series_instance_uid, series_number
        From :func:`integration.uids.draft_instance_uid`, ``draft_series_uid`` and
        ``draft_series_number``: a changed draft gets a new UID, the same one the same UID.
    instance_number
        Instance Number (0020,0013).
    kind
        ``"comprehensive"`` (Comprehensive SR, the default) or ``"basic"`` (Basic Text SR).
    created_at
        Content and Series Date/Time (default: now, local time).
    device_uid
        Device Observer UID (DCM 121012); default derived from name and version.
    institution_name
        Institution Name (0008,0080) of the SR's equipment.
    previous_versions
        Earlier SRs this one supersedes (Predecessor Documents Sequence (0040,A360)); each
        needs Study, Series, SOP Class and SOP Instance UIDs only.
    requested_procedures
        Request Attributes items (Referenced Request Sequence (0040,A370)).
    coded_findings
        CheXpert labels of the draft (:func:`integration.coded_findings.validate_labels`):
        each positive one becomes a CODE Finding item in the Findings heading (see the
        tree above); negative and uncertain ones are left out (TID 2002 has no presence
        qualifier). ``None`` (the default) leaves the SR as it was without the argument.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR (a highdicom ``ComprehensiveSR``, or for ``"basic"`` an ``EnhancedSR`` with
        the Basic Text SR SOP Class), Explicit VR Little Endian, ready for ``save_as``.

    Raises
    ------
    integration.errors.SRBuildError
        Missing evidence, several studies, an image read outside the evidence, empty
        impression, invalid UIDs or labels, an unknown observation or label in
        ``coded_findings``, or a value highdicom refuses (the message never quotes a patient
        attribute value).
    """
    observer_uid = device_uid or default_device_uid(algorithm_name, algorithm_version)
    _check_inputs(
        evidence=evidence,
        image_read=image_read,
        impression=impression,
        labels={
            "algorithm_name": algorithm_name,
            "algorithm_version": algorithm_version,
            "manufacturer": manufacturer,
            "software_version": software_version,
        },
        uids={
            "SOP Instance UID": sop_instance_uid,
            "Series Instance UID": series_instance_uid,
            "Device Observer UID": observer_uid,
        },
    )
    finding_codes, schemes = _coded_findings(coded_findings)
    content = _content_tree(
        findings=findings,
        impression=impression,
        image_read=image_read,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        manufacturer=manufacturer,
        device_uid=observer_uid,
        demo=demo,
        finding_codes=finding_codes,
    )
    equipment = algorithm_equipment(
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        manufacturer=manufacturer,
        institution_name=institution_name,
        description=f"AI draft report generation ({'DEMO model, ' if demo else ''}not verified)",
    )
    sr_class = hd.sr.EnhancedSR if kind == "basic" else hd.sr.ComprehensiveSR
    # the patient and study attributes come from the first evidence dataset
    copied = [with_type2_patient_study(evidence[0]), *evidence[1:]]
    with sr_build_errors(evidence):
        sr = sr_class(
            evidence=copied,
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
            manufacturer_model_name="llm-cxr-node",
            software_versions=software_version,
            specific_character_set="ISO_IR 192",
        )
    return _finish_sr(sr, evidence[0], draft_timestamp(created_at), schemes, kind)


def _finish_sr(
    sr: Dataset, source: Dataset, when: dt.datetime, schemes: list[Dataset], kind: str
) -> Dataset:
    """The header of a built draft SR (:func:`finish_draft_header`), its Coding Scheme
    Identification Sequence (0008,0110), and for ``basic`` the Basic Text SR SOP Class
    (PS3.3 A.35.1; highdicom builds it as Enhanced SR)."""
    finish_draft_header(sr, source, when)
    if schemes:
        sr.CodingSchemeIdentificationSequence = schemes
    if kind == "basic":
        sr.SOPClassUID = UID(BASIC_TEXT_SR_STORAGE)
        sr.file_meta.MediaStorageSOPClassUID = UID(BASIC_TEXT_SR_STORAGE)
    return sr


def _coded_findings(coded_findings: Mapping[str, str] | None) -> tuple[list[Code], list[Dataset]]:
    """The first code of each positive observation, and the Coding Scheme Identification
    items (0008,0110) of the local codes among them; invalid labels: SRBuildError."""
    if coded_findings is None:
        return [], []
    try:
        found = positive_finding_codes(coded_findings)
    except ValueError as exc:
        raise SRBuildError(f"coded findings: {exc}") from None
    return found, coding_scheme_identification(found)


def _check_inputs(
    *,
    evidence: Sequence[Dataset],
    image_read: Dataset,
    impression: str,
    labels: dict[str, str],
    uids: dict[str, str],
) -> None:
    if not evidence:
        raise SRBuildError("evidence is empty: the SR must reference the image it was drawn from")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in evidence}
    if len(studies) != 1 or "" in studies:
        raise SRBuildError(
            f"evidence must come from exactly one study (Study Instance UID), got {len(studies)}"
        )
    read_uid = str(image_read.get("SOPInstanceUID", ""))
    if read_uid not in {str(ds.get("SOPInstanceUID", "")) for ds in evidence}:
        raise SRBuildError("the image the model read is not in the evidence")
    if not impression or not impression.strip():
        raise SRBuildError("impression text is empty (TID 2000 Impressions, LN 19005-8)")
    check_text_fields(labels)
    for label, uid in uids.items():
        if not UID(uid).is_valid:
            raise SRBuildError(f"{label} {uid!r} is not a valid UID")


def _content_tree(
    *,
    findings: str | None,
    impression: str,
    image_read: Dataset,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    device_uid: str,
    demo: bool,
    finding_codes: Sequence[Code],
) -> hd.sr.ContainerContentItem:
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    root = hd.sr.ContainerContentItem(name=_REPORT_TITLE, template_id="2000")
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=_LANGUAGE,
            value=_ENGLISH,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    ]
    observer = device_observer(
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        manufacturer=manufacturer,
        device_uid=device_uid,
    )
    items.extend(observer)  # type: ignore[arg-type]  # a ContentSequence of items
    notes = [AI_DRAFT_NOTE.format(algorithm=algorithm_name, version=algorithm_version)]
    if demo:
        notes.append(DEMO_NOTE)
    summary = [
        hd.sr.TextContentItem(name=_SUMMARY, value=n, relationship_type=contains) for n in notes
    ]
    items.append(_heading(_SUMMARY, summary))
    found: list[hd.sr.ContentItem] = []
    if findings and findings.strip():
        found.append(_text_from_image(codes.DCM.Finding, findings.strip(), image_read))
    found += [
        hd.sr.CodeContentItem(name=codes.DCM.Finding, value=code, relationship_type=contains)
        for code in finding_codes
    ]
    if found:
        items.append(_heading(codes.LN.Findings, found))
    impression_item = _text_from_image(codes.DCM.Impression, impression.strip(), image_read)
    items.append(_heading(codes.LN.Impressions, [impression_item]))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def _heading(
    name: hd.sr.CodedConcept | object, children: Sequence[hd.sr.ContentItem]
) -> hd.sr.ContainerContentItem:
    """A CID 7001 heading CONTAINER with ``children`` as CONTAINS items."""
    section = hd.sr.ContainerContentItem(
        name=name,  # type: ignore[arg-type]
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    section.ContentSequence = hd.sr.ContentSequence(list(children))
    return section


def _text_from_image(name: object, value: str, image: Dataset) -> hd.sr.TextContentItem:
    """A TEXT item (TID 2002) INFERRED FROM the image the model read (TID 2001)."""
    item = hd.sr.TextContentItem(
        name=name,  # type: ignore[arg-type]
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=str(image.SOPClassUID),
                referenced_sop_instance_uid=str(image.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        ]
    )
    return item
