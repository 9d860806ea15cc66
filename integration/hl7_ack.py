"""Acknowledgments (ACK) of the HL7 v2 result messages: reading MSA/ERR and judging them.

ACK handling (:func:`check_ack`, MSA-1 from HL7 table 0008, ERR-3 from table 0357):

| MSA-1 | ERR-3 | Outcome |
|---|---|---|
| AA, CA | any | delivered |
| AE, CE | 206 record locked, 207 application internal error | transient failure |
| AE, CE | other or none | permanent failure (the same message fails again) |
| AR, CR | 200-203 unsupported message type / event / processing ID / version | permanent |
| AR, CR | other or none (receiver down, internal reasons) | transient failure |
| none, unknown, MSA-2 not our control ID, not HL7 | - | transient failure |

MSA-3 and ERR-8 are free text the receiver wrote and may quote the message (patient data):
they are kept in :attr:`Hl7Ack.text` and never put into an exception message or a log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from integration.errors import Hl7AckError

__all__ = ["ACCEPTED_ACK_CODES", "Hl7Ack", "check_ack", "parse_ack"]

# the name these log lines had before they left integration.hl7_oru (log filters)
LOGGER = logging.getLogger("integration.hl7_oru")

ACCEPTED_ACK_CODES = frozenset({"AA", "CA"})
_PERMANENT_REJECT = frozenset({"200", "201", "202", "203"})  # table 0357: unsupported ...
_TRANSIENT_ERROR = frozenset({"206", "207"})  # table 0357: record locked, internal error


@dataclass(frozen=True, slots=True)
class Hl7Ack:
    """An acknowledgment (ACK) as received.

    Attributes
    ----------
    code
        MSA-1 (table 0008: AA, AE, AR, CA, CE, CR).
    control_id
        MSA-2, the control ID of the message acknowledged.
    error_codes
        ERR-3 identifiers (table 0357), or the code component of ERR-1 / MSA-6 in older
        versions.
    text
        MSA-3 and ERR-8 texts joined (may quote patient data: never log it).
    """

    code: str
    control_id: str
    error_codes: tuple[str, ...] = ()
    text: str = ""

    @property
    def accepted(self) -> bool:
        """Whether MSA-1 is AA (application accept) or CA (commit accept)."""
        return self.code in ACCEPTED_ACK_CODES


def parse_ack(raw: bytes | str) -> Hl7Ack:
    """Read MSA and ERR of an HL7 v2 ACK (any v2.x; MLLP framing bytes are ignored).

    Parameters
    ----------
    raw
        The reply as received (bytes are decoded as UTF-8, invalid bytes replaced).

    Returns
    -------
    Hl7Ack
        MSA-1, MSA-2, ERR-3 codes (or ERR-1/MSA-6 codes), MSA-3/ERR-8 texts.

    Raises
    ------
    integration.errors.Hl7AckError
        Transient: no MSH segment, no MSA segment or an empty MSA-1.
    """
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.strip("\x0b\x1c\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7AckError("the reply is not an HL7 v2 message", ack_code=None, transient=True)
    field_sep = text[3]
    component_sep = text[4]
    subcomponent_sep = text[7] if len(text) > 7 and text[7] != field_sep else "&"
    segments = [s for s in re.split(r"[\r\n]+", text) if s]
    msa = next((s.split(field_sep) for s in segments if s.startswith("MSA" + field_sep)), None)
    if msa is None or len(msa) < 2 or not msa[1].strip():
        raise Hl7AckError("the reply has no MSA segment / MSA-1", ack_code=None, transient=True)

    def component(fields: list[str], index: int, comp: int = 0) -> str:
        if index >= len(fields):
            return ""
        parts = fields[index].split(component_sep)
        return parts[comp].strip() if comp < len(parts) else ""

    codes: list[str] = []
    texts = [msa[3].strip()] if len(msa) > 3 and msa[3].strip() else []
    if component(msa, 6):
        codes.append(component(msa, 6))
    for segment in segments:
        if not segment.startswith("ERR" + field_sep):
            continue
        err = segment.split(field_sep)
        code = component(err, 3)
        if not code:  # v2.3-2.4: ERR-1 (ELD) segment^sequence^field^code&text&system
            code = component(err, 1, 3).split(subcomponent_sep)[0].strip()
        if code:
            codes.append(code)
        if len(err) > 8 and err[8].strip():
            texts.append(err[8].strip())
    return Hl7Ack(
        code=msa[1].strip().upper(),
        control_id=component(msa, 2),
        error_codes=tuple(codes),
        text=" | ".join(texts),
    )


def check_ack(raw: bytes | str, *, control_id: str) -> Hl7Ack:
    """Decide whether the receiver took the message (see the table in the module text).

    Parameters
    ----------
    raw
        The reply (e.g. from :func:`integration.mllp.send_mllp`).
    control_id
        MSH-10 of the message sent; MSA-2 must equal it.

    Returns
    -------
    Hl7Ack
        The ACK, when MSA-1 is AA or CA.

    Raises
    ------
    integration.errors.Hl7AckError
        AE/AR/CE/CR (``transient`` per the table), or a malformed, foreign or empty ACK
        (transient). Its message names MSA-1, the control ID and ERR-3 codes only.
    """
    ack = parse_ack(raw)
    if ack.control_id != control_id:
        raise Hl7AckError(
            f"the ACK acknowledges control ID {ack.control_id!r}, not {control_id!r}",
            ack_code=ack.code,
            error_codes=ack.error_codes,
            transient=True,
        )
    if ack.accepted:
        LOGGER.info("HL7 message %s accepted (MSA-1 %s)", control_id, ack.code)
        return ack
    codes = set(ack.error_codes)
    if ack.code in ("AE", "CE"):
        transient = bool(codes & _TRANSIENT_ERROR)
    elif ack.code in ("AR", "CR"):
        transient = not codes & _PERMANENT_REJECT
    else:
        transient = True
    kind = "transient" if transient else "permanent"
    LOGGER.warning(
        "HL7 message %s not accepted: MSA-1 %s, ERR-3 %s (%s)",
        control_id,
        ack.code,
        ",".join(ack.error_codes) or "-",
        kind,
    )
    raise Hl7AckError(
        f"HL7 message {control_id} not accepted: MSA-1 {ack.code}"
        + (f", error codes {','.join(ack.error_codes)}" if ack.error_codes else "")
        + f" ({kind})",
        ack_code=ack.code,
        error_codes=ack.error_codes,
        transient=transient,
        detail=ack.text,
    )
