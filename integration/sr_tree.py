"""An SR document's header and content tree, as a reader of it sees them.

Reads the SR Document General module (PS3.3 C.17.2: Completion, Verification and
Preliminary Flags, Content Date/Time, the Predecessor Documents Sequence) and walks the
SR Document Content module (PS3.3 C.17.3) depth first: each Content Item's Relationship
Type, Value Type, Concept Name and value (TEXT, CODE, NUM, DATETIME/DATE/TIME, UIDREF,
PNAME, IMAGE/COMPOSITE references, CONTAINER). For display only: nothing is interpreted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

__all__ = ["SrDocument", "SrItem", "read_sr"]

MAX_ITEMS = 5000  # a bound on what one document may unfold into
_TIME_KEYWORDS = {"DATETIME": "DateTime", "DATE": "Date", "TIME": "Time"}


@dataclass(frozen=True)
class SrItem:
    """One Content Item: ``relationship`` (0040,A010), ``value_type`` (0040,A040), the
    Concept Name's meaning (0040,A043), its value as text, and its children."""

    relationship: str
    value_type: str
    name: str
    value: str
    children: list[SrItem] = field(default_factory=list)


@dataclass(frozen=True)
class SrDocument:
    """The header and the root container of an SR document."""

    title: str
    sop_class_uid: str
    sop_instance_uid: str
    completion: str
    verification: str
    preliminary: str
    content_datetime: str
    predecessors: list[str]
    root: SrItem


def _code(seq: object) -> str:
    items = list(seq or [])  # type: ignore[call-overload]
    if not items:
        return ""
    code = items[0]
    meaning = str(code.get("CodeMeaning", "") or "")
    value = str(code.get("CodeValue", "") or code.get("LongCodeValue", "") or "")
    scheme = str(code.get("CodingSchemeDesignator", "") or "")
    return f"{meaning} ({scheme} {value})" if value else meaning


def _value(item: Dataset) -> str:
    vt = str(item.get("ValueType", ""))
    if vt == "TEXT":
        return str(item.get("TextValue", ""))
    if vt == "CODE":
        return _code(item.get("ConceptCodeSequence"))
    if vt == "NUM":
        measured = list(item.get("MeasuredValueSequence", []) or [])
        if not measured:
            return ""
        m = measured[0]
        return f"{m.get('NumericValue', '')} {_code(m.get('MeasurementUnitsCodeSequence'))}"
    if vt in _TIME_KEYWORDS:
        return str(item.get(_TIME_KEYWORDS[vt], "") or "")
    if vt == "UIDREF":
        return str(item.get("UID", ""))
    if vt == "PNAME":
        return str(item.get("PersonName", ""))
    if vt in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        refs = list(item.get("ReferencedSOPSequence", []) or [])
        return ", ".join(str(r.get("ReferencedSOPInstanceUID", "")) for r in refs)
    return ""


def _walk(item: Dataset, budget: list[int]) -> SrItem:
    budget[0] -= 1
    children = []
    for child in item.get("ContentSequence", []) or []:
        if budget[0] <= 0:
            break
        children.append(_walk(child, budget))
    return SrItem(
        relationship=str(item.get("RelationshipType", "") or ""),
        value_type=str(item.get("ValueType", "") or ""),
        name=_code(item.get("ConceptNameCodeSequence")),
        value=_value(item),
        children=children,
    )


def read_sr(ds: Dataset) -> SrDocument:
    """The document's header and content tree (at most :data:`MAX_ITEMS` items).

    Raises
    ------
    ValueError
        When ``ds`` is not an SR document (no Value Type CONTAINER at the root).
    """
    if str(ds.get("ValueType", "")) != "CONTAINER":
        raise ValueError("not an SR document: the root Content Item is not a CONTAINER")
    root = _walk(ds, [MAX_ITEMS])
    predecessors = [
        str(inst.get("ReferencedSOPInstanceUID", ""))
        for study in ds.get("PredecessorDocumentsSequence", []) or []
        for series in study.get("ReferencedSeriesSequence", []) or []
        for inst in series.get("ReferencedSOPSequence", []) or []
    ]
    return SrDocument(
        title=root.name,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        completion=str(ds.get("CompletionFlag", "")),
        verification=str(ds.get("VerificationFlag", "")),
        preliminary=str(ds.get("PreliminaryFlag", "")),
        content_datetime=f"{ds.get('ContentDate', '')} {ds.get('ContentTime', '')}".strip(),
        predecessors=predecessors,
        root=root,
    )
