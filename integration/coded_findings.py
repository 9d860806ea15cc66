"""The draft's CheXpert labels as coded findings: a TID 1500 Measurement Report (highdicom).

The 14 CheXpert observations, each labelled ``positive``, ``negative``, ``uncertain`` or
``not_mentioned``, become one Comprehensive SR (PS3.3 A.35.3, SOP Class
1.2.840.10008.5.1.4.1.1.88.33) with a PS3.16 TID 1500 "Measurement Report" tree: one TID 1501
measurement group per mentioned observation, holding one qualitative evaluation (TID 1501
row "Qualitative Evaluations", CONTAINS CODE) whose name is the observation's code and whose
value is its presence from DICOM CID 240 "Present-Absent" (:data:`PRESENCE`);
``not_mentioned`` produces no group. (TID 1500 also has a root-level "Qualitative
Evaluations" container for the whole subject, but highdicom's ``MeasurementReport`` needs at
least one measurement group, and a group also carries the source image, the algorithm and a
finding site.)::

    CONTAINER (DCM 126000 "Imaging Measurement Report"), template 1500          CID 7021
     +-- HAS CONCEPT MOD  Language = (en-US, RFC5646)                            TID 1204
     +-- HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name,
     |                    Manufacturer, Model Name "<name> <version>"       TID 1002/1004
     +-- HAS CONCEPT MOD  Procedure Reported = (363679005, SCT, "Imaging procedure") CID 100
     +-- CONTAINS CONTAINER Image Library: the image the model read, where its header has
     |                    what the TID 1603 descriptors need (else left out)         TID 1600
     +-- CONTAINS CONTAINER (DCM 126010 "Imaging Measurements")
           +-- CONTAINS CONTAINER (DCM 125007 "Measurement Group"), one per mentioned
                 |                                                 observation  TID 1501
                 +-- HAS OBS CONTEXT Tracking Identifier "CheXpert <observation>",
                 |                   Tracking Unique Identifier (deterministic UID)
                 +-- HAS CONCEPT MOD Finding Site (SCT 363698007) = Lung (lung opacity,
                 |                   lung lesion; :data:`FINDING_SITES`)
                 +-- HAS CONCEPT MOD Algorithm Name / Version = the model        TID 4019
                 +-- CONTAINS CODE <observation code> = Present / Absent / Undetermined
                 +-- CONTAINS IMAGE (DCM 121112 "Source of Measurement") = the image read

Codes (:data:`OBSERVATION_CODES`; SCT = SNOMED CT, DCM = DICOM PS3.16 Annex D, 99LLMCXR = a
local coding scheme of this node, PS3.3 8.2: "99" designators are private)::

    observation                 first code (the evaluation's name)   status
    no_finding                  17621005 SCT "Normal"                verified (CID 222/242);
                                                                     the mapping is a choice
    enlarged_cardiomediastinum  ENL-CARDIOMED 99LLMCXR               LOCAL: no code found
    cardiomegaly                8186001 SCT "Cardiomegaly"           UNVERIFIED (CID 12248's
                                                                     287272002 has another
                                                                     SNOMED CT name)
    lung_opacity                112001 DCM "Opacity" + site Lung     verified (CID 6104)
    lung_lesion                 52988006 SCT "Lesion" + site Lung    verified
    edema                       19242006 SCT "Pulmonary edema"       verified (CID 3700)
    consolidation               95436008 SCT "Consolidation"         UNVERIFIED
    pneumonia                   233604007 SCT "Pneumonia"            UNVERIFIED
    atelectasis                 46621007 SCT "Atelectasis"           UNVERIFIED
    pneumothorax                36118008 SCT "Pneumothorax"          verified (CID 6105)
    pleural_effusion            60046008 SCT "Pleural effusion"      verified
    pleural_other               PLEURAL-OTHER 99LLMCXR               LOCAL: no code found
    fracture                    125605004 SCT "Fracture of bone"     UNVERIFIED
    support_devices             SUPPORT-DEVICE 99LLMCXR              LOCAL; then the device
                                                                     types of CID 6138 (ET
                                                                     tube, catheter,
                                                                     pacemaker, lead, feeding
                                                                     tube, chest tube, central
                                                                     line): verified

UNVERIFIED: the same SNOMED CT code in two or more public code mappings, not checked
against a SNOMED CT release; LOCAL: meaningful only to this node (Coding Scheme
Identification Sequence (0008,0110) names the scheme in every object that uses it). A
generic "support devices" is none of the CID 6138 device types, so its evaluation uses the
local code rather than claim a particular device.

Document (PS3.3 C.17.2): Completion Flag PARTIAL, Verification Flag UNVERIFIED, Preliminary
Flag PRELIMINARY; its own series, Series Description ``"AI DRAFT UNVERIFIED - coded
findings"`` (``" (DEMO)"`` added for the demo model). Patient, study and equipment
attributes, dates and the error handling are those of the draft SR (:mod:`integration.sr`
helpers). The draft SR is referenced in the Current Requested Procedure Evidence Sequence
(0040,A375), next to the image: both are composite instances created for the study's
requested procedure, which is what that sequence lists (C.17.2.1). The Predecessor
Documents Sequence would say this document replaces the draft, which it does not, and TID
1500 has no row for a reference to another SR.

UIDs (:func:`integration.uids.deterministic_uid`) follow the draft SR UID, the model and
the labels: a rebuild gives the same UIDs; one series per study and model version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, ComprehensiveSRStorage

from integration.draft_header import (
    algorithm_equipment,
    check_text_fields,
    device_observer,
    draft_series_description,
    draft_timestamp,
    finish_draft_header,
    requested_procedures_from,
    sr_build_errors,
    with_type2_patient_study,
)
from integration.errors import SRBuildError
from integration.uids import (
    DRAFT_KINDS,
    deterministic_uid,
    device_uid,
    draft_series_number,
    sr_series_uid,
)

__all__ = [
    "FINDING_SITES",
    "LABELS",
    "LOCAL_SCHEME",
    "OBSERVATION_CODES",
    "PRESENCE",
    "build_coded_findings_sr",
    "coded_findings_instance_uid",
    "coded_findings_series_number",
    "coded_findings_series_uid",
    "coding_scheme_identification",
    "positive_finding_codes",
    "validate_labels",
]

LOCAL_SCHEME = "99LLMCXR"
"""Private coding scheme designator (PS3.3 8.2) of the node's local observation codes."""
_LOCAL_SCHEME_NAME = "llm-cxr-node local CheXpert observation codes"

OBSERVATION_CODES: Mapping[str, tuple[Code, ...]] = MappingProxyType(
    {
        # verified code (CID 222/242); "no finding" as "Normal" is a design choice
        "no_finding": (Code("17621005", "SCT", "Normal"),),
        # LOCAL: no SNOMED CT or DICOM code found for enlarged cardiomediastinum
        "enlarged_cardiomediastinum": (
            Code("ENL-CARDIOMED", LOCAL_SCHEME, "Enlarged cardiomediastinum"),
        ),
        # UNVERIFIED (corroborated); CID 12248's 287272002 has another SNOMED name
        "cardiomegaly": (Code("8186001", "SCT", "Cardiomegaly"),),
        # verified (CID 6104); site Lung in FINDING_SITES
        "lung_opacity": (Code("112001", "DCM", "Opacity"),),
        # verified; post-coordinated with site Lung (FINDING_SITES)
        "lung_lesion": (Code("52988006", "SCT", "Lesion"),),
        # verified (CID 3700)
        "edema": (Code("19242006", "SCT", "Pulmonary edema"),),
        # UNVERIFIED (corroborated; one source gives 95436003)
        "consolidation": (Code("95436008", "SCT", "Consolidation"),),
        # UNVERIFIED (corroborated)
        "pneumonia": (Code("233604007", "SCT", "Pneumonia"),),
        # UNVERIFIED (corroborated); CID 6103 has only plate-like atelectasis
        "atelectasis": (Code("46621007", "SCT", "Atelectasis"),),
        # verified (CID 6105)
        "pneumothorax": (Code("36118008", "SCT", "Pneumothorax"),),
        # verified
        "pleural_effusion": (Code("60046008", "SCT", "Pleural effusion"),),
        # LOCAL: no code found (4468000 "pleural thickening" is narrower, one source)
        "pleural_other": (Code("PLEURAL-OTHER", LOCAL_SCHEME, "Other pleural abnormality"),),
        # UNVERIFIED (corroborated)
        "fracture": (Code("125605004", "SCT", "Fracture of bone"),),
        # LOCAL generic code first (no device type is implied), then the verified device
        # types of CID 6138 "Chest Non-lesion Object Type" a consumer may refine it to
        "support_devices": (
            Code("SUPPORT-DEVICE", LOCAL_SCHEME, "Support device"),
            Code("26412008", "SCT", "Endotracheal tube"),
            Code("19923001", "SCT", "Catheter"),
            Code("14106009", "SCT", "Cardiac pacemaker"),
            Code("360129009", "SCT", "Cardiac pacemaker lead"),
            Code("25062003", "SCT", "Feeding tube"),
            Code("112173", "DCM", "Chest tube"),
            Code("112174", "DCM", "Central line"),
        ),
    }
)
"""CheXpert observation name to its codes; the first names the qualitative evaluation
(TID 1501) and is the value of the draft SR's CODE Finding item (TID 2002)."""

FINDING_SITES: Mapping[str, Code] = MappingProxyType(
    {
        "lung_opacity": Code("39607008", "SCT", "Lung"),  # verified (CID 6100 etc.)
        "lung_lesion": Code("39607008", "SCT", "Lung"),
    }
)
"""Finding Site (SCT 363698007, TID 1501 row "Finding Site") that completes a code."""

PRESENCE: Mapping[str, Code] = MappingProxyType(
    {
        "positive": Code("52101004", "SCT", "Present"),
        "negative": Code("272519000", "SCT", "Absent"),
        "uncertain": Code("373068000", "SCT", "Undetermined"),
    }
)
"""Label to the evaluation's value, from DICOM CID 240 "Present-Absent"."""
NOT_MENTIONED = "not_mentioned"
LABELS = (*PRESENCE, NOT_MENTIONED)
"""Every accepted label; ``not_mentioned`` produces no content item."""

_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")  # CID 100
_CODED_FINDINGS_DIGIT = 4  # last digit of the series number, unused by uids.DRAFT_KINDS
_MAX_SHOWN = 40  # characters of an unknown name or label quoted in an error


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Check CheXpert labels and return the mentioned ones.

    Parameters
    ----------
    labels
        Observation name (a key of :data:`OBSERVATION_CODES`) to a label of
        :data:`LABELS`; an observation left out counts as ``not_mentioned``.

    Returns
    -------
    dict of str to str
        The observations labelled ``positive``, ``negative`` or ``uncertain``, in the order
        of :data:`OBSERVATION_CODES`.

    Raises
    ------
    ValueError
        An unknown observation or label (the message names it).
    """
    for name, label in labels.items():
        if name not in OBSERVATION_CODES:
            raise ValueError(
                f"unknown CheXpert observation {str(name)[:_MAX_SHOWN]!r}, "
                f"expected one of {', '.join(OBSERVATION_CODES)}"
            )
        if label not in LABELS:
            raise ValueError(
                f"unknown label {str(label)[:_MAX_SHOWN]!r} for {name}, "
                f"expected one of {', '.join(LABELS)}"
            )
    return {
        name: labels[name]
        for name in OBSERVATION_CODES
        if labels.get(name, NOT_MENTIONED) != NOT_MENTIONED
    }


def positive_finding_codes(labels: Mapping[str, str]) -> list[Code]:
    """The first code of each positive observation (the draft SR's CODE Finding items,
    PS3.16 TID 2002), in the order of :data:`OBSERVATION_CODES`.

    Raises
    ------
    ValueError
        An unknown observation or label (:func:`validate_labels`).
    """
    mentioned = validate_labels(labels)
    return [OBSERVATION_CODES[n][0] for n, label in mentioned.items() if label == "positive"]


def coding_scheme_identification(used: Iterable[Code]) -> list[Dataset]:
    """Coding Scheme Identification Sequence (0008,0110) items (PS3.3 C.12.1) for the
    local scheme :data:`LOCAL_SCHEME` when ``used`` has one of its codes, else ``[]``."""
    if not any(code.scheme_designator == LOCAL_SCHEME for code in used):
        return []
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = _LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "llm-cxr-node"
    return [item]


def coded_findings_series_uid(study_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID of the coded findings series: one per study and model version."""
    return deterministic_uid("coded-findings-series", study_uid, model_name, model_version)


def coded_findings_series_number(model_name: str, model_version: str) -> int:
    """Series Number (0020,0011): the draft SR's (:func:`integration.uids.draft_series_number`)
    with last digit 4, so a viewer lists it next to the SR and PDF of the model version."""
    draft = draft_series_number("sr", model_name, model_version)
    return draft - DRAFT_KINDS["sr"] + _CODED_FINDINGS_DIGIT


def coded_findings_instance_uid(
    study_uid: str,
    model_name: str,
    model_version: str,
    *,
    source: str,
    labels: Mapping[str, str],
) -> str:
    """SOP Instance UID of the coded findings SR.

    Parameters
    ----------
    study_uid, model_name, model_version
        The study and the model.
    source
        The draft SR's SOP Instance UID (or, without one, the image's).
    labels
        The labels (validated; ``not_mentioned`` ones do not count): other labels for the
        same draft give another UID.
    """
    mentioned = validate_labels(labels)
    text = ",".join(f"{name}={label}" for name, label in mentioned.items())
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return deterministic_uid(
        "coded-findings-instance", study_uid, model_name, model_version, source, digest
    )


def build_coded_findings_sr(
    image: Dataset,
    labels: Mapping[str, str],
    *,
    model_name: str,
    model_version: str,
    demo: bool,
    draft_sr_uid: str | None,
    series_number: int | None = None,
    content_datetime: dt.datetime | None = None,
    manufacturer: str = "llm-cxr-node",
    software_version: str | None = None,
    draft_sr_series_uid: str | None = None,
    draft_sr_class_uid: str = ComprehensiveSRStorage,
    institution_name: str | None = None,
) -> Dataset:
    """Build the coded findings SR (PS3.16 TID 1500 in a Comprehensive SR) for one image.

    Parameters
    ----------
    image
        The image the model read (header is enough): patient and study attributes are
        copied from it, and it is the evidence and source image of every group.
    labels
        CheXpert observation to label (:func:`validate_labels`); at least one mentioned.
    model_name, model_version
        The model (Device observer TID 1004, TID 4019 Algorithm Identification,
        Contributing Equipment, UIDs).
    demo
        The demo model made the labels: ``" (DEMO)"`` in the Series Description.
    draft_sr_uid
        SOP Instance UID of the draft SR the labels belong to, listed in the Current
        Requested Procedure Evidence Sequence; ``None``: no reference, UIDs from the image.
    series_number
        Series Number; default :func:`coded_findings_series_number`.
    content_datetime
        Content and Series Date/Time (default: now, local time).
    manufacturer, software_version
        The node's Manufacturer (0008,0070) and Software Versions (0018,1020).
    draft_sr_series_uid, draft_sr_class_uid
        The draft SR's Series Instance UID (default
        :func:`integration.uids.sr_series_uid`, the Comprehensive SR draft series) and SOP
        Class UID (default Comprehensive SR).
    institution_name
        Institution Name (0008,0080), or ``None``.

    Returns
    -------
    pydicom.dataset.Dataset
        A highdicom ``ComprehensiveSR`` (Explicit VR Little Endian, ``ISO_IR 192``).

    Raises
    ------
    ValueError
        An unknown observation or label, or no observation mentioned.
    integration.errors.SRBuildError
        An image without study/series/SOP UIDs, an invalid UID, an empty or too long model
        name or version, or a value highdicom refuses (never quoting patient values).
    """
    mentioned = validate_labels(labels)
    if not mentioned:
        raise ValueError("no CheXpert observation is mentioned: there is nothing to code")
    check_text_fields({"model_name": model_name, "model_version": model_version})
    study = _required_uids(image, draft_sr_uid)
    uid = coded_findings_instance_uid(
        study, model_name, model_version, source=draft_sr_uid or image.SOPInstanceUID, labels=labels
    )
    evidence = [with_type2_patient_study(image)]  # patient and study attributes copied
    if draft_sr_uid is not None:
        series = draft_sr_series_uid or sr_series_uid(study, model_name, model_version)
        evidence.append(_reference(study, series, draft_sr_class_uid, draft_sr_uid))
    if series_number is None:
        series_number = coded_findings_series_number(model_name, model_version)
    equipment = algorithm_equipment(
        algorithm_name=model_name,
        algorithm_version=model_version,
        manufacturer=manufacturer,
        institution_name=institution_name,
        description=f"AI coded findings ({'DEMO model, ' if demo else ''}not verified)",
    )
    with sr_build_errors([image]):
        content = _measurement_report(
            image, mentioned, uid, model_name, model_version, manufacturer
        )
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=content,
            series_instance_uid=coded_findings_series_uid(study, model_name, model_version),
            series_number=series_number,
            sop_instance_uid=uid,
            instance_number=1,
            manufacturer=manufacturer,
            is_complete=False,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            requested_procedures=requested_procedures_from(image) or None,
            contributing_equipment=[equipment],
            series_description=draft_series_description(demo=demo, kind="coded findings"),
            manufacturer_model_name="llm-cxr-node",
            software_versions=software_version,
            specific_character_set="ISO_IR 192",
        )
    finish_draft_header(sr, image, draft_timestamp(content_datetime))
    used = [OBSERVATION_CODES[name][0] for name in mentioned]
    if schemes := coding_scheme_identification(used):
        sr.CodingSchemeIdentificationSequence = schemes
    return sr


def _required_uids(image: Dataset, draft_sr_uid: str | None) -> str:
    """The image's Study Instance UID, after checking the UIDs the SR needs are valid."""
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
    uids = {k: str(image.get(k, "") or "") for k in keywords}
    if draft_sr_uid is not None:
        uids["draft_sr_uid"] = draft_sr_uid
    for label, value in uids.items():
        if not UID(value).is_valid:
            raise SRBuildError(f"{label} of the coded findings SR is missing or not a valid UID")
    return uids["StudyInstanceUID"]


def _reference(study: str, series: str, sop_class: str, sop_instance: str) -> Dataset:
    """The UIDs of an instance, as highdicom takes evidence (PS3.3 C.17.2.1)."""
    ref = Dataset()
    ref.StudyInstanceUID = study
    ref.SeriesInstanceUID = series
    ref.SOPClassUID = sop_class
    ref.SOPInstanceUID = sop_instance
    return ref


def _measurement_report(
    image: Dataset,
    mentioned: Mapping[str, str],
    sop_instance_uid: str,
    model_name: str,
    model_version: str,
    manufacturer: str,
) -> hd.sr.MeasurementReport:
    """The TID 1500 tree: one TID 1501 group with one qualitative evaluation (CONTAINS
    CODE, name = observation code, value from CID 240) per mentioned observation."""
    observer = device_observer(
        algorithm_name=model_name,
        algorithm_version=model_version,
        manufacturer=manufacturer,
        device_uid=device_uid(model_name, model_version),
    )
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    source = hd.sr.SourceImageForMeasurementGroup.from_source_image(image)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=deterministic_uid("coded-findings-group", sop_instance_uid, name),
                identifier=f"CheXpert {name}",
            ),
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(FINDING_SITES[name])]
            if name in FINDING_SITES
            else None,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=OBSERVATION_CODES[name][0], value=PRESENCE[label])
            ],
            source_images=[source],
        )
        for name, label in mentioned.items()
    ]
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=[image] if _describable(image) else None,
    )


def _describable(image: Dataset) -> bool:
    """Whether highdicom can describe ``image`` in the Image Library (TID 1600/1601: for
    CR/DX it needs Patient Orientation and Imager Pixel Spacing, Type 2C/3 there)."""
    try:
        hd.sr.ImageLibraryEntryDescriptors(image)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return False
    return True
