"""HL7 v2.5.1 ORU^R01 builder and ACK interpretation (integration.hl7_oru).

Every built message is parsed back with hl7apy at STRICT validation and checked against
its 2.5.1 message structure, and its fields are read from the parsed message.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import pathlib
import re

import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from integration.errors import Hl7AckError, Hl7BuildError
from integration.hl7_ack import check_ack, parse_ack
from integration.hl7_oru import (
    DRAFT_OBSERVATION_STATUS,
    DRAFT_RESULT_STATUS,
    WITHDRAWN_OBSERVATION_STATUS,
    WITHDRAWN_RESULT_STATUS,
    build_draft_oru,
    build_withdrawal_oru,
    message_control_id,
)
from integration.uids import device_uid
from tests.reporting.conftest import (
    ACCESSION,
    FILLER,
    FINDINGS,
    IMPRESSION,
    MODEL,
    PARTIES,
    PATIENT_OID,
    PLACER,
    RESULT,
    VERSION,
)

SENT = dt.datetime(2024, 5, 6, 7, 9, 0, tzinfo=dt.UTC)


def unescape(value: str) -> str:
    """Undo HL7 v2 escape sequences (for reading values back in the test)."""
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    return re.sub(r"\\([FSTRE])\\", lambda m: table[m.group(1)], value)


def parsed(er7: str) -> Message:
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate() is True
    return message


def observations(message: Message) -> list[dict[str, str]]:
    order = message.oru_r01_patient_result.oru_r01_order_observation
    out = []
    for group in order.oru_r01_observation:
        obx = group.obx
        out.append(
            {
                "type": obx.obx_2.to_er7(),
                "code": obx.obx_3.to_er7(),
                "sub_id": obx.obx_4.to_er7(),
                "value": unescape(obx.obx_5.to_er7()),
                "status": obx.obx_11.to_er7(),
                "device": obx.obx_18.to_er7(),
                "time": obx.obx_14.to_er7(),
            }
        )
    return out


def test_draft_oru_fields(source: Dataset) -> None:
    control = message_control_id("sr-uid", "draft", "1")
    er7 = build_draft_oru(source, RESULT, PARTIES, control_id=control, message_time=SENT)
    assert "\n" not in er7 and er7.count("\r") >= 6  # CR-separated segments
    message = parsed(er7)

    msh = message.msh
    assert msh.msh_3.to_er7() == "LLMCXR" and msh.msh_6.to_er7() == "RADIOLOGY"
    assert msh.msh_7.to_er7() == "20240506070900+0000"
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msh.msh_10.to_er7() == control
    assert msh.msh_11.to_er7() == "P"
    assert msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_15.to_er7() == "" and msh.msh_16.to_er7() == ""  # original ack mode
    assert msh.msh_18.to_er7() == "UNICODE UTF-8"

    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == f"9RG1^^^HOSP-A&{PATIENT_OID}&ISO^MR"
    assert pid.pid_5.to_er7() == "Müller^Jürgen"  # decoded from the Latin-1 source
    assert pid.pid_7.to_er7() == "19400305"
    assert pid.pid_8.to_er7() == "F"

    order = result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "RE"
    assert (order.orc.orc_2.to_er7(), order.orc.orc_3.to_er7()) == (PLACER, FILLER)
    obr = order.obr
    assert (obr.obr_2.to_er7(), obr.obr_3.to_er7()) == (PLACER, FILLER)
    assert obr.obr_4.to_er7() == "36643-5^XR Chest 2V^LN"  # requested procedure code
    assert obr.obr_7.to_er7() == "20040826185059-0400"  # study date/time + offset
    assert obr.obr_18.to_er7() == ACCESSION
    assert obr.obr_22.to_er7() == "20240506070809+0000"
    assert obr.obr_24.to_er7() == "RAD"
    assert obr.obr_25.to_er7() == DRAFT_RESULT_STATUS == "R"
    assert obr.obr_32.to_er7() == ""  # no principal result interpreter: nobody verified it

    note = unescape(order.nte.nte_3.to_er7())
    assert "AI-GENERATED DRAFT, NOT VERIFIED by a radiologist" in note
    assert "DEMO MODEL" in note and f"{MODEL} {VERSION}" in note

    rows = observations(message)
    assert {row["type"] for row in rows} == {"TX"}
    assert {row["status"] for row in rows} == {DRAFT_OBSERVATION_STATUS}
    assert rows[0]["code"] == "AI-DRAFT^AI-generated draft notice^L"
    assert rows[0]["value"].startswith("AI-GENERATED DRAFT")
    findings = [r["value"] for r in rows if r["code"] == "59776-5^Findings^LN"]
    impression = [r["value"] for r in rows if r["code"] == "19005-8^Impression^LN"]
    assert findings == FINDINGS.splitlines()
    assert impression == [IMPRESSION]
    uid = device_uid(MODEL, VERSION)
    assert {row["device"] for row in rows} == {f"{MODEL} {VERSION}^llm-cxr-node^{uid}^ISO"}
    assert {row["time"] for row in rows} == {"20240506070809+0000"}


def test_delimiters_in_text_are_escaped(source: Dataset) -> None:
    tricky = "Left | right ^ up & down ~ tilde \\ backslash \\F\\ literal"
    src = copy.deepcopy(source)
    src.AccessionNumber = "A|1^2"
    result = dataclasses.replace(RESULT, impression=tricky, findings=None)
    message = parsed(build_draft_oru(src, result, PARTIES, control_id="C1", message_time=SENT))
    rows = observations(message)
    assert [r["value"] for r in rows if r["code"].startswith("19005-8")] == [tricky]
    assert not [r for r in rows if r["code"].startswith("59776-5")]  # no findings lines
    obr = message.oru_r01_patient_result.oru_r01_order_observation.obr
    assert unescape(obr.obr_18.to_er7()) == "A|1^2"


def test_study_description_with_a_backslash_is_its_text(
    source: Dataset, tmp_path: pathlib.Path
) -> None:
    # a backslash in an LO value is its value delimiter (PS3.5 6.2): pydicom reads
    # "THORAX PA\LAT" as two values; OBR-4 is the description, not a Python list
    src = copy.deepcopy(source)
    del src.RequestAttributesSequence  # no procedure code: OBR-4 is ^<description>
    src.StudyDescription = "THORAX PA\\LAT"
    src.save_as(tmp_path / "desc.dcm", enforce_file_format=True)
    src = pydicom.dcmread(tmp_path / "desc.dcm")
    message = parsed(build_draft_oru(src, RESULT, PARTIES, control_id="C1", message_time=SENT))
    obr = message.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_4.to_er7() == "^THORAX PA\\E\\LAT"
    assert unescape(obr.obr_4.obr_4_2.to_er7()) == "THORAX PA\\LAT"


def test_ideographic_name_becomes_a_second_repetition(source: Dataset) -> None:
    src = copy.deepcopy(source)
    src.SpecificCharacterSet = "ISO_IR 192"
    src.PatientName = "Yamada^Tarou=山田^太郎"
    message = parsed(build_draft_oru(src, RESULT, PARTIES, control_id="C2", message_time=SENT))
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert [rep.to_er7() for rep in pid.pid_5] == [
        "Yamada^Tarou^^^^^^A",
        "山田^太郎^^^^^^I",
    ]


def test_withdrawal_marks_the_same_lines_wrong(source: Dataset) -> None:
    draft = parsed(build_draft_oru(source, RESULT, PARTIES, control_id="D1", message_time=SENT))
    er7 = build_withdrawal_oru(
        source,
        RESULT,
        PARTIES,
        control_id="W1",
        reason="sent for the wrong study",
        message_time=SENT,
    )
    withdrawal = parsed(er7)
    order = withdrawal.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == WITHDRAWN_RESULT_STATUS == "C"
    assert order.obr.obr_2.to_er7() == PLACER and order.obr.obr_3.to_er7() == FILLER
    note = unescape(order.nte.nte_3.to_er7())
    assert note.startswith("WITHDRAWN") and "sent for the wrong study" in note
    before, after = observations(draft), observations(withdrawal)
    assert [(r["code"], r["sub_id"], r["value"]) for r in after] == [
        (r["code"], r["sub_id"], r["value"]) for r in before
    ]
    assert {r["status"] for r in after} == {WITHDRAWN_OBSERVATION_STATUS}
    with pytest.raises(Hl7BuildError, match="reason"):
        build_withdrawal_oru(source, RESULT, PARTIES, control_id="W2", reason=" ")


def test_message_control_id() -> None:
    first = message_control_id("1.2.3", "draft")
    assert len(first) <= 20 and first.isalnum()
    assert message_control_id("1.2.3", "draft") == first
    assert message_control_id("1.2.3", "withdraw") != first
    assert message_control_id("1.2", "3draft") != message_control_id("1.23", "draft")


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        ({}, {"control_id": "X" * 21}, "control ID"),
        ({}, {"control_id": "A|B"}, "control ID"),
        ({"impression": " "}, {}, "impression"),
        ({"report_time": dt.datetime(2024, 5, 6)}, {}, "timezone-aware"),
    ],
)
def test_invalid_inputs_are_refused(
    source: Dataset, change: dict[str, object], kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"control_id": "OK1", "message_time": SENT, **kwargs}
    with pytest.raises(Hl7BuildError, match=message):
        build_draft_oru(
            source,
            dataclasses.replace(RESULT, **change),  # type: ignore[arg-type]
            PARTIES,
            **args,  # type: ignore[arg-type]
        )


def test_missing_patient_id_is_refused(source: Dataset) -> None:
    src = copy.deepcopy(source)
    src.PatientID = ""
    with pytest.raises(Hl7BuildError, match="PID-3"):
        build_draft_oru(src, RESULT, PARTIES, control_id="C3")


# --- ACKs ---------------------------------------------------------------------------------


def ack(code: str, control: str = "CTRL1", *, err: str | None = None, text: str = "") -> str:
    segments = [
        "MSH|^~\\&|RIS|RADIOLOGY|LLMCXR|CXRNODE|20240506070910||ACK^R01^ACK|A1|P|2.5.1",
        f"MSA|{code}|{control}" + (f"|{text}" if text else ""),
    ]
    if err is not None:
        segments.append(f"ERR|||{err}^Error^HL70357|E||||{text}")
    return "\r".join(segments) + "\r"


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_accepting_acks(code: str) -> None:
    got = check_ack(ack(code).encode(), control_id="CTRL1")
    assert got.accepted and got.code == code and got.control_id == "CTRL1"


@pytest.mark.parametrize(
    ("code", "err", "transient"),
    [
        ("AE", None, False),  # error in the message: the same message fails again
        ("AE", "101", False),  # required field missing
        ("AE", "207", True),  # application internal error
        ("AE", "206", True),  # record locked
        ("AR", None, True),  # rejected, e.g. receiver down
        ("AR", "207", True),
        ("AR", "200", False),  # unsupported message type
        ("AR", "203", False),  # unsupported version
        ("CE", None, False),
        ("CR", None, True),
        ("CR", "202", False),  # unsupported processing ID
        ("XX", None, True),  # not a table 0008 code
    ],
)
def test_negative_acks_are_classified(code: str, err: str | None, transient: bool) -> None:
    patient_text = "Patient Müller^Jürgen unknown"
    with pytest.raises(Hl7AckError) as caught:
        check_ack(ack(code, err=err, text=patient_text), control_id="CTRL1")
    error = caught.value
    assert error.transient is transient
    assert error.ack_code == code
    assert error.error_codes == ((err,) if err else ())
    assert "Müller" not in str(error)  # receiver text is kept aside, never in the message
    assert patient_text in error.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"MSH|^~\\&|RIS||||20240506||ACK|A1|P|2.5.1\r",  # no MSA
        b"MSH|^~\\&|RIS||||20240506||ACK|A1|P|2.5.1\rMSA||CTRL1\r",  # empty MSA-1
    ],
)
def test_malformed_acks_are_transient(raw: bytes) -> None:
    with pytest.raises(Hl7AckError) as caught:
        check_ack(raw, control_id="CTRL1")
    assert caught.value.transient and caught.value.ack_code is None


def test_ack_for_another_message_is_transient() -> None:
    with pytest.raises(Hl7AckError, match="acknowledges control ID 'OTHER'") as caught:
        check_ack(ack("AA", control="OTHER"), control_id="CTRL1")
    assert caught.value.transient


def test_older_ack_forms_are_read() -> None:
    v23 = (
        "MSH|^~\\&|RIS||LLMCXR||20240506||ACK|A1|P|2.3\r"
        "MSA|AR|CTRL1|Unsupported version|||203^Unsupported version id\r"
        "ERR|OBR^1^25^101&Required field missing&HL70357\r"
    )
    got = parse_ack("\x0b" + v23 + "\x1c\r")
    assert got.code == "AR" and got.error_codes == ("203", "101")
    with pytest.raises(Hl7AckError) as caught:
        check_ack(v23, control_id="CTRL1")
    assert not caught.value.transient  # 203: the same message fails again


def test_withdrawal_dates_the_status_change(source: Dataset) -> None:
    """OBR-22 is "Results Rpt/Status Chng - Date/Time" (HL7 v2.5.1 section 7.4.1.22): the
    withdrawal changes the result status, so its OBR-22 is when it was withdrawn (as the FHIR
    withdrawal's ``issued`` is), later than the draft's; the lines keep their observation
    time (OBX-14)."""
    withdrawn_at = SENT + dt.timedelta(days=1, minutes=5)
    draft = parsed(build_draft_oru(source, RESULT, PARTIES, control_id="D3", message_time=SENT))
    withdrawal = parsed(
        build_withdrawal_oru(
            source, RESULT, PARTIES, control_id="W3", reason="wrong", message_time=withdrawn_at
        )
    )
    before = draft.oru_r01_patient_result.oru_r01_order_observation.obr.obr_22.to_er7()
    after = withdrawal.oru_r01_patient_result.oru_r01_order_observation.obr.obr_22.to_er7()
    assert before == "20240506070809+0000"  # the draft's report time
    assert after == "20240507071400+0000" == withdrawal.msh.msh_7.to_er7()
    assert [r["time"] for r in observations(withdrawal)] == [r["time"] for r in observations(draft)]
