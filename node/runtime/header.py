"""The header of a received instance: the attributes the node records, read within bounds.

:func:`read_header` checks a received Part 10 file's structure (PS3.10 7.1; PS3.5 7.1, 7.5,
A.4, A.5) with :class:`node.runtime.dataset_walk.Walker` and returns the few attributes the
node records as a :class:`HeaderInfo`; :func:`header_priority` computes the job priority those
attributes ask for (:mod:`integration.priority`).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_preamble, read_sequence
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID

from integration.priority import PriorityRule, study_priority
from node.runtime.dataset_error import DataSetError, malformed
from node.runtime.dataset_source import DEFLATED, FileSource, InflateLimits, InflateSource
from node.runtime.dataset_walk import REQUEST_ATTRIBUTES, Walker

__all__ = ["HeaderInfo", "header_priority", "read_header"]

LOG = logging.getLogger(__name__)

# Attributes read from the data set; everything else (pixel data above all) is skipped.
_WANTED = {
    Tag(0x0008, 0x0005): "SpecificCharacterSet",
    Tag(0x0008, 0x0016): "SOPClassUID",
    Tag(0x0008, 0x0018): "SOPInstanceUID",
    Tag(0x0008, 0x0020): "StudyDate",
    Tag(0x0008, 0x0050): "AccessionNumber",
    Tag(0x0008, 0x0060): "Modality",
    Tag(0x0008, 0x1030): "StudyDescription",
    Tag(0x0008, 0x103E): "SeriesDescription",
    Tag(0x0018, 0x0015): "BodyPartExamined",
    Tag(0x0018, 0x5101): "ViewPosition",
    Tag(0x0010, 0x0010): "PatientName",
    Tag(0x0010, 0x0020): "PatientID",
    Tag(0x0020, 0x000D): "StudyInstanceUID",
    Tag(0x0020, 0x000E): "SeriesInstanceUID",
}
# What the job priority is computed from (integration.priority): the order's Requested
# Procedure Priority (PS3.3 C.4.11) and the attributes a site rule may look at (RULE_FIELDS
# but the calling AE, which is the association's)
_PRIORITY = 0x00401003  # Requested Procedure Priority, SH
_RULE_TAGS = {
    Tag(0x0008, 0x1010): "StationName",
    Tag(0x0008, 0x1040): "InstitutionalDepartmentName",
    Tag(0x0008, 0x0080): "InstitutionName",
    Tag(0x0008, 0x0090): "ReferringPhysicianName",
    Tag(0x0032, 0x1033): "RequestingService",
    Tag(0x0008, 0x1030): "StudyDescription",
    Tag(0x0008, 0x1080): "AdmittingDiagnosesDescription",
    Tag(0x0038, 0x0500): "PatientState",
}
_WANTED.update(_RULE_TAGS)
_WANTED[Tag(_PRIORITY)] = "RequestedProcedurePriority"
_REQUEST_ITEMS_MAX = 64  # items of the Request Attributes Sequence looked at
# A CS value (PS3.5 6.2): default-repertoire printable characters but backslash, <= 16 each
_CS_VALUE = re.compile(rb"[\x20-\x5b\x5d-\x7e]{0,16}")


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The attributes of a received data set that the node records (strings, ``""`` if absent).

    Parameters
    ----------
    transfer_syntax
        (0002,0010) of the file meta (= the presentation context's transfer syntax).
    sop_class_uid, sop_instance_uid, study_uid, series_uid
        (0008,0016), (0008,0018), (0020,000D), (0020,000E).
    modality, body_part_examined, study_description, series_description, view_position
        (0008,0060), (0018,0015), (0008,1030), (0008,103E), (0018,5101).
    accession_number, patient_name, patient_id, study_date
        (0008,0050), (0010,0010) (component groups joined by ``=``), (0010,0020),
        (0008,0020): the study's identity in the console; patient data, never logged.
    requested_procedure_priority
        (0040,1003) at the top level, as sent (``""`` if absent).
    request_priorities
        (0040,1003) of each item of the Request Attributes Sequence (0040,0275), in order
        (at most the first 64 items, and only when the sequence is at most 64 KiB).
    rule_attributes
        ``(keyword, text)`` of the attributes a priority rule may match
        (:data:`integration.priority.RULE_FIELDS`) that the data set carries, first value.
    """

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    body_part_examined: str
    study_description: str
    series_description: str
    view_position: str
    accession_number: str = ""
    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    requested_procedure_priority: str = ""
    request_priorities: tuple[str, ...] = ()
    rule_attributes: tuple[tuple[str, str], ...] = ()


def _as_text(raw: RawDataElement | None, encoding: str | list[str], *, first: bool = False) -> str:
    """The element's text: several values (PS3.5 6.2: a backslash delimits them) as written,
    joined by the backslash, or with ``first`` the first of them."""
    if raw is None or raw.value is None:
        return ""
    elem = convert_raw_data_element(raw, encoding=encoding)
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = (value[0] if value else "") if first else "\\".join(str(v) for v in value)
    return str(value).strip().rstrip("\x00").strip()


def _encoding(raw: RawDataElement | None) -> str | list[str]:
    """The Python encodings of (0008,0005) Specific Character Set (PS3.5 6.1.2.5).

    Raises
    ------
    DataSetError
        0xC210 when the element cannot be a CS value at all: another VR, a byte outside the
        default repertoire's printable characters, or a value longer than 16 characters
        (PS3.5 6.2). A printable but unknown term (``ISO_IR 999``, or a misspelling such as
        ``ISO-IR 100``) falls back to the default repertoire instead: only descriptions are
        decoded with it, and refusing a vendor's misspelling would stop a study for no gain.
    """
    if raw is None or not raw.value:
        return "iso8859"
    if raw.VR not in (None, "CS", "UN"):
        raise malformed(f"(0008,0005) Specific Character Set has VR {raw.VR}, not CS")
    value = bytes(raw.value).rstrip(b" \x00")
    terms = [t.strip(b" ") for t in value.split(b"\\")]
    if not all(_CS_VALUE.fullmatch(t) for t in terms):
        raise malformed("(0008,0005) Specific Character Set is not a valid CS value")
    names = [t.decode("ascii") for t in terms]
    if not all(n in python_encoding for n in names):
        return "iso8859"
    try:
        return convert_encodings(names)
    except Exception:  # a combination pydicom refuses: fall back as for an unknown term
        return "iso8859"


def read_header(path: Path, *, inflate: InflateLimits | None = None) -> HeaderInfo:
    """Check a received Part 10 file's structure and read the attributes the node records.

    Every element and item header is walked (PS3.5 7.1, 7.5; encapsulated pixel data, PS3.5
    A.4, fragment by fragment) so a truncated or malformed data set is refused here, while no
    value but the few recorded ones is ever read into memory. A deflated data set (PS3.5 A.5,
    A.7, A.12) is inflated as it is walked and never held whole; it may inflate to the
    ``inflate`` limits only.

    Parameters
    ----------
    path
        File written by the SCP: preamble, file meta (PS3.10 7.1), data set as received.
    inflate
        Limits for deflated data sets; default :class:`InflateLimits` ().

    Returns
    -------
    HeaderInfo

    Raises
    ------
    DataSetError
        Status 0xC210 when the file cannot be parsed, inflates past the limits or has an
        invalid (0008,0005) Specific Character Set.
    """
    limits = inflate or InflateLimits()
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            ts = _transfer_syntax(fh)
            walker = _walker(fh, ts, size=size, limits=limits)
            walker.dataset(implicit=walker.implicit)
        encoding = _encoding(walker.found.get(0x00080005))
    except DataSetError:
        raise
    except Exception as exc:  # pydicom raises assorted errors on garbage input
        raise malformed(f"data set cannot be parsed: {type(exc).__name__}") from exc
    return _header_info(ts, walker, encoding)


def _transfer_syntax(fh: BinaryIO) -> str:
    """Read the preamble and file meta (PS3.10 7.1); return (0002,0010) Transfer Syntax UID.

    ``fh`` is left at the first element of the data set.

    Raises
    ------
    DataSetError
        0xC210 when (0002,0000) File Meta Information Group Length does not end where the
        group 0002 elements do (the data set began with group 0002 elements), or when the
        Transfer Syntax UID is missing.
    """
    read_preamble(fh, force=False)
    meta: dict[int, RawDataElement] = {}
    for raw in data_element_generator(
        fh, False, True, stop_when=lambda tag, vr, length: tag.group != 2
    ):
        if isinstance(raw, RawDataElement):
            meta[int(raw.tag)] = raw
    group_length = meta.get(0x00020000)  # PS3.10 7.1, written by pynetdicom
    if group_length is not None and isinstance(group_length.value, bytes):
        end = group_length.value_tell + 4 + int.from_bytes(group_length.value, "little")
        if fh.tell() != end:  # the data set began with group 0002 elements
            raise malformed("file meta group length does not match its elements")
    ts = _as_text(meta.get(0x00020010), "iso8859")
    if not ts:
        raise malformed("file meta has no Transfer Syntax UID")
    return ts


def _walker(fh: BinaryIO, ts: str, *, size: int, limits: InflateLimits) -> Walker:
    """A walker of the data set that starts at ``fh``'s position, in transfer syntax ``ts``.

    A deflated data set (:data:`~node.runtime.dataset_source.DEFLATED`) is Explicit VR
    Little Endian once inflated (PS3.5 A.5); an unknown transfer syntax is read as Implicit
    VR Little Endian, the default (PS3.5 A.1).
    """
    if ts in DEFLATED:
        inflating = InflateSource(fh, limit=limits.for_size(size - fh.tell()))
        return Walker(inflating, implicit=False, little=True, wanted=_WANTED)
    uid = UID(ts)
    known = uid.is_transfer_syntax
    return Walker(
        FileSource(fh, size),
        implicit=bool(uid.is_implicit_VR) if known else True,
        little=bool(uid.is_little_endian) if known else True,
        wanted=_WANTED,
    )


def _header_info(ts: str, walker: Walker, encoding: str | list[str]) -> HeaderInfo:
    """The :class:`HeaderInfo` of a walked data set; a value that cannot be decoded is ``""``."""
    found = walker.found

    def uid(tag: int, *, first: bool = False) -> str:
        # as sent: a UID with a NUL inside is left for validate_uids to refuse
        try:
            return _as_text(found.get(tag), encoding, first=first)
        except Exception:
            return ""

    def text(tag: int, *, first: bool = False) -> str:
        # a NUL inside a text (pydicom strips trailing padding only) is no character of it,
        # and PostgreSQL cannot store one
        return uid(tag, first=first).replace("\x00", "")

    return HeaderInfo(
        transfer_syntax=ts,
        sop_class_uid=uid(0x00080016),
        sop_instance_uid=uid(0x00080018),
        study_uid=uid(0x0020000D),
        series_uid=uid(0x0020000E),
        modality=text(0x00080060),
        body_part_examined=text(0x00180015),
        study_description=text(0x00081030),
        series_description=text(0x0008103E),
        view_position=text(0x00185101),
        accession_number=text(0x00080050),
        patient_name=text(0x00100010),
        patient_id=text(0x00100020),
        study_date=text(0x00080020),
        requested_procedure_priority=text(_PRIORITY),
        request_priorities=_request_priorities(
            walker.request_attributes, little=walker.little, encoding=encoding
        ),
        rule_attributes=tuple(
            (keyword, v) for tag, keyword in _RULE_TAGS.items() if (v := text(tag, first=True))
        ),
    )


def _request_priorities(
    value: tuple[bytes, bool] | None, *, little: bool, encoding: str | list[str]
) -> tuple[str, ...]:
    """Requested Procedure Priority (0040,1003) of each Request Attributes Sequence item.

    The sequence's bytes were bounded by the walker; an item (or a sequence) that cannot be
    parsed gives nothing: the priority is a hint, never a reason to refuse an instance.
    """
    if value is None or not value[0]:
        return ()
    data, implicit = value
    try:
        items = read_sequence(io.BytesIO(data), implicit, little, len(data), encoding)
    except Exception as exc:  # pydicom raises assorted errors on garbage input
        LOG.debug("Request Attributes Sequence unreadable (%s); no order priority", type(exc))
        return ()
    out: list[str] = []
    for item in list(items)[:_REQUEST_ITEMS_MAX]:
        try:
            priority = item.get(_PRIORITY)
            text = "" if priority is None or priority.value is None else str(priority.value)
        except Exception:
            continue
        if text.strip():
            out.append(text.strip())
    return tuple(out)


def _element(keyword: str, value: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE)


def header_priority(
    header: HeaderInfo, *, calling_ae: str | None, rules: Iterable[PriorityRule] = ()
) -> int:
    """The job priority of the study ``header``'s instance belongs to; never raises.

    :func:`integration.priority.study_priority` on the attributes :func:`read_header` kept
    (the order's Requested Procedure Priority (0040,1003), PS3.3 C.4.11, top level and
    Request Attributes Sequence, and the attributes of
    :data:`integration.priority.RULE_FIELDS`) and the association's Calling AE Title
    (PS3.8 7.1.1).
    Anything unexpected gives 0 (routine): a priority never fails a C-STORE.
    """
    try:
        ds = Dataset()
        for keyword, value in header.rule_attributes:
            ds.add(_element(keyword, value))
        if header.requested_procedure_priority:
            ds.add(_element("RequestedProcedurePriority", header.requested_procedure_priority))
        if header.request_priorities:
            items = []
            for value in header.request_priorities:
                item = Dataset()
                item.add(_element("RequestedProcedurePriority", value))
                items.append(item)
            ds.add(
                DataElement(
                    REQUEST_ATTRIBUTES,
                    "SQ",
                    Sequence(items),
                    validation_mode=pydicom_config.IGNORE,
                )
            )
        return study_priority(ds, calling_ae=calling_ae, rules=rules)
    except Exception as exc:
        LOG.warning("job priority not computed (%s); routine (0)", type(exc).__name__)
        return 0
