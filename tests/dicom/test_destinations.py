"""The one destination type: text and JSON forms, validation, secrets kept out of text."""

from __future__ import annotations

import pytest

from integration.destinations import (
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)


def test_text_forms() -> None:
    assert parse_destination("PACS@10.0.0.5:104") == DicomDestination("PACS", "10.0.0.5", 104)
    assert parse_destination("PACS@[::1]:11112").host == "::1"
    assert str(parse_destination("PACS@[::1]:11112")) == "PACS@[::1]:11112"
    stow = parse_destination("https://pacs.example/dicom-web")
    assert isinstance(stow, StowDestination)
    assert stow.studies_url == "https://pacs.example/dicom-web/studies"
    hl7 = parse_destination("mllp://ris.example:2575")
    assert hl7 == Hl7Destination("ris.example", 2575)
    assert str(hl7) == "mllp://ris.example:2575"
    assert parse_destination("mllps://ris.example:2575").tls  # type: ignore[union-attr]
    fhir = parse_destination("fhir+https://fhir.example/r4/")
    assert isinstance(fhir, FhirDestination)
    assert fhir.base_url == "https://fhir.example/r4/"
    assert str(fhir) == "fhir+https://fhir.example/r4"


def test_json_form_with_objects_and_options() -> None:
    dest = parse_destination(
        {"kind": "dimse", "ae_title": "VNA", "host": "vna", "port": 11112, "objects": ["sr", "pdf"]}
    )
    assert isinstance(dest, DicomDestination)
    assert dest.objects == ("sr", "pdf")
    hl7 = parse_destination(
        {"kind": "hl7", "host": "ris", "port": 2575, "receiving_application": "RIS"}
    )
    assert isinstance(hl7, Hl7Destination) and hl7.receiving_application == "RIS"
    assert DicomDestination("PACS", "pacs", 104).objects == ("sr",)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("PACS", "AET@host:port"),
        ("mllp://ris", "mllp://host:port"),
        ("mllp://ris:2575/path", "mllp://host:port"),
        ("ftp://pacs/x", "AET@host:port"),
        ("https://user:pw@pacs/dicom-web", "no credentials"),
        ("https://pacs/dicom-web?key=s3cret", "no query or fragment"),
        ("https://pacs/dicom-web#x", "no query or fragment"),
        ("https://pacs/dicom-web?", "no query or fragment"),
        ("fhir+https://fhir/r4?key=s3cret", "no query or fragment"),
        ({"kind": "stow", "url": "https://pacs/dicom-web?key=s3cret"}, "no query or fragment"),
        ({"kind": "fhir", "base_url": "https://fhir/r4?key=s3cret"}, "no query or fragment"),
        ("fhir+https://", "absolute"),
        ({"kind": "dimse", "ae_title": "P", "host": "h", "port": 1, "objects": []}, "at least"),
        (
            {"kind": "dimse", "ae_title": "P", "host": "h", "port": 1, "objects": ["sr", "sr"]},
            "twice",
        ),
        ({"kind": "dimse", "ae_title": "P", "host": "h", "port": 1, "objects": ["kos"]}, "objects"),
        ({"kind": "hl7", "host": "ris", "port": 2575, "receiving_facility": "A|B"}, "delimiter"),
        ({"kind": "smtp", "host": "x"}, "kind"),
        ({"kind": "hl7", "host": "bad host", "port": 1}, "host"),
        ({"kind": "hl7", "host": "ris", "port": 0}, "port"),
    ],
)
def test_bad_destinations_are_refused(value: str | dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destination(value)


def test_secrets_stay_out_of_text() -> None:
    stow = StowDestination("https://pacs/dicom-web", authorization="Bearer s3cret")
    fhir = FhirDestination("https://fhir/r4", bearer_token="t0ken")
    for text in (repr(stow), str(stow), repr(fhir), str(fhir)):
        assert "s3cret" not in text and "t0ken" not in text
