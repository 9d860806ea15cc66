"""Reading fields of received HL7 v2 messages (v2.5.1 chapter 2; ORU^R01 of chapter 7).

Two readers, for two needs:

- :func:`read_msh` reads the MSH by position, tolerating a damaged message, for what an
  acknowledgment must echo (MSH-3, -4, -9, -10, -11, -18; section 2.14.9) and for the MLLP
  listener's checks (:mod:`integration.mllp_listener`, :mod:`integration.mllp_ack`);
- :class:`Hl7Segment` gives the raw field values of a segment hl7apy parsed, as the sender
  escaped them, and :func:`unescape` undoes the escape sequences (section 2.7); with them
  :func:`oru_text`, :func:`oru_study_uid` and :func:`oru_signed_at` read a final report's
  text, Study Instance UID and signing time out of an ORU^R01
  (:func:`integration.final_report.final_report_from_oru`).

:func:`cr_segments` makes CR the segment terminator (section 2.5.1) of a message whose
segments end with CR, LF or CRLF. Nothing here logs or quotes message content.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from hl7apy.core import Message

from integration.dicom_times import dicom_datetime
from integration.report_sections import section_kind

__all__ = [
    "CHARSET_CODECS",
    "STUDY_CODE",
    "Hl7Segment",
    "MshHeader",
    "clean_text",
    "cr_segments",
    "oru_signed_at",
    "oru_study_uid",
    "oru_text",
    "read_msh",
    "unescape",
]

STUDY_CODE = ("113014", "DCM")  # "DICOM Study" (CID 7001 / IHE RAD): OBX carrying the UID
CHARSET_CODECS = {
    "": "utf-8",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}  # HL7 table 0211 (MSH-18) -> Python codec
_TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST"})  # HL7 table 0125
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def cr_segments(er7: str) -> str:
    """``er7`` with CR as every segment terminator (CRLF and LF become CR, section 2.5.1)."""
    return re.sub(r"\r\n|\n|\r", "\r", er7)


@dataclass(frozen=True)
class MshHeader:
    """What could be read of an incoming MSH (values still in the sender's encoding).

    Every value is as :func:`read_msh` found it, without control characters; an empty
    string where the field is absent or unreadable (MSH-11 then ``P``).
    """

    sender: str = ""  # MSH-3 (HD), our delimiters
    sender_facility: str = ""  # MSH-4 (HD)
    message_type: str = ""  # MSH-9.1
    event: str = ""  # MSH-9.2
    control_id: str = ""  # MSH-10
    processing_id: str = "P"  # MSH-11.1
    charset: str = ""  # MSH-18


def read_msh(er7: str) -> MshHeader:
    """Read MSH-3, -4, -9, -10, -11 and -18 by position, tolerating a damaged message.

    The first segment must start with ``MSH`` (after MLLP start block and white space);
    MSH-1 is the character after it, the component separator the first of MSH-2 (section
    2.14.9). HD values (MSH-3, MSH-4) keep three components and lose any delimiter;
    MSH-10 is the value, its escape sequences (section 2.7, in the sender's MSH-2) undone;
    MSH-11 is ``P``, ``T`` or ``D`` (table 0103), else ``P``; MSH-18 is kept only when it
    is one of :data:`CHARSET_CODECS`. Never raises: an unreadable MSH gives
    ``MshHeader()``.
    """
    first = re.split(r"[\r\n]+", er7.lstrip("\x0b\r\n \t"), maxsplit=1)[0]
    if not first.startswith("MSH") or len(first) < 8:
        return MshHeader()
    fields = first.split(first[3])
    component = fields[1][:1] or "^"
    encoding = {  # MSH-1 and MSH-2, for the escape sequences of MSH-10 (section 2.7)
        "FIELD": first[3],
        "COMPONENT": component,
        "REPETITION": fields[1][1:2] or "~",
        "ESCAPE": fields[1][2:3] or "\\",
        "SUBCOMPONENT": fields[1][3:4] or "&",
    }

    def value(number: int) -> list[str]:
        raw = fields[number - 1] if number - 1 < len(fields) else ""
        return [clean_text(part) for part in raw.split(component)]

    def hd(number: int) -> str:  # HD: namespace^universal id^type, in our delimiters
        parts = [re.sub(r"[|^~\\&]", "", part) for part in value(number)[:3]]
        return "^".join(parts).rstrip("^")

    processing = value(11)[0].upper()
    return MshHeader(
        sender=hd(3),
        sender_facility=hd(4),
        message_type=value(9)[0],
        event=re.sub(r"[^A-Za-z0-9]", "", [*value(9), ""][1])[:3].upper(),
        control_id=clean_text(unescape(value(10)[0], encoding)),
        processing_id=processing if processing in ("P", "T", "D") else "P",
        charset=value(18)[0] if value(18)[0] in CHARSET_CODECS else "",
    )


def clean_text(text: str) -> str:
    """``text`` without control characters (CR, LF, MLLP block bytes), stripped."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


class Hl7Segment:
    """Raw field values of an hl7apy segment, as the sender escaped them.

    Parameters
    ----------
    segment
        A segment of ``message`` as hl7apy's flat parse gives it (Z segments included).
    message
        The parsed message: its encoding characters (MSH-1, MSH-2) are the segment's.
    """

    def __init__(self, segment: object, message: Message) -> None:
        self.name = str(getattr(segment, "name", ""))
        chars = dict(message.encoding_chars)
        self.component = chars["COMPONENT"]
        self.escape = {k: chars[k] for k in ("FIELD", "COMPONENT", "SUBCOMPONENT", "REPETITION")}
        self.escape["ESCAPE"] = chars["ESCAPE"]
        # hl7apy re-escapes a lone escape character on to_er7 ("\.br\" -> "\E\.br\E\");
        # with an escape character that never occurs its output is the received text
        raw = {**chars, "ESCAPE": "\x00"}
        self.fields: dict[int, list[str]] = {}
        for child in getattr(segment, "children", []):
            number = str(child.name).rsplit("_", 1)[-1]
            if number.isdigit():
                self.fields.setdefault(int(number), []).append(child.to_er7(encoding_chars=raw))

    def repetitions(self, number: int) -> list[str]:
        """Every repetition of field ``number``, still escaped."""
        return self.fields.get(number, [])

    def components(self, number: int) -> list[str]:
        """The unescaped components of the first repetition (at least one, maybe ``""``);
        a NUL (``\\X00\\``, padding) is left out, as in :func:`oru_text`."""
        first = (self.repetitions(number) or [""])[0]
        return [
            unescape(c, self.escape).replace("\x00", "").strip()
            for c in first.split(self.component)
        ]

    def text(self, number: int) -> str:
        """The first component of field ``number``, unescaped."""
        return self.components(number)[0]


def unescape(value: str, chars: dict[str, str] | None = None) -> str:
    """Undo HL7 v2 escape sequences (v2.5.1 section 2.7) in a TX/FT/ST value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the delimiters, ``\\Xhh..\\`` the bytes (UTF-8,
    else Latin-1), ``\\.br\\``, ``\\.sp\\`` and ``\\.ce\\`` a line break; highlighting,
    character-set and other formatting sequences are dropped.
    """
    chars = chars or {"FIELD": "|", "COMPONENT": "^", "SUBCOMPONENT": "&", "REPETITION": "~"}
    esc = chars.get("ESCAPE", "\\")
    names = {"F": "FIELD", "S": "COMPONENT", "T": "SUBCOMPONENT", "R": "REPETITION"}

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body in names:
            return chars[names[body]]
        if body == "E":
            return esc
        if body.startswith((".br", ".sp", ".ce")):
            count = body[3:].strip().lstrip("+")
            return "\n" * (int(count) if body.startswith(".sp") and count.isdigit() else 1)
        if body.startswith("X") and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", body[1:]):
            data = bytes.fromhex(body[1:])
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data.decode("latin-1")
        return ""  # \H\ \N\ \Cxxyy\ \Mxxyyzz\ \Zxxx\ and other formatting commands

    pattern = re.escape(esc) + "([^" + re.escape(esc) + "]*)" + re.escape(esc)
    return re.sub(pattern, replace, value)


def oru_text(segments: list[Hl7Segment]) -> list[tuple[str | None, str]]:
    """[(section kind by OBX-3, line)] of the TX/FT/ST OBX; OBX-5 repetitions are lines.

    The 113014 OBX (study UID) and OBX-11 ``W`` (wrong) / ``D`` (deleted, table 0085) are
    skipped. A NUL (``\\X00\\``, or a legacy system's padding) is no text and is left out
    (a PostgreSQL text value cannot hold one).
    """
    lines: list[tuple[str | None, str]] = []
    for obx in (s for s in segments if s.name == "OBX"):
        code = [*obx.components(3), "", "", ""]
        if obx.text(2).upper() not in _TEXT_VALUE_TYPES or (code[0], code[2]) == STUDY_CODE:
            continue
        if obx.text(11).upper() in ("W", "D"):
            continue
        kind = section_kind(code[0], code[2]) or section_kind(
            code[3], code[5] if len(code) > 5 else ""
        )
        for repetition in obx.repetitions(5):
            value = unescape(repetition, obx.escape).replace("\x00", "").strip("\n")
            lines.extend((kind, line.rstrip()) for line in value.split("\n"))
    while lines and not lines[-1][1].strip():
        lines.pop()
    return lines


def oru_study_uid(segments: list[Hl7Segment]) -> str | None:
    """ZDS-1 (RP, IHE RAD TF-2), else OBX-5 of an RP/ST/HD OBX coded 113014^DICOM Study^DCM."""
    candidates = [s.text(1) for s in segments if s.name == "ZDS"]
    for obx in (s for s in segments if s.name == "OBX"):
        code = [*obx.components(3), "", "", ""]
        if (code[0], code[2]) == STUDY_CODE and obx.text(2).upper() in ("RP", "ST", "HD"):
            candidates.append(obx.text(5))
    return next((uid for uid in candidates if len(uid) <= 64 and _UID.fullmatch(uid)), None)


def oru_signed_at(
    msh: Hl7Segment, obr: Hl7Segment, segments: list[Hl7Segment]
) -> dt.datetime | None:
    """OBR-22, else the first OBX-14, else MSH-7 (TS, first component), in UTC."""
    values = [obr.text(22)]
    values += [s.text(14) for s in segments if s.name == "OBX" and s.text(14)][:1]
    values.append(msh.text(7))
    parsed = (dicom_datetime(v, dt.UTC) for v in values)  # HL7 DTM is DICOM DT syntax
    return next((when for when in parsed if when is not None), None)
