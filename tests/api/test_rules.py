"""``GET /api/rules`` and ``POST /api/rules/dry-run`` (stored study or uploaded header)."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.api.conftest import EnvFactory

PACS = "PACS@127.0.0.1:11104"


def test_rules_default_and_roles(make_env: EnvFactory) -> None:
    env = make_env(model=False)
    with env.client("viewer") as c:
        r = c.get("/api/rules")
        assert r.status_code == 200
        body = r.json()
        assert body["default"] is True and [x["name"] for x in body["rules"]] == ["chest"]
        assert body["rules"][0]["when"][0] == {"attribute": "Modality", "equals": ["CR", "DX"]}
        assert body["attributes"]["Modality"] == "(0008,0060)"
        assert c.post("/api/rules/dry-run", json={"study_uid": "1.2.3"}).status_code == 403
    with env.client() as c:
        assert c.get("/api/rules").status_code == 401


def test_dry_run_of_a_stored_study(make_env: EnvFactory, caplog: pytest.LogCaptureFixture) -> None:
    env = make_env(model=False)
    seeded = env.seed("received")
    caplog.set_level(logging.DEBUG)
    with env.client("operator") as c:
        r = c.post("/api/rules/dry-run", json={"study_uid": seeded.study_uid})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["draft"] is True and d["rule"] == "chest" and d["source"] == "study"
        assert d["destinations"] is None and d["series"] == 1
        [res] = d["results"]
        assert res["matched"] and "Modality CR is one of CR, DX" in res["explanation"]
        assert c.post("/api/rules/dry-run", json={"study_uid": "1.2.999"}).status_code == 404
        assert c.post("/api/rules/dry-run", json={"study_uid": "x"}).status_code == 422
        assert c.post("/api/rules/dry-run", json={"uid": "1.2"}).status_code == 422
        assert (
            c.post(
                "/api/rules/dry-run", content=b"x", headers={"Content-Type": "text/plain"}
            ).status_code
            == 415
        )
    # nothing changed: the job is still received
    assert env.job(seeded.job_id).state.value == "received"
    ds = dcmread(BytesIO(env.template))
    for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
        if value:
            assert value not in caplog.text


def test_dry_run_of_an_uploaded_header_with_a_rules_file(
    make_env: EnvFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        """
[[rules]]
name = "ed"
when = [{ attribute = "CallingAETitle", glob = "ED*" }, { attribute = "Modality", equals = "CR" }]
priority = 90
destinations = ["PACS"]

[[rules]]
name = "chest"
preset = "chest"
""",
        encoding="utf-8",
    )
    env = make_env(model=False, routing_rules_file=rules, destinations=PACS)
    ds = dcmread(BytesIO(env.template))
    ds.BodyPartExamined = "KNEE"
    ds.StudyDescription = "SMITH KNEE"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    with env.client("operator") as c:
        body = c.get("/api/rules").json()
        assert body["default"] is False and body["rules"][0]["destinations"] == [PACS]
        r = c.post(
            "/api/rules/dry-run", files={"file": ("a.dcm", data)}, data={"calling_ae": "ED_1"}
        )
        assert r.status_code == 200, r.text
        d = r.json()
        assert (d["rule"], d["priority"], d["destinations"]) == ("ed", 90, [PACS])
        r = c.post("/api/rules/dry-run", files={"file": ("a.dcm", data)})
        d = r.json()
        assert d["draft"] is False and d["rule"] is None
        assert "BodyPartExamined KNEE" in d["reason"] and "SMITH" not in d["reason"]
        assert [x["rule"] for x in d["results"]] == ["ed", "chest"]
        bad = c.post("/api/rules/dry-run", files={"file": ("a.dcm", b"not dicom")})
        assert bad.status_code == 422
        # a form without the file: urlencoded is not a multipart upload
        assert c.post("/api/rules/dry-run", data={"calling_ae": "X"}).status_code == 415
