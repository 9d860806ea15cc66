"""The model's interactive tasks through a running API, with the real demo bundle."""

from __future__ import annotations

import shutil
import stat
import subprocess
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from models.layout import CODES_PER_IMAGE, N_IMAGE_CODES
from models.preprocess import to_uint8_image
from node.db.models import Delivery, DeliveryObject, DeliveryState
from node.runtime.delivery import DeliveryComponent
from node.runtime.modelhost import ModelHost
from node.runtime.service import NodeContext
from tests.api.conftest import ApiEnv, EnvFactory
from tests.helpers import free_port, require_binary, rg1_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_vqa_on_a_stored_study(env: ApiEnv) -> None:
    done = env.seed("done")
    queued = env.seed("queued")  # no image selected yet: chosen now (PA)
    with env.client("operator") as c:
        r = c.post(f"/api/studies/{done.study_uid}/vqa", json={"question": "Is there effusion?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["answer"], str)
        assert body["sop_instance_uid"] == done.sop_uid
        assert body["image_choice"] == "selected by job"
        assert body["demo"] is True and body["timings"]["encode_s"] > 0
        r = c.post(f"/api/studies/{queued.study_uid}/vqa", json={"question": "Heart size?"})
        assert r.status_code == 200 and r.json()["image_choice"] == "selected now"
        r = c.post(
            f"/api/studies/{done.study_uid}/vqa",
            json={"question": "Any line?", "sop_instance_uid": queued.sop_uid},
        )
        assert r.status_code == 404
        r = c.post("/api/studies/1.2.3.4/vqa", json={"question": "Heart size?"})
        assert r.status_code == 404 and "1.2.3.4" in r.json()["detail"]
        assert (
            c.post(f"/api/studies/{done.study_uid}/vqa", json={"question": ""}).status_code == 422
        )
    audit = env.audit("model.vqa")
    assert [a.target for a in audit] == [f"study:{done.study_uid}", f"study:{queued.study_uid}"]
    assert all("Is there" not in str(a.detail) for a in audit)  # the question is not kept
    lateral = env.seed("queued", view="LL")
    with env.client("operator") as c:
        r = c.post(f"/api/studies/{lateral.study_uid}/vqa", json={"question": "Heart size?"})
        assert r.status_code == 422 and "frontal" in r.json()["detail"]


def test_report_for_an_uploaded_dicom(env: ApiEnv) -> None:
    data = rg1_file().read_bytes()
    sop = str(dcmread(rg1_file(), stop_before_pixels=True).SOPInstanceUID)
    with env.client("operator") as c:
        r = c.post("/api/report", files={"file": ("rg1.dcm", data, "application/dicom")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["text"], str) and body["sent"] is False
        assert body["sop_instance_uid"] == sop
        assert body["timings"]["tokens"] >= 1
        r = c.post("/api/report", files={"file": ("x.dcm", b"not dicom at all", "text/plain")})
        assert r.status_code == 422 and "DICOM" in r.json()["detail"]
        assert c.post("/api/report").status_code == 422
    assert env.audit("model.report")[-1].target == f"sop:{sop}"
    with env.client("viewer") as c:
        r = c.post("/api/report", files={"file": ("rg1.dcm", data, "application/dicom")})
        assert r.status_code == 403


def _codes(header: str) -> list[int]:
    return [int(x) for x in header.split(",")]


def test_generate_png_from_exactly_256_codes(env: ApiEnv, model_host: ModelHost) -> None:
    with env.client("operator") as c:
        r = c.post("/api/generate-image", json={"report": "Small left pleural effusion."})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    codes = _codes(r.headers["x-image-codes"])
    assert len(codes) == CODES_PER_IMAGE
    assert all(0 <= c < N_IMAGE_CODES for c in codes)
    img = Image.open(BytesIO(r.content))
    assert img.size == (256, 256) and img.mode == "L"
    # the PNG is the VQ-GAN decoding of exactly those 256 codes
    with model_host.use() as runtime:
        decoded = runtime.image_tokenizer.decode(np.asarray([codes], dtype=np.int64))[0]
    assert np.array_equal(np.asarray(img), to_uint8_image(decoded))
    audit = env.audit("model.generate_image")
    assert audit[-1].detail == {"format": "png", "codes": 256}


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = require_binary("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_generate_secondary_capture(env: ApiEnv, tmp_path: Path) -> None:
    with env.client("operator") as c:
        r = c.post(
            "/api/generate-image", params={"format": "dicom"}, json={"report": "Normal chest."}
        )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    path = tmp_path / "sc.dcm"
    path.write_bytes(r.content)
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.SOPInstanceUID == r.headers["x-sop-instance-uid"]
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.ConversionType == "SYN"
    assert ds.SeriesDescription.startswith("SYNTHETIC - generated by AI")
    assert ds.BurnedInAnnotation == "NO"
    assert (ds.Rows, ds.Columns) == (256, 256)
    assert len(_codes(r.headers["x-image-codes"])) == 256
    assert "x-sent-to" not in r.headers
    assert _dciodvfy_errors(path) == []
    # joined to a stored study when asked: same Study Instance UID, new series
    seeded = env.seed("done")
    with env.client("operator") as c:
        r = c.post(
            "/api/generate-image",
            params={"format": "dicom"},
            json={"report": "Normal chest.", "study_uid": seeded.study_uid},
        )
    joined = dcmread(BytesIO(r.content))
    assert joined.StudyInstanceUID == seeded.study_uid
    assert (
        joined.SeriesInstanceUID != dcmread(rg1_file(), stop_before_pixels=True).SeriesInstanceUID
    )
    (tmp_path / "joined.dcm").write_bytes(r.content)
    assert _dciodvfy_errors(tmp_path / "joined.dcm") == []


def test_never_sent_unless_asked_for_a_configured_destination(make_env: EnvFactory) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

    received: list[Dataset] = []
    port = free_port()

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="TESTPACS")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        env = make_env(destinations=f"TESTPACS@127.0.0.1:{port}")
        with env.client("operator") as c:
            r = c.post("/api/generate-image", json={"report": "Normal.", "send": True})
            assert r.status_code == 422 and "destination" in r.json()["detail"]
            r = c.post(
                "/api/generate-image",
                json={"report": "Normal.", "send": True, "destination": "OTHER@h:1"},
            )
            assert r.status_code == 422
            assert "not a configured DICOM destination" in r.json()["detail"]
            r = c.post("/api/generate-image", params={"format": "dicom"}, json={"report": "Hi."})
            assert r.status_code == 200
            assert received == []  # generated, never sent
            r = c.post(
                "/api/generate-image",
                json={"report": "Normal.", "send": True, "destination": "TESTPACS"},
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-queued-to"] == f"TESTPACS@127.0.0.1:{port}"
            delivery_id = int(r.headers["x-delivery-id"])
        assert received == []  # queued: the delivery worker sends it, with its retries
        sender = DeliveryComponent(
            NodeContext(env.settings, env.engine, env.sessions, "test-sender", threading.Event())
        )
        try:
            [outcome] = sender.run_once()
        finally:
            sender.stop()
        assert (outcome.delivery_id, outcome.state) == (delivery_id, "sent")
        assert len(received) == 1
        assert received[0].ConversionType == "SYN"
        with env.sessions() as s:
            row = s.get(Delivery, delivery_id)
            assert row is not None
            assert (row.job_id, row.object, row.state) == (
                None,
                DeliveryObject.sc,
                DeliveryState.sent,
            )
            assert stat.S_IMODE((env.settings.spool_dir / str(row.sr_path)).stat().st_mode) == 0o600
        sent = env.audit("image.send")
        assert len(sent) == 1 and sent[0].actor == env.actor("operator")
        assert sent[0].detail == {
            "destination": f"TESTPACS@127.0.0.1:{port}",
            "synthetic": True,
            "delivery": delivery_id,
        }
    finally:
        assert server is not None
        server.shutdown()


def test_model_tasks_without_a_model_answer_503(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    with env.client("operator") as c:
        r = c.post("/api/generate-image", json={"report": "Normal."})
        assert r.status_code == 503 and "model" in r.json()["detail"]
    with env.client("viewer") as c:
        r = c.get("/ready")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["model"]["ok"] is False and checks["model"]["reason"]
        assert checks["database"]["ok"] is True and checks["spool"]["ok"] is True


def test_ready_and_spool_check(env: ApiEnv) -> None:
    with env.client("viewer") as c:
        r = c.get("/ready")
        assert r.status_code == 200, r.text
        model = r.json()["checks"]["model"]
        assert model["demo"] is True and model["backend"] == "transformers"
        assert model["engine_version"].startswith("transformers ")
        shutil.rmtree(env.settings.spool_dir)
        r = c.get("/ready")
        assert r.status_code == 503
        assert "spool_dir" in r.json()["checks"]["spool"]["reason"]


def test_metrics(env: ApiEnv) -> None:
    from node import metrics

    env.seed("queued")
    env.seed("queued")
    env.seed("failed")
    metrics.count_instance()
    metrics.observe_stage("encode", 0.25)
    metrics.count_delivery_failure("dimse", transient=True)
    with env.client("operator") as c:
        assert c.post("/api/generate-image", json={"report": "Normal."}).status_code == 200
    with env.client("viewer") as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    text = r.text
    for name in (
        "cxr_instances_received_total",
        "cxr_stage_duration_seconds_bucket",
        "cxr_delivery_failures_total",
        "cxr_model_tokens_per_second",
        "cxr_jobs",
        "cxr_queue_depth",
        "cxr_deliveries",
    ):
        assert f"\n{name}" in text, name
    assert 'cxr_jobs{state="queued"} 2.0' in text
    assert 'cxr_jobs{state="failed"} 1.0' in text
    assert "cxr_queue_depth 2.0" in text
    assert 'cxr_model_tokens_per_second{task="image"}' in text
    assert 'cxr_stage_duration_seconds_count{stage="encode"}' in text


def test_concurrent_model_calls_share_the_host(env: ApiEnv) -> None:
    results: list[int] = []

    def call() -> None:
        with env.client("operator") as c:
            results.append(c.post("/api/generate-image", json={"report": "Normal."}).status_code)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
