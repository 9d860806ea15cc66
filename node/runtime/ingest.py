"""Ingest: the node's :class:`~integration.scp.InstanceSink` (spool + SQL) for the storage SCP.

For each received instance, in this order (architecture: "durability first"):

1. read the data set's structure, without pixel data in memory, and the few attributes the
   node records; refuse a truncated or malformed data set, a deflated one that inflates past
   the limits (``deflate_max_ratio``, ``deflate_max_inflated_mb``) and an invalid Specific
   Character Set (0xC210, :func:`read_header`);
2. check the UIDs (0xA900-0xA903);
3. check free space against ``min_free_disk_mb`` on every file system the node writes to:
   the spool, its staging folder, ``outputs``, the SQLite database's folder (0xA700,
   transient; :meth:`node.runtime.spool.Spool.check_free`);
4. spool the file: fsync, atomic rename, fsync the directory (:mod:`node.runtime.spool`);
5. record it in SQL and commit (:func:`node.db.studies.record_instance_detailed`); if
   that fails (database down: 0xA701, transient) the just-spooled file is removed again;
6. only then answer 0x0000.

Duplicate SOP Instance UIDs (policy, also in ``CONFORMANCE.md``): identical content answers
success and changes nothing; different content is stored as a new file, the SQL row is
switched to it in the same commit, then the old file is deleted ("newest wins").
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_preamble, read_sequence
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from integration.priority import PriorityRule, study_priority
from integration.scp import ReceivedMeta, StoreResult
from integration.status import StoreStatus
from node import metrics
from node.runtime.spool import Spool, SpooledFile, SpoolError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "DataSetError",
    "HeaderInfo",
    "InflateLimits",
    "IngestSink",
    "header_priority",
    "read_header",
]

LOG = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MIB = 1 << 20

# Attributes read from the data set; everything else (pixel data above all) is skipped.
_WANTED = {
    Tag(0x0008, 0x0005): "SpecificCharacterSet",
    Tag(0x0008, 0x0016): "SOPClassUID",
    Tag(0x0008, 0x0018): "SOPInstanceUID",
    Tag(0x0008, 0x0060): "Modality",
    Tag(0x0008, 0x1030): "StudyDescription",
    Tag(0x0008, 0x103E): "SeriesDescription",
    Tag(0x0018, 0x0015): "BodyPartExamined",
    Tag(0x0018, 0x5101): "ViewPosition",
    Tag(0x0020, 0x000D): "StudyInstanceUID",
    Tag(0x0020, 0x000E): "SeriesInstanceUID",
}
# What the job priority is computed from (integration.priority): the order's Requested
# Procedure Priority (PS3.3 C.4.11) and the attributes a site rule may look at (RULE_FIELDS
# but the calling AE, which is the association's)
_PRIORITY = 0x00401003  # Requested Procedure Priority, SH
_REQUEST_ATTRIBUTES = 0x00400275  # Request Attributes Sequence, SQ (PS3.3 C.4.11 / C.7.3.1)
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
_DEFER = 1024  # bytes: larger values are skipped with a seek, never read
# bytes of the Request Attributes Sequence kept to read its items' priority (a real one has
# a few hundred); a longer sequence is walked and skipped as any other, its priority unread
_REQUEST_ATTRIBUTES_MAX = 64 * 1024
_REQUEST_ITEMS_MAX = 64  # items of it looked at

# Transfer syntaxes whose data set is deflated (raw deflate, RFC 1951): PS3.5 A.5 (Deflated
# Explicit VR Little Endian), A.7 (JPIP Referenced Deflate), A.12 (JPIP HTJ2K Referenced
# Deflate); pydicom 3.0's UID.is_deflated knows the first only.
_DEFLATED = frozenset(
    {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
_INFLATE_IN = 1 << 16  # deflated bytes read from the file at a time
_INFLATE_OUT = 1 << 20  # inflated bytes produced at a time (the most ever held)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # PS3.5 7.5
# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_DEPTH = 32  # nested sequences; a radiograph has 2 or 3
_MAX_HEADERS = 1_000_000  # element and item headers in one data set; a radiograph has < 10,000
# A CS value (PS3.5 6.2): default-repertoire printable characters but backslash, <= 16 each
_CS_VALUE = re.compile(rb"[\x20-\x5b\x5d-\x7e]{0,16}")


class DataSetError(ValueError):
    """The received data set cannot be used; carries its C-STORE status (PS3.4 B.2-1)."""

    def __init__(self, message: str, *, status: StoreStatus) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


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
    requested_procedure_priority: str = ""
    request_priorities: tuple[str, ...] = ()
    rule_attributes: tuple[tuple[str, str], ...] = ()


def _as_text(raw: RawDataElement | None, encoding: str | list[str]) -> str:
    if raw is None or raw.value is None:
        return ""
    elem = convert_raw_data_element(raw, encoding=encoding)
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, list | tuple):  # multi-valued: keep the first value
        value = value[0] if value else ""
    return str(value).strip().rstrip("\x00").strip()


def _malformed(message: str) -> DataSetError:
    return DataSetError(message, status=StoreStatus.CANNOT_UNDERSTAND)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True, slots=True)
class InflateLimits:
    """How far a deflated data set (PS3.5 A.5) may inflate before it is refused (0xC210).

    The limit for one data set is ``min(max_bytes, max_ratio * deflated bytes + 1 MiB)``.
    Chest radiographs deflate by a factor of 1.1 to 3 (measured: RG1_UNCR 1.1, RG3_UNCR
    2.9, the NIH test images 1.5; detector noise does not compress); a deflate stream can
    reach about 1032:1 (zeros), which is what bombs use.

    Parameters
    ----------
    max_ratio
        Inflated bytes allowed per received deflated byte (setting ``deflate_max_ratio``).
    max_bytes
        Inflated bytes allowed whatever the ratio (setting ``deflate_max_inflated_mb``).
    """

    max_ratio: int = 100
    max_bytes: int = 256 * _MIB

    def __post_init__(self) -> None:
        if self.max_ratio < 1 or self.max_bytes < 1:
            raise ValueError(f"inflate limits must be at least 1, got {self}")

    def for_size(self, deflated_bytes: int) -> int:
        """The inflated-size limit for a deflated stream of ``deflated_bytes``."""
        return min(self.max_bytes, self.max_ratio * max(deflated_bytes, 0) + _MIB)


class _FileSource:
    """The data set bytes of a file (native transfer syntaxes): skipping is a seek."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._size = size
        self.pos = fh.tell()

    def read(self, n: int) -> bytes:
        data = self._fh.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        step = max(0, min(n, self._size - self.pos))
        self._fh.seek(step, io.SEEK_CUR)
        self.pos += step
        return step

    def finish(self) -> None:
        """Nothing to check after the last element of a file."""


class _InflateSource:
    """The inflated bytes of a deflated data set, produced on demand and never kept.

    At most :data:`_INFLATE_OUT` inflated bytes are held at a time; skipping a value inflates
    and discards it. More than ``limit`` inflated bytes in all raise :class:`DataSetError`
    (0xC210): the deflate bomb of issue #22 (1 MB in, 1 GiB out) stops at the limit.
    """

    def __init__(self, fh: BinaryIO, *, limit: int) -> None:
        self._fh = fh
        self._limit = limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (RFC 1951), PS3.5 A.5
        self._buf = b""
        self._off = 0
        self.pos = 0  # inflated bytes consumed by the walker
        self.inflated = 0  # inflated bytes produced

    def _inflate(self, max_length: int) -> bytes:
        """Up to ``max_length`` more inflated bytes; ``b""`` at the end of the stream."""
        z = self._z
        while not z.eof:
            data = z.unconsumed_tail
            if not data:
                data = self._fh.read(_INFLATE_IN)
                if not data:
                    raise _malformed("deflated data set truncated (stream not finished)")
            out = z.decompress(data, max_length)
            if out:
                self.inflated += len(out)
                if self.inflated > self._limit:
                    raise _malformed(
                        f"deflated data set inflates beyond {self._limit // _MIB} MiB (limit)"
                    )
                return out
        return b""

    def read(self, n: int) -> bytes:
        avail = len(self._buf) - self._off
        if avail >= n:
            data = self._buf[self._off : self._off + n]
            self._off += n
        else:
            parts = [self._buf[self._off :]]
            while avail < n:
                more = self._inflate(max(n - avail, _INFLATE_OUT))
                if not more:
                    break
                parts.append(more)
                avail += len(more)
            joined = b"".join(parts)
            data, self._buf, self._off = joined[:n], joined, min(n, len(joined))
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        take = min(n, len(self._buf) - self._off)
        self._off += take
        done = take
        while done < n:
            more = self._inflate(min(n - done, _INFLATE_OUT))
            if not more:
                break
            done += len(more)
        self.pos += done
        return done

    def finish(self) -> None:
        """After the last element: the deflate stream must end here.

        Bytes after the end of the deflate stream are not part of the data set and are let
        be, as pydicom does: a pad byte to an even length, or (seen in the wild, pydicom's
        ``image_dfl.dcm``) a gzip-style CRC-32 and size trailer.
        """
        if len(self._buf) > self._off or self._inflate(1):
            raise _malformed("deflated data set malformed: bytes after the last element")


class _Walker:
    """Walk a data set's element structure without building it (PS3.5 7.1, 7.5, A.4).

    Every element header is read and every value skipped, except the few top-level values in
    :data:`_WANTED` (up to :data:`_DEFER` bytes) and the top-level Request Attributes Sequence
    (up to :data:`_REQUEST_ATTRIBUTES_MAX` bytes, for the order's priority in its items, parsed
    afterwards by :func:`_request_priorities`). Undefined-length sequences are walked item
    by item and encapsulated pixel data fragment by fragment; nothing is kept, so memory does
    not depend on the data set. pydicom's ``data_element_generator`` is not used here because
    it parses an undefined-length sequence, values and all, into memory (``read_sequence``
    takes no ``defer_size``), and needs backward seeks an inflating stream cannot give.

    Refused (0xC210): truncation, bytes after the last element, elements out of increasing
    tag order (PS3.5 7.1.1), items where none may be, sequences nested deeper than
    :data:`_MAX_DEPTH`, more than :data:`_MAX_HEADERS` element and item headers.
    """

    def __init__(self, src: _FileSource | _InflateSource, *, implicit: bool, little: bool):
        self.src = src
        self.implicit = implicit
        self.little = little
        order = "<" if little else ">"
        self._tag = struct.Struct(order + "HH").unpack
        self._u16 = struct.Struct(order + "H").unpack
        self._u32 = struct.Struct(order + "L").unpack
        self._headers = 0
        self.found: dict[int, RawDataElement] = {}
        #: the value of the top-level Request Attributes Sequence (its items, without a
        #: sequence delimiter) and whether they are implicit VR; None if absent or too long
        self.request_attributes: tuple[bytes, bool] | None = None
        self._tap: list[bytes] | None = None  # bytes kept while walking that sequence
        self._tapped = 0

    def _read(self, n: int) -> bytes:
        data = self.src.read(n)
        if self._tap is not None:
            self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        assert self._tap is not None
        self._tapped += len(data)
        if self._tapped > _REQUEST_ATTRIBUTES_MAX:
            self._tap = None  # too long: walked to its end, but not kept
        else:
            self._tap.append(data)

    def _exact(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise _malformed(f"data set truncated: {n - len(data)} bytes missing at the end")
        return data

    def _skip(self, n: int, tag: int) -> None:
        if self._tap is not None and self._tapped + n <= _REQUEST_ATTRIBUTES_MAX:
            data = self.src.read(n)
            if len(data) < n:
                raise _malformed(f"data set truncated: element {_tag_text(tag)} ends past the end")
            self._keep(data)
            return
        if self._tap is not None:
            self._tap = None  # too long: walked to its end, but not kept
        if self.src.skip(n) < n:
            raise _malformed(f"data set truncated: element {_tag_text(tag)} ends past the end")

    def _header(self, implicit: bool, *, top: bool) -> tuple[int, str | None, int] | None:
        """(tag, VR or None, length) of the next element or item; ``None`` at the very end."""
        head = self._read(8)
        if not head and top:
            return None
        if len(head) < 8:
            if top:
                raise _malformed(f"data set malformed: {len(head)} bytes after the last element")
            raise _malformed("data set truncated inside a sequence")
        self._headers += 1
        if self._headers > _MAX_HEADERS:
            raise _malformed(f"data set has more than {_MAX_HEADERS} elements and items")
        group, elem = self._tag(head[:4])
        tag = group << 16 | elem
        if group == 0xFFFE or implicit:  # items and delimiters: tag + 4-byte length (PS3.5 7.5)
            return tag, None, self._u32(head[4:])[0]
        vr = head[4:6]
        if vr in _LONG_VRS:  # PS3.5 Table 7.1-1: 2 reserved bytes, 4-byte length
            return tag, vr.decode("ascii"), self._u32(self._exact(4))[0]
        if vr.isalpha() and vr.isupper():
            return tag, vr.decode("ascii"), self._u16(head[6:])[0]
        # as pydicom (config.assume_implicit_vr_switch): some writers switch to implicit VR
        return tag, None, self._u32(head[4:])[0]

    def dataset(self, *, implicit: bool, depth: int = 0) -> None:
        """Walk a data set: the top level (to the end) or an undefined-length item."""
        top = depth == 0
        last = -1
        while True:
            start = self.src.pos
            header = self._header(implicit, top=top)
            if header is None:
                self.src.finish()
                return
            tag, vr, length = header
            if tag == _ITEM_END and not top:
                return
            if tag >> 16 == 0xFFFE:
                raise _malformed(f"data set malformed: item tag {_tag_text(tag)} out of place")
            if tag <= last:  # PS3.5 7.1.1: increasing order, each element at most once
                raise _malformed(f"data set malformed: {_tag_text(tag)} out of tag order")
            last = tag
            if top and tag == _REQUEST_ATTRIBUTES and vr in (None, "SQ", "UN"):
                self._request_attributes(tag, vr, length, implicit=implicit)
            elif length == _UNDEFINED:
                self._undefined(tag, vr, implicit=implicit, depth=depth)
            elif top and tag in _WANTED and length <= _DEFER:
                value = self._exact(length)
                self.found[tag] = RawDataElement(
                    Tag(tag), vr, length, value, start, implicit, self.little, True, False
                )
            else:
                self._skip(length, tag)

    def _request_attributes(self, tag: int, vr: str | None, length: int, *, implicit: bool) -> None:
        """The top-level Request Attributes Sequence: walked as any other, its bytes kept
        (up to :data:`_REQUEST_ATTRIBUTES_MAX`) for the priority of its items."""
        nested_implicit = implicit or vr == "UN"  # PS3.5 6.2.2: a UN sequence is IVR LE
        if length != _UNDEFINED:
            if length > _REQUEST_ATTRIBUTES_MAX:
                self._skip(length, tag)
            else:
                self.request_attributes = (self._exact(length), nested_implicit)
            return
        self._tap, self._tapped = [], 0
        try:
            self._undefined(tag, vr, implicit=implicit, depth=0)
            kept = self._tap
        finally:
            self._tap = None
        if kept is not None:  # the last 8 bytes are the Sequence Delimitation Item
            self.request_attributes = (b"".join(kept)[:-8], nested_implicit)

    def _undefined(self, tag: int, vr: str | None, *, implicit: bool, depth: int) -> None:
        """An undefined-length value: a sequence (SQ; UN, PS3.5 6.2.2) or encapsulated data."""
        if vr not in (None, "SQ", "UN", "OB", "OW"):
            raise _malformed(f"data set malformed: {_tag_text(tag)} {vr} has undefined length")
        if depth >= _MAX_DEPTH:
            raise _malformed(f"data set malformed: sequences nested deeper than {_MAX_DEPTH}")
        encapsulated = vr in ("OB", "OW")  # PS3.5 A.4: fragments, each a defined-length item
        nested_implicit = True if vr == "UN" else implicit  # PS3.5 6.2.2: UN/undefined is IVR
        while True:
            header = self._header(True, top=False)
            assert header is not None
            item, _, length = header
            if item == _SEQ_END:
                return
            if item != _ITEM:
                raise _malformed(
                    f"data set malformed: {_tag_text(item)} where an item of "
                    f"{_tag_text(tag)} should be"
                )
            if length != _UNDEFINED:
                self._skip(length, tag)
            elif encapsulated:
                raise _malformed(f"data set malformed: fragment of undefined length in {vr}")
            else:
                self.dataset(implicit=nested_implicit, depth=depth + 1)


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
        raise _malformed(f"(0008,0005) Specific Character Set has VR {raw.VR}, not CS")
    value = bytes(raw.value).rstrip(b" \x00")
    terms = [t.strip(b" ") for t in value.split(b"\\")]
    if not all(_CS_VALUE.fullmatch(t) for t in terms):
        raise _malformed("(0008,0005) Specific Character Set is not a valid CS value")
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
                    raise _malformed("file meta group length does not match its elements")
            ts = _as_text(meta.get(0x00020010), "iso8859")
            if not ts:
                raise _malformed("file meta has no Transfer Syntax UID")
            uid = UID(ts)
            source: _FileSource | _InflateSource
            if ts in _DEFLATED:
                source = _InflateSource(fh, limit=limits.for_size(size - fh.tell()))
                walker = _Walker(source, implicit=False, little=True)
            else:
                known = uid.is_transfer_syntax
                source = _FileSource(fh, size)
                walker = _Walker(
                    source,
                    implicit=bool(uid.is_implicit_VR) if known else True,
                    little=bool(uid.is_little_endian) if known else True,
                )
            walker.dataset(implicit=walker.implicit)
        found = walker.found
        encoding = _encoding(found.get(0x00080005))
    except DataSetError:
        raise
    except (EOFError, ValueError, KeyError, IndexError, NotImplementedError, zlib.error) as exc:
        raise _malformed(f"data set cannot be parsed: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises assorted errors on garbage input
        raise _malformed(f"data set cannot be parsed: {type(exc).__name__}") from exc

    def text(tag: int) -> str:
        try:
            return _as_text(found.get(tag), encoding)
        except Exception:
            return ""

    return HeaderInfo(
        transfer_syntax=ts,
        sop_class_uid=text(0x00080016),
        sop_instance_uid=text(0x00080018),
        study_uid=text(0x0020000D),
        series_uid=text(0x0020000E),
        modality=text(0x00080060),
        body_part_examined=text(0x00180015),
        study_description=text(0x00081030),
        series_description=text(0x0008103E),
        view_position=text(0x00185101),
        requested_procedure_priority=text(_PRIORITY),
        request_priorities=_request_priorities(
            walker.request_attributes, little=walker.little, encoding=encoding
        ),
        rule_attributes=tuple(
            (keyword, value) for tag, keyword in _RULE_TAGS.items() if (value := text(tag))
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
    (the order's Requested Procedure Priority, top level and Request Attributes Sequence,
    and the attributes of :data:`integration.priority.RULE_FIELDS`) and the calling AE
    Title. Anything unexpected gives 0 (routine): a priority never fails a C-STORE.
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
                    _REQUEST_ATTRIBUTES,
                    "SQ",
                    Sequence(items),
                    validation_mode=pydicom_config.IGNORE,
                )
            )
        return study_priority(ds, calling_ae=calling_ae, rules=rules)
    except Exception as exc:
        LOG.warning("job priority not computed (%s); routine (0)", type(exc).__name__)
        return 0


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def validate_uids(header: HeaderInfo, meta: ReceivedMeta) -> None:
    """Refuse missing or invalid UIDs and UIDs that contradict the C-STORE request.

    Raises
    ------
    DataSetError
        0xA900 SOP Instance UID, 0xA901 Study Instance UID, 0xA902 Series Instance UID,
        0xA903 data set / request mismatch (PS3.4 B.2.3: the Affected SOP Class and
        Instance UIDs of the request identify the data set).
    """
    checks = (
        (
            header.sop_instance_uid,
            "(0008,0018) SOP Instance UID",
            StoreStatus.MISSING_SOP_INSTANCE_UID,
        ),
        (
            header.study_uid,
            "(0020,000D) Study Instance UID",
            StoreStatus.MISSING_STUDY_INSTANCE_UID,
        ),
        (
            header.series_uid,
            "(0020,000E) Series Instance UID",
            StoreStatus.MISSING_SERIES_INSTANCE_UID,
        ),
    )
    for value, concept, status in checks:
        if not value:
            raise DataSetError(f"{concept} missing", status=status)
        if not _valid_uid(value):
            raise DataSetError(f"{concept} is not a valid UID", status=status)
    if not _valid_uid(header.sop_class_uid):
        raise DataSetError(
            "(0008,0016) SOP Class UID missing or invalid", status=StoreStatus.UID_MISMATCH
        )
    if meta.sop_instance_uid and header.sop_instance_uid != meta.sop_instance_uid:
        raise DataSetError(
            "SOP Instance UID differs from the request's Affected SOP Instance UID",
            status=StoreStatus.UID_MISMATCH,
        )
    if meta.sop_class_uid and header.sop_class_uid != meta.sop_class_uid:
        raise DataSetError(
            "SOP Class UID differs from the request's Affected SOP Class UID",
            status=StoreStatus.UID_MISMATCH,
        )
    if not _valid_uid(header.transfer_syntax):
        raise DataSetError("Transfer Syntax UID invalid", status=StoreStatus.CANNOT_UNDERSTAND)


def _sqlite_folder(database_url: object) -> Path | None:
    """The folder of a SQLite database file (it grows there, with its journal), else None."""
    if not isinstance(database_url, str) or not database_url.startswith("sqlite"):
        return None
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute().parent


class _KeyedLocks:
    """One lock per key (SOP Instance UID), so two copies of one instance never interleave."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class IngestSink:
    """Spool + SQL sink for received instances (implements ``integration.scp.InstanceSink``).

    Parameters
    ----------
    settings
        Node settings (``min_free_disk_mb``, ``job_max_attempts``, ``spool_dir``,
        ``database_url``, ``deflate_max_ratio``, ``deflate_max_inflated_mb``,
        ``priority_rules``).
    session_factory
        SQLAlchemy session factory (``node.db.engine.make_session_factory``).
    spool
        The spool; default ``Spool(settings.spool_dir)``.
    clock
        Returns the receive time (timezone-aware); for tests.
    """

    def __init__(
        self,
        *,
        settings: Any,
        session_factory: Callable[[], Session],
        spool: Spool | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.spool = spool if spool is not None else Spool(settings.spool_dir)
        self.clock = clock or (lambda: datetime.now(UTC))
        floor_mb = getattr(settings, "min_free_disk_mb", 0)
        self.floor_bytes = (
            self.spool.min_free_bytes
            if self.spool.min_free_bytes is not None
            else int(floor_mb) * _MIB
        )
        self.job_max_attempts = int(getattr(settings, "job_max_attempts", 3))
        self.priority_rules: tuple[PriorityRule, ...] = tuple(
            getattr(settings, "priority_rules", None) or ()
        )
        defaults = InflateLimits()
        ratio = getattr(settings, "deflate_max_ratio", defaults.max_ratio)
        inflated_mb = getattr(settings, "deflate_max_inflated_mb", defaults.max_bytes // _MIB)
        self.inflate = InflateLimits(max_ratio=int(ratio), max_bytes=int(inflated_mb) * _MIB)
        #: folders outside the spool whose file systems must keep the floor as well
        self.watch_also: dict[str, Path] = {}
        folder = _sqlite_folder(getattr(settings, "database_url", None))
        if folder is not None:
            self.watch_also["database"] = folder
        self._locks = _KeyedLocks()
        removed = self.spool.clean_incoming()
        if removed:
            LOG.info("removed %d unacknowledged staged files from the spool", removed)

    def accept(self, path: Path, meta: ReceivedMeta) -> StoreResult:
        """Parse, validate, spool (fsync) and record one instance; never raises.

        Returns
        -------
        StoreResult
            0x0000 only once the file is durable and its row committed; otherwise the
            status of :mod:`integration.status` with the reason.
        """
        try:
            header = read_header(path, inflate=self.inflate)
            validate_uids(header, meta)
        except DataSetError as exc:
            return StoreResult(status=exc.status, reason=exc.message)
        with self._locks.hold(header.sop_instance_uid):
            return self._store(path, header, meta)

    def _store(self, path: Path, header: HeaderInfo, meta: ReceivedMeta) -> StoreResult:
        try:
            spooled = self.spool.store(
                path,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                sop_instance_uid=header.sop_instance_uid,
                floor_bytes=self.floor_bytes,
                also=self.watch_also,
            )
        except SpoolError as exc:
            return StoreResult(status=exc.status, reason=exc.message)
        try:
            outcome, obsolete = self._record(spooled, header, meta)
        except SQLAlchemyError as exc:
            self.spool.discard(spooled)
            LOG.error(
                "database could not record SOP Instance %s: %s",
                header.sop_instance_uid,
                type(exc).__name__,
            )
            return StoreResult(
                status=StoreStatus.OUT_OF_RESOURCES_DATABASE,
                reason=f"database unavailable ({type(exc).__name__})",
            )
        except Exception:
            self.spool.discard(spooled)
            raise
        if obsolete:
            self.spool.remove(obsolete)
        metrics.count_instance()
        return StoreResult(status=StoreStatus.SUCCESS, outcome=outcome)

    def _record(
        self, spooled: SpooledFile, header: HeaderInfo, meta: ReceivedMeta
    ) -> tuple[str, str | None]:
        from node.db.studies import InstanceRecord, record_instance_detailed

        rec = InstanceRecord(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax,
            modality=header.modality or None,
            body_part_examined=header.body_part_examined or None,
            study_description=header.study_description or None,
            series_description=header.series_description or None,
            view_position=header.view_position or None,
            spool_path=spooled.relative,
            size_bytes=spooled.size_bytes,
            sha256=spooled.sha256,
            calling_ae=meta.calling_ae or None,
            received_at=self.clock(),
            priority=header_priority(
                header, calling_ae=meta.calling_ae or None, rules=self.priority_rules
            ),
        )
        with self.session_factory() as session:
            result = record_instance_detailed(session, rec, job_max_attempts=self.job_max_attempts)
        return str(result.outcome.value), result.obsolete_spool_path
