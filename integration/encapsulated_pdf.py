"""The draft report PDF as a DICOM Encapsulated PDF instance (PS3.3 A.45.1, pydicom).

SOP Class 1.2.840.10008.5.1.4.1.1.104.1 "Encapsulated PDF Storage". The modules of
PS3.3 Table A.45.1-1 and what this builder puts in them:

- Patient (C.7.1.1): copied from the image read (Type 2 attributes empty when absent).
- General Study (C.7.2.1): copied, so the same Study Instance UID; date, time, accession
  number and Issuer of Accession Number Sequence.
- Encapsulated Document Series (C.24.1): Modality ``DOC`` (as DCMTK's ``pdf2dcm`` does
  after CP-749, not ``OT``), its own Series Instance UID and Number, Series Date/Time and a
  Series Description starting ``AI DRAFT UNVERIFIED``.
- General Equipment (C.7.5.1): Manufacturer, Manufacturer's Model Name and Software
  Versions of the node software.
- SC Equipment (C.8.6.1): Conversion Type ``WSD`` (workstation).
- Encapsulated Document (C.24.2): Instance Number, Content Date/Time, Acquisition DateTime
  (when the draft was generated), Burned In Annotation ``YES`` (the PDF prints the patient's
  identity), Document Title, Concept Name Code Sequence (18748-4, LN, "Diagnostic Imaging
  Report") from CID 7000, Verification Flag ``UNVERIFIED``, MIME Type ``application/pdf``,
  Encapsulated Document padded with one 0x00 to even length, Encapsulated Document Length
  (0042,0015) = the unpadded length, Source Instance Sequence = the image read.
- SOP Common (C.12.1): Specific Character Set ``ISO_IR 192``, Instance Creation Date/Time,
  Timezone Offset From UTC (copied), SOP Class/Instance UID (the instance UID from the
  caller), and the algorithm in Contributing Equipment Sequence (0018,A001) with purpose
  (109102, DCM, "Processing Equipment").

The file meta uses Explicit VR Little Endian. Text values of the source are decoded with the
source's character set and re-encoded as UTF-8 (``ISO_IR 192``), so a Latin-1 name stays the
same name.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from integration.draft_header import algorithm_equipment, draft_local_time, set_utc_offset
from integration.errors import EncapsulatedPdfError

__all__ = [
    "DOCUMENT_CONCEPT",
    "ENCAPSULATED_PDF_STORAGE",
    "build_encapsulated_pdf",
    "extract_pdf",
    "pdf_series_description",
]

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
# CID 7000 "Diagnostic Imaging Report Document Titles" spells 18748-4 "Diagnostic Imaging Report"
DOCUMENT_CONCEPT = ("18748-4", "LN", "Diagnostic Imaging Report")
DOCUMENT_TITLE = "AI-generated DRAFT radiology report (not verified)"
_PATIENT_STUDY = (
    # Patient module (C.7.1.1): Type 2 first, then Type 3 the node may meet
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    # General Study module (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    # SOP Common (C.12.1)
    "TimezoneOffsetFromUTC",
)
_TYPE2 = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)
_MAX_LO = 64


def pdf_series_description(*, demo: bool) -> str:
    """Series Description (0008,103E) of the PDF series (VR LO, <= 64 characters)."""
    return "AI DRAFT UNVERIFIED - report PDF" + (" (DEMO)" if demo else "")


def build_encapsulated_pdf(
    pdf: bytes,
    *,
    source: Dataset,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    created_at: dt.datetime,
    algorithm_name: str,
    algorithm_version: str,
    demo: bool,
    manufacturer: str,
    software_version: str,
    model_name: str = "llm-cxr-node",
    instance_number: int = 1,
    institution_name: str | None = None,
    document_title: str = DOCUMENT_TITLE,
) -> Dataset:
    """Wrap the draft report PDF in an Encapsulated PDF instance of the source's study.

    Parameters
    ----------
    pdf
        The PDF bytes (``%PDF-`` header), e.g. from
        :func:`integration.report_pdf.render_report_pdf`.
    source
        The image the model read (header is enough): Patient, General Study and Timezone
        Offset From UTC are copied from it and it is the Source Instance Sequence item.
    sop_instance_uid, series_instance_uid
        New UIDs chosen by the caller (e.g. derived from the content with
        :func:`integration.uids.deterministic_uid`); both differ from the source's.
    series_number, instance_number
        Series Number (0020,0011) and Instance Number (0020,0013).
    created_at
        When the draft was generated (timezone-aware): Content Date/Time, Acquisition
        DateTime, Series Date/Time and Instance Creation Date/Time, in the study's time zone
        when the source has a valid Timezone Offset From UTC, else in the host's local time
        (:func:`integration.draft_header.draft_local_time`).
    algorithm_name, algorithm_version
        The model, named in the Contributing Equipment Sequence (0018,A001).
    demo
        DEMO model: said in the Series Description and the contribution description.
    manufacturer, model_name, software_version
        General Equipment: Manufacturer (0008,0070), Manufacturer's Model Name (0008,1090)
        and Software Versions (0018,1020) of the node software that made the object.
    institution_name
        Institution Name (0008,0080), or ``None``.
    document_title
        Document Title (0042,0010), VR ST.

    Returns
    -------
    pydicom.dataset.Dataset
        The instance with its file meta, ready for ``save_as(..., enforce_file_format=True)``
        or C-STORE.

    Raises
    ------
    integration.errors.EncapsulatedPdfError
        Not a PDF, a source without Study Instance UID / SOP UIDs, invalid or reused UIDs,
        a naive ``created_at``, or labels longer than VR LO allows.
    """
    _check_inputs(
        pdf,
        source,
        uids={"SOP Instance UID": sop_instance_uid, "Series Instance UID": series_instance_uid},
        created_at=created_at,
        labels={
            "algorithm_name": algorithm_name,
            "algorithm_version": algorithm_version,
            "manufacturer": manufacturer,
            "model_name": model_name,
            "software_version": software_version,
        },
    )
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    _copy_patient_study(source, ds)
    set_utc_offset(ds, source)  # an offset no zone can be made of is not copied
    local = draft_local_time(created_at, source)
    day, clock = local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    attributes: dict[str, object] = {
        # SOP Common (C.12.1)
        "SOPClassUID": ENCAPSULATED_PDF_STORAGE,
        "SOPInstanceUID": sop_instance_uid,
        "InstanceCreationDate": day,
        "InstanceCreationTime": clock,
        # Encapsulated Document Series (C.24.1)
        "Modality": "DOC",
        "SeriesInstanceUID": series_instance_uid,
        "SeriesNumber": series_number,
        "SeriesDate": day,
        "SeriesTime": clock,
        "SeriesDescription": pdf_series_description(demo=demo),
        # General Equipment (C.7.5.1)
        "Manufacturer": manufacturer,
        "ManufacturerModelName": model_name,
        "SoftwareVersions": software_version,
    }
    if institution_name:
        attributes["InstitutionName"] = institution_name[:_MAX_LO]
    attributes["ConversionType"] = "WSD"  # SC Equipment (C.8.6.1): workstation
    attributes |= _document_attributes(pdf, source, instance_number, local, document_title)
    # the algorithm (PS3.3 C.12.1); the description says it is an unverified (DEMO) draft
    contribution = f"AI draft report generation ({'DEMO model, ' if demo else ''}not verified)"
    attributes["ContributingEquipmentSequence"] = [
        algorithm_equipment(
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
            manufacturer=manufacturer,
            institution_name=institution_name,
            description=contribution,
        )
    ]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta = _file_meta(sop_instance_uid)
    return ds


def extract_pdf(ds: Dataset) -> bytes:
    """The PDF inside an Encapsulated PDF instance, without the pad byte.

    Parameters
    ----------
    ds
        An Encapsulated PDF Storage instance.

    Returns
    -------
    bytes
        Encapsulated Document (0042,0011) cut to Encapsulated Document Length (0042,0015)
        when present, else with a trailing 0x00 pad removed.

    Raises
    ------
    integration.errors.EncapsulatedPdfError
        Not Encapsulated PDF Storage, no document, a wrong MIME type, or a length that
        does not fit the data.
    """
    if str(ds.get("SOPClassUID", "")) != ENCAPSULATED_PDF_STORAGE:
        raise EncapsulatedPdfError("not an Encapsulated PDF Storage instance")
    if str(ds.get("MIMETypeOfEncapsulatedDocument", "")) != "application/pdf":
        raise EncapsulatedPdfError("MIME Type of Encapsulated Document is not application/pdf")
    data = ds.get("EncapsulatedDocument")
    if not data:
        raise EncapsulatedPdfError("Encapsulated Document (0042,0011) is empty")
    raw = bytes(data)
    length = ds.get("EncapsulatedDocumentLength")
    if length is not None:
        if int(length) > len(raw) or len(raw) - int(length) > 1:
            raise EncapsulatedPdfError(
                f"Encapsulated Document Length {int(length)} does not fit {len(raw)} bytes"
            )
        return raw[: int(length)]
    return raw[:-1] if raw.endswith(b"\x00") and len(raw) % 2 == 0 else raw


def _check_inputs(
    pdf: bytes,
    source: Dataset,
    *,
    uids: dict[str, str],
    created_at: dt.datetime,
    labels: dict[str, str],
) -> None:
    """Reject what the instance cannot carry (see :func:`build_encapsulated_pdf`).

    Parameters
    ----------
    pdf
        The document.
    source
        The image read.
    uids
        ``{"SOP Instance UID": ..., "Series Instance UID": ...}`` of the new instance.
    created_at
        When the draft was generated.
    labels
        Name to value of the LO attributes given by the caller (PS3.5 6.2: 64 characters).

    Raises
    ------
    integration.errors.EncapsulatedPdfError
        In this order: not a PDF or too large for OB (PS3.5 7.1.1); a source without Study
        Instance UID, SOP Class/Instance UID or Series Instance UID; an invalid UID (PS3.5
        9.1); the source's Series or SOP Instance UID reused; a naive ``created_at``; an
        empty or too long label.
    """
    if not pdf.startswith(b"%PDF-"):
        raise EncapsulatedPdfError("Encapsulated Document (0042,0011): data is not a PDF")
    if len(pdf) >= 0xFFFFFFFE:  # OB value length limit (PS3.5 7.1.1)
        raise EncapsulatedPdfError("Encapsulated Document (0042,0011): PDF too large for OB")
    for keyword in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not str(source.get(keyword, "") or "").strip():
            raise EncapsulatedPdfError(f"source image has no {keyword}")
    for label, uid in uids.items():
        if not _is_uid(uid):
            raise EncapsulatedPdfError(f"{label} {uid!r} is not a valid UID")
    if uids["Series Instance UID"] == str(source.SeriesInstanceUID):
        raise EncapsulatedPdfError("the PDF needs its own series, not the image's")
    if uids["SOP Instance UID"] == str(source.SOPInstanceUID):
        raise EncapsulatedPdfError("SOP Instance UID must differ from the source image's")
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise EncapsulatedPdfError("created_at must be timezone-aware")
    for label, value in labels.items():
        if not value or not value.strip():
            raise EncapsulatedPdfError(f"{label} must not be empty")
        if len(value) > _MAX_LO:
            raise EncapsulatedPdfError(f"{label} longer than {_MAX_LO} characters (VR LO)")


def _document_attributes(
    pdf: bytes, source: Dataset, instance_number: int, local: dt.datetime, title: str
) -> dict[str, object]:
    """The Encapsulated Document module (PS3.3 C.24.2) but Contributing Equipment.

    Returns
    -------
    dict
        Keyword to value, in module order: Instance Number, Content Date/Time and
        Acquisition DateTime (``local``), Burned In Annotation ``YES``, Document Title,
        Concept Name Code Sequence (:data:`DOCUMENT_CONCEPT`), Verification Flag
        ``UNVERIFIED``, Source Instance Sequence (``source``), MIME Type, the document
        padded to even length with one 0x00 (PS3.5 7.1.1) and its unpadded length.
    """
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = DOCUMENT_CONCEPT
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return {
        "InstanceNumber": instance_number,
        "ContentDate": local.strftime("%Y%m%d"),
        "ContentTime": local.strftime("%H%M%S"),
        "AcquisitionDateTime": local.strftime("%Y%m%d%H%M%S%z"),
        "BurnedInAnnotation": "YES",
        "DocumentTitle": title,
        "ConceptNameCodeSequence": [concept],
        "VerificationFlag": "UNVERIFIED",
        "SourceInstanceSequence": [reference],
        "MIMETypeOfEncapsulatedDocument": "application/pdf",
        "EncapsulatedDocument": pdf + (b"\x00" if len(pdf) % 2 else b""),
        "EncapsulatedDocumentLength": len(pdf),
    }


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    """File Meta Information (PS3.10 7.1): Explicit VR Little Endian, pydicom's class UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy Patient/General Study attributes, decoded from the source's character set.

    A JSON round trip decodes every text value (also inside sequences) with the source's
    Specific Character Set, so the target re-encodes them as UTF-8 instead of writing the
    source's raw bytes under a different character set.
    """
    subset = Dataset()
    subset.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 6")
    for keyword in _PATIENT_STUDY:
        if keyword in source:
            subset[keyword] = source[keyword]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns quoting values it finds odd
        try:
            decoded = Dataset.from_json(subset.to_json_dict())
        except Exception:
            # the exception text may quote a patient attribute value: do not chain it
            raise EncapsulatedPdfError(
                "a Patient/Study attribute of the source cannot be decoded"
            ) from None
    for keyword in _PATIENT_STUDY:
        if keyword in decoded:
            target[keyword] = decoded[keyword]
        elif keyword in _TYPE2:
            setattr(target, keyword, "")


def _is_uid(value: str) -> bool:
    """A valid UID (PS3.5 9.1): <= 64 characters, dot-separated numbers without leading 0."""
    return (
        len(value) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", value) is not None
    )
