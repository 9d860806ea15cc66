"""The AI draft report as an HL7 v2.5.1 ORU^R01 result message (hl7apy), and its ACK.

Message (HL7 v2.5.1 chapter 7, ORU^R01^ORU_R01; segments end with CR; fields abridged)::

    MSH|^~\\&|<app>|<facility>|<app>|<facility>|<time>||ORU^R01^ORU_R01|<id>|P|2.5.1|...
    PID|1||<Patient ID>^^^<issuer>&<OID>&ISO||<Family>^<Given>^<Middle>^<Sfx>^<Pfx>||<DOB>|<sex>
    ORC|RE|<placer order number>|<filler order number>
    OBR|1|<placer>|<filler>|<procedure code or ^description>|||<study date/time>|...
        OBR-18 <accession number>, OBR-22 <report time>, OBR-24 RAD, OBR-25 R
    NTE|1|O|AI-GENERATED DRAFT, NOT VERIFIED ... [DEMO MODEL ...]|RE
    OBX|1|TX|AI-DRAFT^AI-generated draft notice^L|1|AI-GENERATED DRAFT ...||||||R|...
        OBX-14 / OBX-19 <report time>, OBX-18 <model version>^<manufacturer>^<UID>^ISO
    OBX|2|TX|59776-5^Findings^LN|1|<findings line 1>||||||R|...
    OBX|n|TX|19005-8^Impression^LN|1|<impression line 1>||||||R|...

- **Result status R, not P.** The issue asked for P ("preliminary"), but HL7 table 0123
  defines P as "Preliminary: A verified early result is available, final results not yet
  obtained" and R as "Results stored; not yet verified"; table 0085 (OBX-11) has R
  "Results entered -- not verified" next to P "Preliminary results". Nobody has verified
  an AI draft, so OBR-25 = :data:`DRAFT_RESULT_STATUS` ``R``
  and OBX-11 = :data:`DRAFT_OBSERVATION_STATUS` ``R``.
- **Withdrawal.** The earlier draft's OBX lines are sent again (same order numbers, same
  OBX-3/OBX-4/OBX-5) with OBX-11 = :data:`WITHDRAWN_OBSERVATION_STATUS` ``W`` "Post original
  as wrong, e.g., transmitted for wrong patient": the receiver keeps them, marked wrong.
  ``D`` ("Deletes the OBX record") would erase the audit trail of a result that was shown,
  and ``C`` (0085) only replaces a *final* result. OBR-25 = :data:`WITHDRAWN_RESULT_STATUS`
  ``C`` "Correction to results": the order's results are being corrected; ``X`` "No
  results available; Order canceled" would cancel an order a radiologist still has to
  report. The NTE says "WITHDRAWN" and gives the reason. OBR-22, the "Results Rpt/Status
  Chng - Date/Time" (section 7.4.1.22), is when it was withdrawn (MSH-7), since the status
  changed then; the OBX lines keep the draft's OBX-14/OBX-19.
- **Accession number** in OBR-18 (placer field 1), as IHE does for ORU (ORU has no IPC
  segment); Placer/Filler Order Number (0040,2016)/(0040,2017) of the image go to
  ORC-2/OBR-2 and ORC-3/OBR-3 when present.
- **The AI device**: OBX-18 Equipment Instance Identifier (EI) = model name and version ^
  manufacturer ^ Device Observer UID (as in the SR) ^ ``ISO``; OBX-16 (responsible observer)
  and OBR-32 (principal result interpreter) stay empty: no person has interpreted it.
- **The warning travels twice**: an NTE after the OBR, and a first TX OBX with a local code
  (``AI-DRAFT^AI-generated draft notice^L``) for receivers that drop NTE segments.
- Original acknowledgment mode (MSH-15/16 empty), Processing ID ``P``, character set
  ``UNICODE UTF-8`` (MSH-18). Text is escaped per HL7 v2.5.1 section 2.7 (``\\F\\ \\S\\ \\T\\
  \\R\\ \\E\\``), a control character becomes a space
  (:func:`integration.hl7_values.escape`), and the message is checked against hl7apy's
  2.5.1 structure at STRICT validation before it is returned.

The segments after MSH are added by :mod:`integration.oru_segments`. The acknowledgment of
this message is judged by :func:`integration.hl7_ack.check_ack`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from pydicom.dataset import Dataset

from integration.errors import Hl7BuildError
from integration.hl7_values import escape, text_field, ts
from integration.oru_segments import (
    ObxCode,
    add_note,
    add_observation,
    add_order,
    add_patient,
    set_fields,
)
from integration.uids import device_uid as default_device_uid

__all__ = [
    "AI_NOTICE_CODE",
    "DRAFT_OBSERVATION_STATUS",
    "DRAFT_RESULT_STATUS",
    "FINDINGS_CODE",
    "IMPRESSION_CODE",
    "WITHDRAWN_OBSERVATION_STATUS",
    "WITHDRAWN_RESULT_STATUS",
    "DraftResult",
    "Hl7Parties",
    "build_draft_oru",
    "build_withdrawal_oru",
    "message_control_id",
]

LOGGER = logging.getLogger(__name__)

VERSION = "2.5.1"
DRAFT_RESULT_STATUS = "R"
"""OBR-25 of a draft (table 0123 "Results stored; not yet verified"); see the module text."""
DRAFT_OBSERVATION_STATUS = "R"
"""OBX-11 of a draft (table 0085 "Results entered -- not verified")."""
WITHDRAWN_RESULT_STATUS = "C"
"""OBR-25 of a withdrawal (table 0123 "Correction to results")."""
WITHDRAWN_OBSERVATION_STATUS = "W"
"""OBX-11 of a withdrawal (table 0085 "Post original as wrong")."""
FINDINGS_CODE = ("59776-5", "Findings", "LN")
IMPRESSION_CODE = ("19005-8", "Impression", "LN")
AI_NOTICE_CODE = ("AI-DRAFT", "AI-generated draft notice", "L")
DRAFT_NOTICE = (
    "AI-GENERATED DRAFT, NOT VERIFIED by a radiologist: produced automatically by {model} "
    "{version}. Preliminary, for review only, not for diagnosis."
)
DEMO_NOTICE = (
    "DEMO MODEL: randomly initialised weights. This text is meaningless and must not be "
    "used for any clinical purpose."
)
WITHDRAWN_NOTICE = (
    "WITHDRAWN: the AI-generated draft sent earlier for this order ({model} {version}) is "
    "wrong and must not be used."
)
_MAX_CONTROL_ID = 20  # MSH-10 (ST, 20 in v2.5.1)
_ENCODING_CHARS = "^~\\&"


@dataclass(frozen=True, slots=True)
class Hl7Parties:
    """MSH-3 to MSH-6: who sends and who receives (HD namespace IDs, plain text).

    Parameters
    ----------
    sending_application, sending_facility, receiving_application, receiving_facility
        As agreed with the RIS interface team, e.g. ``"LLMCXR"``, ``"RADIOLOGY"``; the
        receiving ones may be empty (MSH-5 and MSH-6 are optional).
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str

    def __post_init__(self) -> None:
        for name in ("sending_application", "sending_facility"):
            value = getattr(self, name)
            if not value or not value.strip() or len(value) > 227:
                raise ValueError(f"{name} must be 1-227 characters, got {value!r}")
        for name in ("receiving_application", "receiving_facility"):  # optional (MSH-5/6)
            if len(getattr(self, name)) > 227:
                raise ValueError(f"{name} must be at most 227 characters")


@dataclass(frozen=True, slots=True)
class DraftResult:
    """The draft's text and its author, as the ORU carries them.

    Parameters
    ----------
    impression
        Impression text (must not be empty); one OBX per line.
    findings
        Findings text, or ``None``/empty for no findings OBX.
    model_name, model_version
        The model (OBX-18, notices).
    demo
        DEMO model: the NTE and the notice OBX say so.
    report_time
        When the draft was produced (timezone-aware): OBR-22, OBX-14, OBX-19.
    manufacturer
        Namespace of OBX-18 (the node software).
    device_uid
        Universal ID of OBX-18; default :func:`integration.uids.device_uid` (the SR's
        Device Observer UID).
    """

    impression: str
    findings: str | None
    model_name: str
    model_version: str
    demo: bool
    report_time: dt.datetime
    manufacturer: str = "llm-cxr-node"
    device_uid: str | None = None


# --- building -----------------------------------------------------------------------------


def message_control_id(*parts: str) -> str:
    """A message control ID (MSH-10, <= 20 characters) derived from ``parts``.

    The same parts (e.g. SR SOP Instance UID, ``"draft"``/``"withdraw"``, attempt counter
    or revision) give the same ID, different parts a different one (SHA-256, base32).
    """
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError("message_control_id needs non-empty string parts")
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "N" + base64.b32encode(digest).decode("ascii")[: _MAX_CONTROL_ID - 1]


def build_draft_oru(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    *,
    control_id: str,
    message_time: dt.datetime | None = None,
) -> str:
    """Build the ORU^R01 that carries the unverified AI draft (OBR-25/OBX-11 ``R``).

    Parameters
    ----------
    source
        The image the model read (header is enough): patient, order and study fields.
    result
        The draft text and its author.
    parties
        MSH-3 to MSH-6.
    control_id
        MSH-10: unique per send (see :func:`message_control_id`), 1-20 printable ASCII.
    message_time
        MSH-7 (timezone-aware); default now (UTC).

    Returns
    -------
    str
        The ER7 message, segments separated by CR, no MLLP framing; encode as UTF-8.

    Raises
    ------
    integration.errors.Hl7BuildError
        Empty impression, naive times, a bad control ID or a message hl7apy finds invalid.
    """
    return _build(source, result, parties, control_id, message_time, withdrawal_reason=None)


def build_withdrawal_oru(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    *,
    control_id: str,
    reason: str,
    message_time: dt.datetime | None = None,
) -> str:
    """Build the ORU^R01 that withdraws a draft sent earlier (OBR-25 ``C``, OBX-11 ``W``).

    Parameters
    ----------
    source, parties, message_time
        As for :func:`build_draft_oru` (same order numbers as the draft's message).
    result
        The draft as it was sent (its OBX lines are sent again, marked wrong, with the
        draft's OBX-14/OBX-19; OBR-22 is ``message_time``, the status change).
    control_id
        A new MSH-10, different from the draft message's.
    reason
        Why it is withdrawn (NTE; no patient data), e.g. ``"sent for the wrong study"``.

    Returns
    -------
    str
        The ER7 message (CR-separated segments).

    Raises
    ------
    integration.errors.Hl7BuildError
        As for :func:`build_draft_oru`, or an empty reason.
    """
    if not reason or not reason.strip():
        raise Hl7BuildError("a withdrawal needs a reason")
    return _build(source, result, parties, control_id, message_time, withdrawal_reason=reason)


def _build(
    source: Dataset,
    result: DraftResult,
    parties: Hl7Parties,
    control_id: str,
    message_time: dt.datetime | None,
    *,
    withdrawal_reason: str | None,
) -> str:
    """Build the ORU^R01 of a draft or, given ``withdrawal_reason``, of its withdrawal.

    Parameters
    ----------
    source, result, parties, control_id, message_time
        As for :func:`build_draft_oru`.
    withdrawal_reason
        ``None`` for the draft (OBR-25/OBX-11 ``R``); else the reason of the withdrawal
        (OBR-25 ``C``, OBX-11 ``W``, a "WITHDRAWN" NTE, OBR-22 the message time).

    Returns
    -------
    str
        The ER7 message, checked against hl7apy's HL7 v2.5.1 ORU_R01 structure (STRICT).

    Raises
    ------
    integration.errors.Hl7BuildError
        Invalid inputs (:func:`_check_inputs`), an empty Patient ID, or a message hl7apy
        finds invalid (its exception is not chained: it may quote patient data).
    """
    sent = message_time or dt.datetime.now(dt.UTC)
    _check_inputs(result, control_id, sent)
    withdraw = withdrawal_reason is not None
    obr_status = WITHDRAWN_RESULT_STATUS if withdraw else DRAFT_RESULT_STATUS
    obx_status = WITHDRAWN_OBSERVATION_STATUS if withdraw else DRAFT_OBSERVATION_STATUS
    report_ts = ts(result.report_time)
    # OBR-22 "Results Rpt/Status Chng": a withdrawal changes the status now (v2.5.1 7.4.1.22)
    status_ts = ts(sent) if withdraw else report_ts
    device = result.device_uid or default_device_uid(result.model_name, result.model_version)

    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    try:
        set_fields(msg.msh, _msh_fields(parties, control_id, sent), keep_empty=True)
        patient_result: Group = msg.add_group("ORU_R01_PATIENT_RESULT")
        add_patient(patient_result, source)
        order: Group = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
        add_order(order, source, report_ts=status_ts, status=obr_status)
        notes = _notices(result)
        add_note(order, _note_text(result, notes, withdrawal_reason))
        equipment = _equipment(result, device)
        lines = _observation_lines(result, notes)
        for set_id, (code, line) in enumerate(lines, start=1):
            add_observation(
                order, set_id, code, line, status=obx_status, time=report_ts, equipment=equipment
            )
        msg.validate()
        er7 = str(msg.to_er7())
    except Hl7BuildError:
        raise
    except Exception as exc:
        # hl7apy's messages quote the offending value (possibly patient data): not chained
        raise Hl7BuildError(
            f"the ORU^R01 does not fit the HL7 {VERSION} structure ({type(exc).__name__})"
        ) from None
    LOGGER.debug("built ORU^R01 %s (OBR-25 %s, %d OBX)", control_id, obr_status, len(lines))
    return er7


def _check_inputs(result: DraftResult, control_id: str, sent: dt.datetime) -> None:
    """Reject what the message cannot carry.

    Raises
    ------
    integration.errors.Hl7BuildError
        In this order: an empty impression; an MSH-10 that is not 1-20 printable ASCII
        characters (ST, v2.5.1 section 2.14.9.10) or holds a delimiter (section 2.5.4); a
        naive report or message time (every TS here carries its UTC offset); an empty model
        name or version.
    """
    if not result.impression or not result.impression.strip():
        raise Hl7BuildError("impression text is empty")
    if not re.fullmatch(r"[\x21-\x7e]{1,20}", control_id) or any(
        c in control_id for c in "|" + _ENCODING_CHARS
    ):
        raise Hl7BuildError("MSH-10 control ID must be 1-20 printable ASCII, no delimiters")
    for label, when in (("report_time", result.report_time), ("message_time", sent)):
        if when.tzinfo is None or when.utcoffset() is None:
            raise Hl7BuildError(f"{label} must be timezone-aware")
    for label, value in (("model_name", result.model_name), ("version", result.model_version)):
        if not value.strip():
            raise Hl7BuildError(f"{label} must not be empty")


def _msh_fields(parties: Hl7Parties, control_id: str, sent: dt.datetime) -> dict[str, str]:
    """MSH-3 to MSH-18 (HL7 v2.5.1 section 2.14.9).

    Returns
    -------
    dict
        MSH-3 to MSH-6 from ``parties`` (escaped; MSH-5/MSH-6 may be empty), MSH-7 ``sent``,
        MSH-9 ``ORU^R01^ORU_R01``, MSH-10 ``control_id``, MSH-11 ``P`` (production),
        MSH-12 the version, MSH-18 ``UNICODE UTF-8``; MSH-15/16 empty (original
        acknowledgment mode).
    """
    return {
        "msh_3": text_field(parties.sending_application),
        "msh_4": text_field(parties.sending_facility),
        "msh_5": text_field(parties.receiving_application),
        "msh_6": text_field(parties.receiving_facility),
        "msh_7": ts(sent),
        "msh_9": "ORU^R01^ORU_R01",
        "msh_10": control_id,
        "msh_11": "P",
        "msh_12": VERSION,
        "msh_18": "UNICODE UTF-8",
    }


def _notices(result: DraftResult) -> list[str]:
    """The draft notice, plus the DEMO notice for the DEMO model (NTE-3 and notice OBX)."""
    notes = [DRAFT_NOTICE.format(model=result.model_name, version=result.model_version)]
    if result.demo:
        notes.append(DEMO_NOTICE)
    return notes


def _note_text(result: DraftResult, notes: Sequence[str], withdrawal_reason: str | None) -> str:
    """NTE-3: the notices; for a withdrawal the "WITHDRAWN" notice and the reason instead.

    A withdrawal's OBX lines stay the draft's (marked ``W``); only the NTE says so.
    """
    if withdrawal_reason is None:
        return " ".join(notes)
    withdrawn = WITHDRAWN_NOTICE.format(model=result.model_name, version=result.model_version)
    return withdrawn + f" Reason: {withdrawal_reason.strip()}"


def _equipment(result: DraftResult, device: str) -> str:
    """OBX-18 (EI): model name and version ^ manufacturer ^ Device Observer UID ^ ``ISO``.

    The components are cut to the v2.5.1 lengths (EI.1 199, EI.2 20) and escaped.
    """
    components = (
        f"{result.model_name} {result.model_version}"[:199],
        result.manufacturer[:20],
        device,
        "ISO",
    )
    return "^".join(escape(v) for v in components)


def _observation_lines(result: DraftResult, notes: Sequence[str]) -> list[tuple[ObxCode, str]]:
    """One TX OBX per notice, findings line and impression line, in that order (OBX-3, OBX-5)."""
    lines: list[tuple[ObxCode, str]] = [(AI_NOTICE_CODE, line) for line in notes]
    lines += [(FINDINGS_CODE, line) for line in _lines(result.findings)]
    lines += [(IMPRESSION_CODE, line) for line in _lines(result.impression)]
    return lines


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]
