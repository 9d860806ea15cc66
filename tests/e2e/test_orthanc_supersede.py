"""A real Orthanc with default settings (``OverwriteInstances`` false) as the PACS (#24).

Orthanc forwards the RG1 chest CR to ``cxr-node serve`` (demo bundle), which sends back the
Comprehensive SR and the AI DRAFT Encapsulated PDF into the same study. A late lateral
image of the study follows: the node drafts again and sends a second SR with a new SOP
Instance UID whose Predecessor Documents Sequence references the first; Orthanc keeps
both. ``cxr-node jobs withdraw`` of the second then sends the IHE IOCM rejection notes (Key
Object Selection) naming the second SR and PDF, and the first's, which it superseded.
dciodvfy finds no error in the SR, PDF and KOS as Orthanc stored them.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)

from tests.dicom.orthanc import OrthancServer
from tests.e2e.conftest import NodeProcess
from tests.helpers import free_port, require_binary, rg1_file

NODE_AE = "LLMCXR"


def _by_class(orthanc: OrthancServer, study_uid: str) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for tags in orthanc.study_instances(study_uid):
        instance = orthanc.find_instance(str(tags["SOPInstanceUID"]))
        assert instance is not None
        ds = pydicom.dcmread(io.BytesIO(orthanc.file_bytes(instance)))
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def _wait(
    orthanc: OrthancServer,
    study_uid: str,
    node: NodeProcess,
    done: Callable[[dict[str, list[Dataset]]], bool],
    timeout: float = 300,
) -> dict[str, list[Dataset]]:
    deadline = time.monotonic() + timeout
    found: dict[str, list[Dataset]] = {}
    while time.monotonic() < deadline:
        found = _by_class(orthanc, study_uid)
        if done(found):
            return found
        if node.proc.poll() is not None:
            pytest.fail(f"the node exited ({node.proc.returncode}):\n{node.log_tail()}")
        time.sleep(0.5)
    pytest.fail(
        f"Orthanc holds { ({k: len(v) for k, v in found.items()}) } after {timeout} s; "
        f"jobs: {node.jobs()}\nnode log:\n{node.log_tail()}"
    )


def _dciodvfy_errors(ds: Dataset, tmp: Path) -> list[str]:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        [require_binary("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def _referenced(ds: Dataset, keyword: str) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    }


@pytest.mark.integration
@pytest.mark.slow
def test_late_instance_supersedes_and_withdrawal_reaches_orthanc(
    tmp_path: Path, demo_bundle: Path, start_node: Callable[..., NodeProcess]
) -> None:
    source_path = rg1_file("RG1_UNCR.dcm")
    frontal = pydicom.dcmread(source_path)
    study_uid = str(frontal.StudyInstanceUID)
    lateral = pydicom.dcmread(source_path)
    lateral.SeriesInstanceUID = generate_uid()
    lateral.SOPInstanceUID = generate_uid()
    lateral.file_meta.MediaStorageSOPInstanceUID = lateral.SOPInstanceUID
    lateral.ViewPosition = "LL"
    lateral.SeriesNumber = 2
    lateral_path = tmp_path / "lateral.dcm"
    lateral.save_as(lateral_path, enforce_file_format=True)

    node_port = free_port()
    with OrthancServer(
        tmp_path / "orthanc", modalities={"NODE": (NODE_AE, "127.0.0.1", node_port)}
    ) as orthanc:
        pacs = {
            "kind": "dimse",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "objects": ["sr", "pdf"],
        }
        node = start_node(
            {
                "CXR_NODE_AE_TITLE": NODE_AE,
                "CXR_NODE_MODEL_DIR": str(demo_bundle),
                "CXR_NODE_DESTINATIONS": json.dumps([pacs]),
                "CXR_NODE_ALLOWED_AES": orthanc.aet,
                "CXR_NODE_STUDY_QUIET_SECONDS": "1",
                "CXR_NODE_API_ENABLED": "false",
                "CXR_NODE_DELIVERY_BACKOFF_SECONDS": "0.5",
                "CXR_NODE_GENERATION_MAX_NEW_TOKENS": "32",
            },
            port=node_port,
        )
        answer = orthanc.send_to_modality("NODE", [orthanc.upload(source_path)])
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        first = _wait(
            orthanc,
            study_uid,
            node,
            lambda f: bool(f.get(ComprehensiveSRStorage) and f.get(EncapsulatedPDFStorage)),
        )
        [sr1] = first[ComprehensiveSRStorage]
        [pdf1] = first[EncapsulatedPDFStorage]
        assert sr1.StudyInstanceUID == pdf1.StudyInstanceUID == study_uid
        assert sr1.SeriesInstanceUID != pdf1.SeriesInstanceUID
        assert str(pdf1.SeriesDescription).startswith("AI DRAFT UNVERIFIED")
        assert bytes(pdf1.EncapsulatedDocument).startswith(b"%PDF-")

        # a late instance: a second draft, a new SR that supersedes the first; both kept
        answer = orthanc.send_to_modality("NODE", [orthanc.upload(lateral_path)])
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        second = _wait(
            orthanc, study_uid, node, lambda f: len(f.get(ComprehensiveSRStorage, [])) == 2
        )
        sr2 = next(
            ds for ds in second[ComprehensiveSRStorage] if ds.SOPInstanceUID != sr1.SOPInstanceUID
        )
        assert _referenced(sr2, "PredecessorDocumentsSequence") == {str(sr1.SOPInstanceUID)}
        assert _referenced(sr2, "CurrentRequestedProcedureEvidenceSequence") == {
            str(frontal.SOPInstanceUID),
            str(lateral.SOPInstanceUID),
        }
        jobs = sorted(
            (j for j in node.jobs() if j["study_uid"] == study_uid), key=lambda j: j["id"]
        )
        assert [j["state"] for j in jobs] == ["done", "done"]
        assert jobs[1]["sr_uid"] == sr2.SOPInstanceUID
        pdf2 = _wait(
            orthanc, study_uid, node, lambda f: len(f.get(EncapsulatedPDFStorage, [])) == 2
        )[EncapsulatedPDFStorage]
        pdf2_uid = next(
            str(d.SOPInstanceUID) for d in pdf2 if d.SOPInstanceUID != pdf1.SOPInstanceUID
        )

        # withdraw the second, current draft: a rejection note of its SR and PDF reaches
        # Orthanc, and one of the first draft's, which it superseded and which would
        # otherwise be the study's visible AI draft again
        out = node.cli("jobs", "withdraw", str(jobs[1]["id"]), "--reason", "wrong laterality")
        assert "1 withdrawal(s) queued" in out, out
        assert f"the earlier draft it superseded: job(s) {jobs[0]['id']};" in out, out
        final = _wait(
            orthanc,
            study_uid,
            node,
            lambda f: len(f.get(KeyObjectSelectionDocumentStorage, [])) == 2,
        )
        rejected = sorted(
            (
                _referenced(kos, "CurrentRequestedProcedureEvidenceSequence")
                for kos in final[KeyObjectSelectionDocumentStorage]
            ),
            key=lambda uids: str(sr1.SOPInstanceUID) in uids,
        )
        assert rejected == [
            {str(sr2.SOPInstanceUID), pdf2_uid},
            {str(sr1.SOPInstanceUID), str(pdf1.SOPInstanceUID)},
        ]
        shown = json.loads(node.cli("jobs", "show", str(jobs[1]["id"]), "--json"))
        assert shown["job"]["withdrawn_reason"] == "wrong laterality"
        # the study's chain: the first SR superseded by the second, both withdrawn
        chain = [(v["sr_uid"], v["superseded"], bool(v["withdrawn_at"])) for v in shown["sr_chain"]]
        assert chain == [(sr1.SOPInstanceUID, True, True), (sr2.SOPInstanceUID, False, True)]

        for ds in (sr1, sr2, pdf1, *final[KeyObjectSelectionDocumentStorage]):
            assert _dciodvfy_errors(ds, tmp_path) == [], ds.SOPClassUID
        assert node.stop() == 0
