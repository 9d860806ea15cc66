"""The HL7 v2.5.1 acknowledgment (ACK) the MLLP listener answers each message with.

:func:`build_ack` builds the ACK of original acknowledgment mode (HL7 v2.5.1 section
2.9.2: MSH, MSA and, for AE/AR, ERR) for any received message, echoing whatever of its MSH
can be read (:func:`integration.hl7_fields.read_msh`): MSH-3/4 become MSH-5/6, MSH-9.2 the
event, MSH-10 MSA-2, MSH-11 and MSH-18 are kept. hl7apy builds it and validates it against
its 2.5.1 ACK structure at STRICT level; an echoed value hl7apy refuses is left out (logged
by exception type only) rather than failing the answer. :data:`ERROR_TEXTS` is HL7 table
0357, the ERR-3 codes. The MLLP framing (HL7 v2 appendix C) is the listener's
(:mod:`integration.mllp_listener`).

Privacy: the reason goes into MSA-3/ERR-8 and must not quote the message; log lines carry
exception type names only.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from integration.hl7_fields import MshHeader, clean_text, read_msh
from integration.hl7_values import escape, ts

__all__ = ["ERROR_TEXTS", "build_ack"]

# the name these log lines had before they left integration.mllp_listener (log filters)
LOGGER = logging.getLogger("integration.mllp_listener")

VERSION = "2.5.1"
ERROR_TEXTS = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
"""HL7 table 0357 "Message error condition codes" (v2.5.1): ERR-3 identifier and text."""
_MAX_TEXT = 80  # MSA-3 (ST) and ERR-8 (TX) lengths in v2.5.1


def build_ack(
    incoming_er7: str,
    ack_code: str,
    *,
    err_code: str | None = None,
    reason: str | None = None,
    application: str = "CXR-NODE",
    facility: str = "",
) -> str:
    """Build the HL7 v2.5.1 ACK for a message (HL7 v2.5.1 sections 2.9.2, 2.14.1, 2.15.5).

    Parameters
    ----------
    incoming_er7
        The message acknowledged; whatever of its MSH can be read is used (a message
        without a readable MSH-10 gives an empty MSA-2: there is nothing to echo, and
        a made-up value would mislead the sender; a STRICT parser reports it missing).
    ack_code
        MSA-1 (table 0008): ``"AA"``, ``"AE"`` or ``"AR"``.
    err_code
        ERR-3 identifier (table 0357); required for AE/AR, not allowed with AA.
    reason
        MSA-3 and ERR-8 text (cut to 80 characters, escaped); default the table 0357 text.
    application, facility
        MSH-3 and MSH-4 of the ACK (this node), as ER7 HD values (``namespace`` or
        ``namespace^universal id^type``).

    Returns
    -------
    str
        ``MSH|^~\\&|<application>|<facility>|<incoming MSH-3>|<incoming MSH-4>|<now>||
        ACK^<event>^ACK|<new id>|<incoming MSH-11 or P>|2.5.1`` (+ MSH-18 echoed),
        ``MSA|<code>|<incoming MSH-10>[|<reason>]`` and, for AE/AR,
        ``ERR|||<code>^<text>^HL70357|E||||<reason>``; segments end with CR, no framing.
        Built with hl7apy and validated against its 2.5.1 ACK structure.

    Raises
    ------
    ValueError
        Unknown ``ack_code``, missing or superfluous ``err_code``.
    """
    if ack_code not in ("AA", "AE", "AR"):
        raise ValueError(f"ack_code must be AA, AE or AR, got {ack_code!r}")
    if (ack_code == "AA") != (err_code is None):
        raise ValueError("err_code is required with AE/AR and not allowed with AA")
    header = read_msh(incoming_er7)
    text = None
    if err_code is not None:
        text = escape(clean_text(reason or ERROR_TEXTS.get(err_code, "Error"))[:_MAX_TEXT])
    for values in (header, MshHeader(control_id=header.control_id)):
        try:
            return _ack(values, ack_code, err_code, text, application, facility)
        except Exception as exc:  # an echoed value hl7apy refuses (e.g. longer than ST)
            LOGGER.warning("ACK without some echoed MSH fields (%s)", type(exc).__name__)
    return _ack(MshHeader(), ack_code, err_code, text, application, facility)


def _ack(
    header: MshHeader,
    ack_code: str,
    err_code: str | None,
    text: str | None,
    application: str,
    facility: str,
) -> str:
    """The ACK as hl7apy builds it at STRICT validation (see :func:`build_ack`)."""
    ack = Message("ACK", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = ack.msh
    msh.msh_3 = clean_text(application)
    if facility:
        msh.msh_4 = clean_text(facility)
    if header.sender:
        msh.msh_5 = header.sender
    if header.sender_facility:
        msh.msh_6 = header.sender_facility
    msh.msh_7 = ts(dt.datetime.now(dt.UTC))
    msh.msh_9 = f"ACK^{header.event}^ACK"
    msh.msh_10 = "A" + uuid.uuid4().hex[:19].upper()  # ST, 20 characters in v2.5.1
    msh.msh_11 = header.processing_id
    msh.msh_12 = VERSION
    if header.charset:
        msh.msh_18 = header.charset
    ack.msa.msa_1 = ack_code
    ack.msa.msa_2 = escape(header.control_id)
    if err_code is not None:
        ack.msa.msa_3 = text
        err = ack.add_segment("ERR")
        err.err_3 = f"{err_code}^{escape(ERROR_TEXTS.get(err_code, 'Error'))}^HL70357"
        err.err_4 = "E"  # table 0516: error
        err.err_8 = text
    ack.validate()
    return str(ack.to_er7())
