"""Builders of what a radiologist's reporting system sends back: a TID 2000 SR (highdicom)
and an ORU^R01 (hl7apy). Shared by the integration tests and the node's intake tests."""

from __future__ import annotations

import highdicom as hd
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from tests.reporting.conftest import ACCESSION, FILLER, PATIENT_NAME

__all__ = ["FINAL_FINDINGS", "FINAL_IMPRESSION", "STUDY_UID", "final_sr", "oru"]

FINAL_FINDINGS = "The lungs are clear. No pleural effusion."
FINAL_IMPRESSION = "No acute cardiopulmonary disease."
STUDY_UID = "1.2.826.0.1.3680043.8.498.12345"


def _heading(code: Code, *children: hd.sr.ContentItem) -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(
        name=code, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence(list(children))
    return item


def _text(code: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=code, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def final_sr(source: Dataset, *, verified: bool = True) -> Dataset:
    """A radiologist's TID 2000 report: person observer, Findings (text and a coded
    finding) and Impressions headings with DCM codes, verified (or not) by a person."""
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name="Radiologist^Rita"
        ),
    )
    pneumothorax = hd.sr.CodeContentItem(
        name=codes.DCM.Finding,
        value=Code("36118008", "SCT", "Pneumothorax absent"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    findings = _heading(
        Code("121070", "DCM", "Findings"), _text(codes.DCM.Finding, FINAL_FINDINGS), pneumothorax
    )
    impression = _heading(
        Code("121072", "DCM", "Impressions"), _text(codes.DCM.Impression, FINAL_IMPRESSION)
    )
    root.ContentSequence = hd.sr.ContentSequence([*observer, findings, impression])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Reporting Vendor",
        is_complete=True,
        is_final=verified,
        is_verified=verified,
        verifying_observer_name="Radiologist^Rita" if verified else None,
        verifying_organization="Radiology" if verified else None,
        series_description="Radiology report",
    )
    sr.TimezoneOffsetFromUTC = "+0200"
    sr.ContentDate, sr.ContentTime = DA("20240507"), TM("091500")
    if verified:
        sr.VerifyingObserverSequence[0].VerificationDateTime = "20240507093000"
    return sr


def oru(
    *,
    status: str = "F",
    zds: bool = True,
    accession: str = ACCESSION,
    control: str = "RIS-0001",
    message_type: str = "ORU^R01^ORU_R01",
    observations: list[tuple[str, str, str]] | None = None,
    report_time: str = "20240507093000+0200",
) -> str:
    """An ORU^R01 as a RIS sends the signed report, built with hl7apy (STRICT)."""
    msg = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3, msh.msh_4, msh.msh_5, msh.msh_6 = "RIS", "RADIOLOGY", "CXR-NODE", "NODE"
    msh.msh_7 = "20240507093100+0200"
    msh.msh_9 = message_type
    msh.msh_10 = control
    msh.msh_11 = "P"
    msh.msh_12 = "2.5.1"
    msh.msh_18 = "UNICODE UTF-8"
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_3 = "PAT-123^^^HOSP"
    pid.pid_5 = PATIENT_NAME
    pid.pid_7 = "19510314"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.add_segment("ORC").orc_1 = "RE"
    obr = order.add_segment("OBR")
    obr.obr_1, obr.obr_3, obr.obr_4 = "1", FILLER, "36643-5^XR Chest 2V^LN"
    if accession:
        obr.obr_18 = accession
    if report_time:
        obr.obr_22 = report_time
    obr.obr_24, obr.obr_25 = "RAD", status
    if observations is None:
        observations = [
            ("TX", "59776-5^Findings^LN", FINAL_FINDINGS),
            ("TX", "59776-5^Findings^LN", "Heart size is normal."),
            ("TX", "19005-8^Impression^LN", FINAL_IMPRESSION),
        ]
    for set_id, (value_type, code, value) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1, obx.obx_2, obx.obx_3, obx.obx_4 = str(set_id), value_type, code, "1"
        obx.obx_5, obx.obx_11 = value, status
    assert msg.validate() is True
    er7 = str(msg.to_er7())
    if zds:  # IHE RAD: ZDS after the OBR (hl7apy's structure has no place for it)
        segment = Segment("ZDS", version="2.5.1")
        segment.zds_1 = f"{STUDY_UID}^RIS^Application^DICOM"
        er7 = er7.replace("\rOBX|1|", f"\r{segment.to_er7()}\rOBX|1|", 1)
    return er7
