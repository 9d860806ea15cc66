"""A bounded walk of a received data set's element structure (PS3.5 7.1, 7.5, A.4).

:class:`Walker` reads every element and item header of a data set from a
:mod:`node.runtime.dataset_source` source and skips every value but the few asked for, so a
truncated or malformed data set is found without any value (pixel data above all) in memory.
:mod:`node.runtime.header` turns what it keeps into the attributes the node records.
"""

from __future__ import annotations

import struct
from collections.abc import Container

from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from node.runtime.dataset_error import malformed
from node.runtime.dataset_source import FileSource, InflateSource

__all__ = ["REQUEST_ATTRIBUTES", "Walker"]

#: Request Attributes Sequence, SQ (PS3.3 C.4.11 / C.7.3.1): kept for the order's priority
REQUEST_ATTRIBUTES = 0x00400275
_DEFER = 1024  # bytes: larger values are skipped with a seek, never read
# bytes of the Request Attributes Sequence kept to read its items' priority (a real one has
# a few hundred); a longer sequence is walked and skipped as any other, its priority unread
_REQUEST_ATTRIBUTES_MAX = 64 * 1024
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # PS3.5 7.5
# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_DEPTH = 32  # nested sequences; a radiograph has 2 or 3
_MAX_HEADERS = 1_000_000  # element and item headers in one data set; a radiograph has < 10,000


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class Walker:
    """Walk a data set's element structure without building it (PS3.5 7.1, 7.5, A.4).

    Every element header is read and every value skipped, except the top-level values whose
    tags are in ``wanted`` (up to :data:`_DEFER` bytes) and the top-level Request Attributes
    Sequence (up to :data:`_REQUEST_ATTRIBUTES_MAX` bytes, for the order's priority in its
    items, parsed afterwards by :mod:`node.runtime.header`). Undefined-length sequences are
    walked item by item and encapsulated pixel data fragment by fragment; nothing is kept, so
    memory does not depend on the data set. pydicom's ``data_element_generator`` is not used
    here because it parses an undefined-length sequence, values and all, into memory
    (``read_sequence`` takes no ``defer_size``), and needs backward seeks an inflating stream
    cannot give.

    Refused (0xC210): truncation, bytes after the last element, elements out of increasing
    tag order (PS3.5 7.1.1), items where none may be, sequences nested deeper than
    :data:`_MAX_DEPTH`, more than :data:`_MAX_HEADERS` element and item headers.

    Parameters
    ----------
    src
        Where the data set's bytes come from.
    implicit, little
        The transfer syntax's VR encoding and byte order (PS3.5 7.1, 7.3).
    wanted
        Tags of the top-level elements whose values are kept in :attr:`found`.
    """

    def __init__(
        self,
        src: FileSource | InflateSource,
        *,
        implicit: bool,
        little: bool,
        wanted: Container[int],
    ) -> None:
        self.src = src
        self.implicit = implicit
        self.little = little
        self._wanted = wanted
        order = "<" if little else ">"
        self._tag = struct.Struct(order + "HH").unpack
        self._u16 = struct.Struct(order + "H").unpack
        self._u32 = struct.Struct(order + "L").unpack
        self._headers = 0
        #: the ``wanted`` top-level elements found, by tag
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
            raise malformed(f"data set truncated: {n - len(data)} bytes missing at the end")
        return data

    def _skip(self, n: int, tag: int) -> None:
        if self._tap is not None and self._tapped + n <= _REQUEST_ATTRIBUTES_MAX:
            data = self.src.read(n)
            if len(data) < n:
                raise malformed(f"data set truncated: element {_tag_text(tag)} ends past the end")
            self._keep(data)
            return
        if self._tap is not None:
            self._tap = None  # too long: walked to its end, but not kept
        if self.src.skip(n) < n:
            raise malformed(f"data set truncated: element {_tag_text(tag)} ends past the end")

    def _header(self, implicit: bool, *, top: bool) -> tuple[int, str | None, int] | None:
        """(tag, VR or None, length) of the next element or item; ``None`` at the very end."""
        head = self._read(8)
        if not head and top:
            return None
        if len(head) < 8:
            if top:
                raise malformed(f"data set malformed: {len(head)} bytes after the last element")
            raise malformed("data set truncated inside a sequence")
        self._headers += 1
        if self._headers > _MAX_HEADERS:
            raise malformed(f"data set has more than {_MAX_HEADERS} elements and items")
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
        """Walk a data set: the top level (to the end) or an undefined-length item.

        Raises
        ------
        DataSetError
            0xC210 for any of the faults listed in the class description.
        """
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
                raise malformed(f"data set malformed: item tag {_tag_text(tag)} out of place")
            if tag <= last:  # PS3.5 7.1.1: increasing order, each element at most once
                raise malformed(f"data set malformed: {_tag_text(tag)} out of tag order")
            last = tag
            if top and tag == REQUEST_ATTRIBUTES and vr in (None, "SQ", "UN"):
                self._request_attributes(tag, vr, length, implicit=implicit)
            elif length == _UNDEFINED:
                self._undefined(tag, vr, implicit=implicit, depth=depth)
            elif top and tag in self._wanted and length <= _DEFER:
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
            raise malformed(f"data set malformed: {_tag_text(tag)} {vr} has undefined length")
        if depth >= _MAX_DEPTH:
            raise malformed(f"data set malformed: sequences nested deeper than {_MAX_DEPTH}")
        encapsulated = vr in ("OB", "OW")  # PS3.5 A.4: fragments, each a defined-length item
        nested_implicit = True if vr == "UN" else implicit  # PS3.5 6.2.2: UN/undefined is IVR
        while True:
            header = self._header(True, top=False)
            assert header is not None
            item, _, length = header
            if item == _SEQ_END:
                return
            if item != _ITEM:
                raise malformed(
                    f"data set malformed: {_tag_text(item)} where an item of "
                    f"{_tag_text(tag)} should be"
                )
            if length != _UNDEFINED:
                self._skip(length, tag)
            elif encapsulated:
                raise malformed(f"data set malformed: fragment of undefined length in {vr}")
            else:
                self.dataset(implicit=nested_implicit, depth=depth + 1)
