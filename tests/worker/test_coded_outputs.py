"""The draft's CheXpert observations as codes (#25 item 5): positive findings coded in the
draft SR (TID 2002 CODE items), and the ``coded-sr`` object (TID 1500, all mentioned
observations with presence) for DICOM destinations that ask for it. Checked with dciodvfy
and DCMTK's dsrdump; no model runs (the draft text is given)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pydicom

from integration.coded_findings import OBSERVATION_CODES, PRESENCE
from node.db.models import DeliveryObject
from node.runtime.draft_objects import DraftText, draft_ids, draft_sr
from node.runtime.output_files import write_output
from node.runtime.outputs import build_outputs
from node.settings import load_settings
from tests.helpers import require_binary, rg1_file
from tests.reporting.conftest import dciodvfy_errors

TEXT = DraftText(
    findings="Large right pneumothorax. No pleural effusion.",
    impression="Right pneumothorax.",
    model_name="LLM-CXR-DEMO",
    model_version="demo-1",
    demo=True,
    created_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
)


def _codes(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """(concept name code, value code) of every CODE item in the content tree."""
    out = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "CODE":
                name = item.ConceptNameCodeSequence[0].CodeValue
                out.append((str(name), str(item.ConceptCodeSequence[0].CodeValue)))
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return out


def test_coded_findings_in_sr_and_as_own_object(tmp_path: Path) -> None:
    text = TEXT
    image = pydicom.dcmread(rg1_file())
    assert text.labels["pneumothorax"] == "positive"
    assert text.labels["pleural_effusion"] == "negative"
    ids = draft_ids(
        "sr",
        str(image.StudyInstanceUID),
        text.model_name,
        text.model_version,
        inputs=[str(image.SOPInstanceUID)],
        text=text.as_sent,
    )
    sr = draft_sr(text, ids, evidence=[image], image_read=image)
    # the draft SR codes the positive observation only (121071 Finding = Pneumothorax)
    ptx = OBSERVATION_CODES["pneumothorax"][0].value
    effusion = OBSERVATION_CODES["pleural_effusion"][0].value
    assert ("121071", ptx) in _codes(sr)
    assert all(value != effusion for _name, value in _codes(sr))
    outputs = tmp_path / "spool" / "outputs"
    sr_path = write_output(sr, outputs, f"{sr.SOPInstanceUID}.dcm")
    dest = {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}
    settings = load_settings(
        None,
        spool_dir=tmp_path / "spool",
        destinations=json.dumps([{**dest, "objects": ["sr", "coded-sr"]}]),
    )
    items = build_outputs(
        settings, outputs, sr=sr, sr_path=sr_path, image_read=image, evidence=[image], text=text
    )
    assert [i.object for i in items] == [DeliveryObject.sr, DeliveryObject.coded_sr]
    coded_path = tmp_path / "spool" / items[1].path
    coded = pydicom.dcmread(coded_path)
    assert str(coded.SeriesDescription).startswith("AI DRAFT UNVERIFIED - coded findings")
    assert coded.VerificationFlag == "UNVERIFIED" and coded.CompletionFlag == "PARTIAL"
    pairs = _codes(coded)
    assert (ptx, PRESENCE["positive"].value) in pairs
    assert (effusion, PRESENCE["negative"].value) in pairs
    errors, warnings = dciodvfy_errors(coded_path)
    assert errors == [] and warnings == []
    dsrdump = require_binary("dsrdump")
    assert subprocess.run([dsrdump, str(coded_path)], capture_output=True).returncode == 0
    # built again from the same draft: the same object (deterministic UIDs, written once)
    again = build_outputs(
        settings, outputs, sr=sr, sr_path=sr_path, image_read=image, evidence=[image], text=text
    )
    assert again[1].object_uid == items[1].object_uid
