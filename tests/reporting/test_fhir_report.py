"""FHIR R4 DiagnosticReport bundle and sender (integration.fhir_report).

The receiver is :func:`tests.receivers.fhir_server`: a real ``http.server`` on loopback that
validates what it gets with fhir.resources (a FHIR server such as HAPI cannot run here).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as dt
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset

from integration.destinations import FhirDestination
from integration.errors import FhirBuildError, FhirDeliveryError
from integration.fhir_check import check_bundle
from integration.fhir_coding import DICOM_UID_SYSTEM
from integration.fhir_report import DRAFT_STATUS, FhirDraft, ReportContext, build_draft_bundle
from integration.fhir_send import send_transaction, update_conditional
from integration.fhir_withdrawal import WITHDRAWN_STATUS, build_withdrawal_bundle
from integration.uids import device_uid
from tests.helpers import free_port
from tests.receivers import TOKEN, FhirReceiver
from tests.reporting.conftest import (
    ACCESSION,
    ACCESSION_OID,
    FINDINGS,
    GENERATED,
    IMPRESSION,
    MODEL,
    PATIENT_OID,
    VERSION,
)

SR_UID = "2.25.118479003612343912853107016735237406137"
PDF = b"%PDF-1.4\n% a tiny stand-in; the real PDF is tested in test_encapsulated_pdf\n"
DRAFT = FhirDraft(
    sr_sop_instance_uid=SR_UID,
    impression=IMPRESSION,
    findings=FINDINGS,
    model_name=MODEL,
    model_version=VERSION,
    demo=True,
    issued=GENERATED,
    pdf=PDF,
)


def resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e for e in bundle["entry"]}


# --- building -----------------------------------------------------------------------------


def test_draft_bundle_content(source: Dataset) -> None:
    bundle = build_draft_bundle(source, DRAFT)
    model = Bundle.model_validate(bundle)  # fhir.resources R4B
    assert model.type == "transaction" and len(model.entry or []) == 3
    entries = resources(bundle)

    device_entry = entries["Device"]
    device = device_entry["resource"]
    assert device["deviceName"] == [{"name": MODEL, "type": "model-name"}]
    assert device["version"] == [{"value": VERSION}]
    assert "DEMO MODEL" in device["note"][0]["text"]
    uid = device_uid(MODEL, VERSION)
    assert device["identifier"][0] == {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
    assert device_entry["request"]["method"] == "PUT"
    assert parse_qs(urlsplit(device_entry["request"]["url"]).query) == {
        "identifier": [f"urn:dicom:uid|urn:oid:{uid}"]
    }

    report_entry = entries["DiagnosticReport"]
    report = report_entry["resource"]
    assert report["status"] == DRAFT_STATUS == "partial"
    assert report["identifier"] == [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{SR_UID}"}]
    assert parse_qs(urlsplit(report_entry["request"]["url"]).query) == {
        "identifier": [f"urn:dicom:uid|urn:oid:{SR_UID}"]
    }
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"][0]["code"] == "18748-4"
    subject = report["subject"]
    assert subject["type"] == "Patient" and "reference" not in subject  # logical reference
    assert subject["identifier"]["value"] == "9RG1"
    assert subject["identifier"]["system"] == f"urn:oid:{PATIENT_OID}"
    assert subject["identifier"]["assigner"] == {"display": "HOSP-A"}
    (based_on,) = report["basedOn"]
    assert based_on["type"] == "ServiceRequest"
    assert based_on["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert based_on["identifier"]["value"] == ACCESSION
    assert based_on["identifier"]["system"] == f"urn:oid:{ACCESSION_OID}"
    (study,) = report["imagingStudy"]
    assert study["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{source.StudyInstanceUID}",
    }
    assert report["effectiveDateTime"] == "2004-08-26T18:50:59-04:00"
    assert report["issued"] == "2024-05-06T07:08:09+00:00"
    assert report["conclusion"] == IMPRESSION
    (form,) = report["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert base64.b64decode(form["data"]) == PDF
    assert report["meta"]["security"][0]["code"] == "AIAST"
    narrative = report["text"]["div"]
    assert "not verified by a radiologist" in narrative and "DEMO MODEL" in narrative
    assert "No focal consolidation" in narrative  # findings live in the narrative
    assert "performer" not in report and "resultsInterpreter" not in report

    provenance = entries["Provenance"]["resource"]
    assert provenance["target"][0]["reference"] == report_entry["fullUrl"]
    assert provenance["agent"][0]["who"]["reference"] == device_entry["fullUrl"]
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"

    assert build_draft_bundle(source, DRAFT) == bundle  # deterministic fullUrls and content


def test_narrative_is_xhtml_when_the_model_writes_control_characters(source: Dataset) -> None:
    # a byte-level BPE tokenizer can emit any byte, the DEMO model's random weights do:
    # XML 1.0 has no BEL, ESC or VT, and R4 Narrative.div SHALL be XHTML (a server parses it)
    impression = "No pneumothorax.\x07 Heart\x1b[0m size normal.\x0b Clear lungs."
    draft = dataclasses.replace(DRAFT, impression=impression, findings="Lungs\x08 clear.")
    report = resources(build_draft_bundle(source, draft))["DiagnosticReport"]["resource"]
    div = ElementTree.fromstring(report["text"]["div"])  # raises ParseError on HEAD
    text = "".join(div.itertext())
    assert "No pneumothorax." in text and "size normal." in text and "Clear lungs." in text
    assert "Lungs" in text and "clear." in text
    assert report["conclusion"] == impression  # the exact text stays in the JSON string


def test_effective_time_needs_a_zone(source: Dataset) -> None:
    no_zone = copy.deepcopy(source)
    del no_zone.TimezoneOffsetFromUTC
    report = resources(build_draft_bundle(no_zone, DRAFT))["DiagnosticReport"]["resource"]
    assert report["effectiveDateTime"] == "2004-08-26"  # date only: a time needs a zone
    zoned = build_draft_bundle(
        no_zone, DRAFT, context=ReportContext(local_timezone=dt.timezone(dt.timedelta(hours=2)))
    )
    report = resources(zoned)["DiagnosticReport"]["resource"]
    assert report["effectiveDateTime"] == "2004-08-26T18:50:59+02:00"


def test_withdrawal_bundle(source: Dataset) -> None:
    draft = build_draft_bundle(source, DRAFT)
    bundle = build_withdrawal_bundle(source, DRAFT, reason="sent for the wrong study")
    Bundle.model_validate(bundle)
    (entry,) = bundle["entry"]
    report = entry["resource"]
    assert report["status"] == WITHDRAWN_STATUS == "entered-in-error"
    original = resources(draft)["DiagnosticReport"]
    assert entry["request"] == original["request"]  # same conditional update
    assert report["identifier"] == original["resource"]["identifier"]
    assert "conclusion" not in report and "presentedForm" not in report
    assert "WITHDRAWN" in report["text"]["div"] and "wrong study" in report["text"]["div"]
    with pytest.raises(FhirBuildError, match="reason"):
        build_withdrawal_bundle(source, DRAFT, reason="")


def _report_entry(bundle: dict[str, Any]) -> dict[str, Any]:
    return resources(bundle)["DiagnosticReport"]["resource"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: _report_entry(b).update(status="draft"), "not an R4 code"),
        (
            lambda b: _report_entry(b).update(
                performer=[{"reference": resources(b)["Device"]["fullUrl"]}]
            ),
            "performer may refer to",
        ),
        (
            lambda b: _report_entry(b).update(performer=[{"reference": "Device/ai-1"}]),
            "performer may refer to",
        ),
        (
            lambda b: _report_entry(b)["subject"].update(type="Practitioner"),
            "subject may refer to",
        ),
        (
            lambda b: resources(b)["Provenance"]["resource"]["agent"][0]["who"].update(
                type="Group"
            ),
            "agent.who may refer to",
        ),
        (lambda b: b.update(type="bogus"), "Bundle.type"),
        (lambda b: b["entry"][0]["request"].update(method="FETCH"), "request.method"),
        (lambda b: resources(b)["Device"]["resource"]["deviceName"][0].update(type="x"), "Device"),
        (lambda b: _report_entry(b).update(issued="2024-05-06T07:08:09"), "issued"),
    ],
)
def test_rules_fhir_resources_does_not_enforce(source: Dataset, mutate: Any, message: str) -> None:
    bundle = build_draft_bundle(source, DRAFT)
    mutate(bundle)
    with pytest.raises(FhirBuildError, match=message):
        check_bundle(bundle)


def test_invalid_inputs_are_refused(source: Dataset) -> None:
    with pytest.raises(FhirBuildError, match="timezone-aware"):
        build_draft_bundle(source, dataclasses.replace(DRAFT, issued=dt.datetime(2024, 5, 6)))
    with pytest.raises(FhirBuildError, match="impression"):
        build_draft_bundle(source, dataclasses.replace(DRAFT, impression=" "))
    no_id = copy.deepcopy(source)
    no_id.PatientID = ""
    with pytest.raises(FhirBuildError, match="Patient ID"):
        build_draft_bundle(no_id, DRAFT)


def test_a_draft_that_supersedes_another_names_the_report_it_replaces(source: Dataset) -> None:
    """A study drafted again (a late instance) gets a new report; it names the earlier
    draft's by its identifier in the core R4 extension ``diagnosticReport-replaces``
    (0..1 Reference(DiagnosticReport)), so the EHR can show the newer one as the current
    AI draft. A first draft names none; a replaced UID that is not a UID is refused."""
    earlier = "2.25.2718281828459045"
    bundle = build_draft_bundle(source, dataclasses.replace(DRAFT, replaces_sr_uid=earlier))
    Bundle.model_validate(bundle)
    report = resources(bundle)["DiagnosticReport"]["resource"]
    assert report["extension"] == [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/diagnosticReport-replaces",
            "valueReference": {
                "type": "DiagnosticReport",
                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{earlier}"},
            },
        }
    ]
    first = resources(build_draft_bundle(source, DRAFT))["DiagnosticReport"]["resource"]
    assert "extension" not in first
    with pytest.raises(FhirBuildError, match="replaces_sr_uid"):
        build_draft_bundle(source, dataclasses.replace(DRAFT, replaces_sr_uid="not-a-uid"))


# --- sending ------------------------------------------------------------------------------


def test_transaction_delivered(source: Dataset, fhir_server: tuple[str, FhirReceiver]) -> None:
    base, receiver = fhir_server
    result = send_transaction(
        build_draft_bundle(source, DRAFT), FhirDestination(base, bearer_token=TOKEN)
    )
    assert result.http_status == 200
    assert result.locations == (
        "Device/1/_history/1",
        "DiagnosticReport/2/_history/1",
        "Provenance/3/_history/1",
    )
    assert receiver.problems == []
    ((method, path, body),) = receiver.received
    assert (method, path) == ("POST", "/fhir")
    assert resources(body)["DiagnosticReport"]["resource"]["status"] == "partial"


def test_withdrawal_delivered(source: Dataset, fhir_server: tuple[str, FhirReceiver]) -> None:
    base, receiver = fhir_server
    dest = FhirDestination(base, bearer_token=TOKEN)
    bundle = build_withdrawal_bundle(source, DRAFT, reason="wrong study")
    assert send_transaction(bundle, dest).http_status == 200
    # the same withdrawal as a plain conditional update of the report
    report = bundle["entry"][0]["resource"]
    result = update_conditional(report, dest, identifier=(DICOM_UID_SYSTEM, f"urn:oid:{SR_UID}"))
    assert result.http_status == 201
    assert result.locations == ("DiagnosticReport/77/_history/1",)
    assert receiver.problems == []
    method, path, body = receiver.received[-1]
    assert method == "PUT" and body["status"] == "entered-in-error"
    assert parse_qs(urlsplit(path).query) == {"identifier": [f"urn:dicom:uid|urn:oid:{SR_UID}"]}


@pytest.mark.parametrize(
    ("mode", "token", "status", "transient"),
    [
        ("ok", "wrong-token", 401, False),
        ("400", TOKEN, 400, False),
        ("429", TOKEN, 429, True),
        ("500", TOKEN, 500, True),
    ],
)
def test_http_errors_are_classified(
    source: Dataset,
    fhir_server: tuple[str, FhirReceiver],
    mode: str,
    token: str,
    status: int,
    transient: bool,
) -> None:
    base, receiver = fhir_server
    receiver.mode = mode
    with pytest.raises(FhirDeliveryError) as caught:
        send_transaction(build_draft_bundle(source, DRAFT), FhirDestination(base, token))
    error = caught.value
    assert error.http_status == status
    assert error.transient is transient
    assert "error/" in str(error)  # OperationOutcome issue codes are reported ...
    assert "Müller" not in str(error) and token not in str(error)  # ... diagnostics are not
    assert receiver.received == []


def test_timeout_is_transient(source: Dataset, fhir_server: tuple[str, FhirReceiver]) -> None:
    base, receiver = fhir_server
    receiver.mode = "slow"
    started = time.monotonic()
    with pytest.raises(FhirDeliveryError, match="timed out") as caught:
        send_transaction(
            build_draft_bundle(source, DRAFT), FhirDestination(base, TOKEN, timeout=0.5)
        )
    assert caught.value.transient and caught.value.http_status is None
    assert time.monotonic() - started < 2.5


def test_connection_refused_is_transient(source: Dataset) -> None:
    dest = FhirDestination(f"http://127.0.0.1:{free_port()}/fhir", TOKEN, timeout=2)
    with pytest.raises(FhirDeliveryError) as caught:
        send_transaction(build_draft_bundle(source, DRAFT), dest)
    assert caught.value.transient


def test_destination_hides_the_token() -> None:
    dest = FhirDestination("https://fhir.example.org/r4", bearer_token=TOKEN)
    assert TOKEN not in repr(dest) and TOKEN not in str(dest)
    with pytest.raises(ValueError, match="absolute"):
        FhirDestination("fhir.example.org/r4")
