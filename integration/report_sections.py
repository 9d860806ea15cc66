"""The findings and impression sections of a report text or an SR content tree.

A section is known by its code (CID 7001/7002 of PS3.16, as TID 2000 uses them, and the
LOINC codes HL7 result messages use): FINDINGS are headings/items coded (121070, DCM)
"Findings", (121071, DCM) "Finding" or LOINC 59776-5; IMPRESSION (121072, DCM),
(121073, DCM) or LOINC 19005-8. A plain text has ``FINDINGS:`` / ``IMPRESSION:`` line
headings instead (:func:`split_sections`). An SR content tree (PS3.3 C.17.3) is walked in
document order by :func:`sr_sections`: CONTAINERs open a section, observation context items
are skipped, TEXT values (and the CODE values of a findings section) are its lines, any NUL
in them left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataset import Dataset

from integration.header_values import header_text

__all__ = [
    "FINDINGS_CODES",
    "IMPRESSION_CODES",
    "Section",
    "join_sections",
    "section_kind",
    "split_sections",
    "sr_sections",
]

FINDINGS_CODES = frozenset({("121070", "DCM"), ("121071", "DCM"), ("59776-5", "LN")})
IMPRESSION_CODES = frozenset({("121072", "DCM"), ("121073", "DCM"), ("19005-8", "LN")})
_CONTEXT_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT"})
_HEADING = re.compile(
    r"^\s*(?P<name>findings|impressions?|conclusions?|history|clinical history|indications?"
    r"|technique|comparison|recommendations?|procedure)\s*(?::\s*(?P<rest>.*)|$)",
    re.IGNORECASE,
)


Section = tuple[str | None, str | None, list[str]]
"""One section of an SR: (heading label, ``"findings"``/``"impression"``/``None``, lines)."""


def sr_sections(ds: Dataset) -> list[Section]:
    """TEXT (and finding CODE) values of the content tree by heading, in document order."""
    root: Section = (None, None, [])
    sections: list[Section] = [root]
    _walk(ds.get("ContentSequence") or [], root, sections)
    return [section for section in sections if section[2]]


def _walk(items: Iterable[Dataset], heading: Section, sections: list[Section]) -> None:
    """Depth-first walk (PS3.3 C.17.3): CONTAINERs open a section, context items are skipped."""
    for item in items:
        if header_text(item, "RelationshipType").upper() in _CONTEXT_RELATIONSHIPS:
            continue
        value_type = header_text(item, "ValueType").upper()
        name = (item.get("ConceptNameCodeSequence") or [Dataset()])[0]
        kind = section_kind(
            header_text(name, "CodeValue"), header_text(name, "CodingSchemeDesignator")
        )
        children = item.get("ContentSequence") or []
        if value_type == "CONTAINER":
            label = header_text(name, "CodeMeaning") or None
            section: Section = (label, kind or heading[1], [])
            sections.append(section)
            _walk(children, section, sections)
            continue
        value = ""
        if value_type == "TEXT":
            value = header_text(item, "TextValue")
        elif value_type == "CODE" and (kind or heading[1]) == "findings":
            value = header_text((item.get("ConceptCodeSequence") or [Dataset()])[0], "CodeMeaning")
        value = value.replace("\x00", "")  # a NUL is no text (PostgreSQL cannot store one)
        if value:
            target = heading
            if kind and heading[1] is None:  # e.g. an Impression TEXT right under the root
                if sections[-1][:2] != (None, kind):
                    sections.append((None, kind, []))
                target = sections[-1]
            target[2].append(value)
        _walk(children, heading, sections)


def section_kind(code: str, scheme: str) -> str | None:
    """``"findings"``, ``"impression"`` or ``None`` for a coded concept (CID 7001/7002)."""
    key = (code, "LN" if scheme.upper() == "LOINC" else scheme.upper())
    return (
        "findings" if key in FINDINGS_CODES else "impression" if key in IMPRESSION_CODES else None
    )


def join_sections(sections: list[Section]) -> tuple[str, str | None, str | None]:
    """(whole text ``"FINDINGS: ...\\nIMPRESSION: ..."``, findings, impression)."""
    parts: list[str] = []
    found: dict[str, list[str]] = {"findings": [], "impression": []}
    for label, kind, lines in sections:
        body = "\n".join(lines)
        heading = kind.upper() if kind else (label or "").upper()
        parts.append(f"{heading}: {body}" if heading else body)
        if kind:
            found[kind].append(body)
    return (
        "\n".join(parts),
        "\n".join(found["findings"]) or None,
        "\n".join(found["impression"]) or None,
    )


def split_sections(text: str) -> tuple[str | None, str | None]:
    """(FINDINGS, IMPRESSION) of a plain text by its line headings, ``None`` when absent.

    A heading is ``NAME:`` at the start of a line (text may follow) or a line that is only
    ``NAME``; a section runs to the next heading (history, technique, ... end it too).
    """
    found: dict[str, list[str]] = {"findings": [], "impression": []}
    current: str | None = None
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            name = match.group("name").lower()
            current = "impression" if name.startswith("impression") else None
            current = "findings" if name == "findings" else current
            line = match.group("rest") or ""
        if current is not None and line.strip():
            found[current].append(line.strip())
    return "\n".join(found["findings"]) or None, "\n".join(found["impression"]) or None
