"""End to end with a real Orthanc (issue 4): the RG1 chest CR is stored into Orthanc, Orthanc
C-STOREs it to the node (``POST /modalities/NODE/store``, as an auto-route does), and the node
(``cxr-node serve`` with the demo bundle) returns a draft SR that the test finds in Orthanc in
the same study, with the right text, flags, evidence and series description."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from integration.sr import DEMO_NOTE
from node.db.models import Delivery, DeliveryState, Draft
from tests.dicom.orthanc import OrthancServer
from tests.e2e.conftest import NodeProcess
from tests.helpers import free_port, rg1_file

NODE_AE = "LLMCXR"
SR_MODALITY = "SR"


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _texts(ds: Dataset) -> dict[str, list[str]]:
    """TEXT content items by concept name (PS3.3 C.17.3)."""
    out: dict[str, list[str]] = {}
    for item in _walk(ds.get("ContentSequence", [])):
        if item.get("ValueType") == "TEXT":
            name = str(item.ConceptNameCodeSequence[0].CodeMeaning)
            out.setdefault(name, []).append(str(item.TextValue))
    return out


def _evidence_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs in Current Requested Procedure Evidence Sequence (0040,A375)."""
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    }


def _wait_for_sr(
    orthanc: OrthancServer, study_uid: str, node: NodeProcess, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        srs = [t for t in orthanc.study_instances(study_uid) if t.get("Modality") == SR_MODALITY]
        if srs:
            return srs[0]
        if node.proc.poll() is not None:
            pytest.fail(f"the node exited ({node.proc.returncode}):\n{node.log_tail()}")
        time.sleep(0.25)
    jobs = node.jobs()
    pytest.fail(
        f"no SR in Orthanc for study {study_uid} after {timeout} s; jobs: {jobs}\n"
        f"node log:\n{node.log_tail()}\nOrthanc log:\n{orthanc.log_tail(1500)}"
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("source_name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_orthanc_forwards_a_chest_cr_and_receives_the_draft_sr(
    source_name: str,
    tmp_path: Path,
    demo_bundle: Path,
    start_node: Callable[..., NodeProcess],
) -> None:
    source_path = rg1_file(source_name)
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    study_uid = str(source.StudyInstanceUID)
    node_port = free_port()
    with OrthancServer(
        tmp_path / "orthanc", modalities={"NODE": (NODE_AE, "127.0.0.1", node_port)}
    ) as orthanc:
        node = start_node(
            {
                "CXR_NODE_AE_TITLE": NODE_AE,
                "CXR_NODE_MODEL_DIR": str(demo_bundle),
                "CXR_NODE_DESTINATIONS": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                "CXR_NODE_ALLOWED_AES": orthanc.aet,
                "CXR_NODE_STUDY_QUIET_SECONDS": "1",
                "CXR_NODE_API_ENABLED": "false",
                "CXR_NODE_DELIVERY_BACKOFF_SECONDS": "0.5",
                "CXR_NODE_GENERATION_MAX_NEW_TOKENS": "48",
                "CXR_NODE_LOG_LEVEL": "INFO",
            },
            port=node_port,
        )
        source_id = orthanc.upload(source_path)
        t0 = time.monotonic()
        answer = orthanc.send_to_modality("NODE", [source_id])
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        tags = _wait_for_sr(orthanc, study_uid, node, timeout=300)
        latency = time.monotonic() - t0
        print(f"\n{source_name}: study forwarded -> SR stored in Orthanc in {latency:.1f} s")

        sr_uid = str(tags["SOPInstanceUID"])
        sr = pydicom.dcmread(io.BytesIO(orthanc.file_bytes(orthanc.find_instance(sr_uid) or "")))
        # same study and patient as the source, labelled as an unverified AI draft
        assert sr.StudyInstanceUID == study_uid
        assert sr.PatientID == source.PatientID
        assert sr.CompletionFlag == "PARTIAL"
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.PreliminaryFlag == "PRELIMINARY"
        assert "AI DRAFT" in sr.SeriesDescription.upper()
        assert sr.SeriesDescription.startswith("AI DRAFT UNVERIFIED")
        assert _evidence_uids(sr) == {str(source.SOPInstanceUID)}
        texts = _texts(sr)
        assert DEMO_NOTE in texts.get("Summary", [])

        # the node's records: the job is done with this SR, the delivery sent
        jobs = [j for j in node.jobs() if j["study_uid"] == study_uid]
        assert len(jobs) == 1, jobs
        job = jobs[0]
        assert job["state"] == "done" and job["sr_uid"] == sr_uid and job["attempts"] == 1
        engine = create_engine(node.env["CXR_NODE_DATABASE_URL"])
        try:
            with Session(engine) as s:
                drafts = list(s.scalars(select(Draft).where(Draft.job_id == job["id"])))
                deliveries = list(s.scalars(select(Delivery).where(Delivery.job_id == job["id"])))
        finally:
            engine.dispose()
        assert len(drafts) == 1 and drafts[0].demo
        draft = drafts[0]
        # the SR carries the draft stored in SQL, word for word
        assert texts.get("Impression") == [draft.impression]
        if draft.findings:
            assert texts.get("Finding") == [draft.findings]
        assert [(d.destination, d.state) for d in deliveries] == [
            (f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", DeliveryState.sent)
        ]
        # exactly one SR in the study: the source and the draft
        study = orthanc.study_instances(study_uid)
        assert sorted(t["Modality"] for t in study) == sorted([source.Modality, SR_MODALITY])
        assert node.stop() == 0
