"""Following the PDUs of a received byte stream and what pynetdicom would buffer (PS3.8).

:class:`PduFramer` is fed every byte a connection of
:class:`integration.transport.BoundedAssociationServer` receives, before pynetdicom sees it,
and says why the stream must be refused: a PDU header (PS3.8 9.3.1) claiming more than its
limit, a DIMSE command set (PS3.7 6.3.1) or a data set kept in memory growing over its
limit inside P-DATA-TF PDUs (PS3.8 9.3.5, Annex E.2), or a PDV item that does not fit its
PDU. It only counts and never blocks; the caller decides what refusing means (A-ABORT).
"""

from __future__ import annotations

import struct

__all__ = ["MAX_COMMAND_SET", "MAX_MEMORY_DATA_SET", "PDU_HEADER_LENGTH", "PduFramer"]

PDU_HEADER_LENGTH = 6
"""PDU type (1), reserved (1), PDU length (4, big endian): PS3.8 9.3.1."""
MAX_COMMAND_SET = 64 << 10
"""Largest DIMSE command set (a C-STORE-RQ's has a few hundred bytes)."""
MAX_MEMORY_DATA_SET = 1 << 20
"""Largest data set of a message other than C-STORE-RQ (which pynetdicom holds in memory)."""

_P_DATA_TF = 0x04
_PDV_HEADER_LENGTH = 6  # item length (4), presentation context ID (1), control header (1)
_C_STORE_RQ = 0x0001  # (0000,0100) Command Field, PS3.7 Table E.1-1
_NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: no data set


class PduFramer:
    """Follows the PDUs of a received byte stream and checks what pynetdicom would buffer.

    Every PDU starts with a 6-byte header: type, reserved, 32-bit big-endian length of the
    rest (PS3.8 9.3.1). The framer is fed the bytes in the order they arrive, in chunks of any
    size, and says why the stream must be refused when:

    - a PDU header claims more than its limit: the first PDU of the connection (the
      A-ASSOCIATE-RQ) ``first_limit``, every later one ``limit`` (pynetdicom reads a whole
      PDU into memory before decoding it);
    - inside P-DATA-TF PDUs (PS3.8 9.3.5: PDV items of length, presentation context ID,
      message control header and fragment, Annex E.2), a DIMSE message would pile up in
      memory: pynetdicom keeps a message's command set, and the data set of every message
      but a C-STORE-RQ (whose data set goes to a file fragment by fragment), in memory until
      the message's last fragment. The command set may have ``max_command_set`` bytes, such
      a data set ``max_memory_data_set``;
    - a PDV item does not fit in its PDU (malformed).

    Parameters
    ----------
    first_limit
        Largest length of the first PDU (the A-ASSOCIATE-RQ).
    limit
        Largest length of every later PDU (the Maximum Length, PS3.8 D.1).
    max_command_set
        Largest command set of one DIMSE message.
    max_memory_data_set
        Largest data set of a DIMSE message other than C-STORE-RQ.
    """

    __slots__ = (
        "_body_left",
        "_command",
        "_data_set",
        "_first_limit",
        "_header",
        "_item_header",
        "_item_left",
        "_limit",
        "_max_command",
        "_max_data_set",
        "_mch",
        "_message",
        "_pdu_type",
        "headers",
        "started",
    )

    def __init__(
        self,
        *,
        first_limit: int,
        limit: int,
        max_command_set: int = MAX_COMMAND_SET,
        max_memory_data_set: int = MAX_MEMORY_DATA_SET,
    ) -> None:
        self._first_limit = first_limit
        self._limit = limit
        self._max_command = max_command_set
        self._max_data_set = max_memory_data_set
        self._header = bytearray()
        self._body_left = 0
        self._pdu_type = 0
        self._item_header = bytearray()
        self._item_left = 0
        self._mch = 0
        self._command = bytearray()
        self._message: int | None = None  # Command Field once the command set is complete
        self._data_set = 0  # data set bytes of the current message held in memory
        self.headers = 0
        """PDU headers read in full."""
        self.started = 0
        """PDUs whose first byte has arrived."""

    @property
    def body_left(self) -> int:
        """Bytes of the current PDU's body still to come (0 at a PDU boundary or inside a
        PDU header)."""
        return self._body_left

    @property
    def in_pdu(self) -> bool:
        """Whether the stream is inside a PDU (its header or body is incomplete)."""
        return bool(self._header) or self._body_left > 0

    def feed(self, data: bytes | bytearray | memoryview) -> str | None:
        """Account for ``data``, the next bytes of the stream.

        Returns
        -------
        str or None
            Why the stream must be refused, else ``None``.
        """
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._body_left:
                step = min(self._body_left, n - i)
                if self._pdu_type == _P_DATA_TF:
                    reason = self._pdvs(view[i : i + step])
                    if reason is not None:
                        return reason
                self._body_left -= step
                i += step
                if not self._body_left and self._item_header:
                    return "malformed P-DATA-TF PDU: it ends inside a PDV item header"
                continue
            if not self._header:
                self.started += 1
            take = view[i : i + PDU_HEADER_LENGTH - len(self._header)]
            self._header += take
            i += len(take)
            if len(self._header) < PDU_HEADER_LENGTH:
                break
            pdu_type = self._header[0]
            length = int.from_bytes(self._header[2:6], "big")
            self._header.clear()
            first = self.headers == 0
            self.headers += 1
            limit = self._first_limit if first else self._limit
            if length > limit:
                what = "first PDU (A-ASSOCIATE-RQ)" if first else "PDU"
                return (
                    f"{what} of type 0x{pdu_type:02X} claims {length} bytes, "
                    f"above the limit of {limit}"
                )
            self._pdu_type = pdu_type
            self._body_left = length
        return None

    def _pdvs(self, view: memoryview) -> str | None:
        """Follow the PDV items in ``view``, bytes of the current P-DATA-TF PDU's body."""
        i, n = 0, len(view)
        while i < n:
            if self._item_left:
                step = min(self._item_left, n - i)
                reason = self._fragment(view[i : i + step])
                if reason is not None:
                    return reason
                self._item_left -= step
                i += step
                if not self._item_left:
                    self._fragment_end()
                continue
            take = view[i : i + _PDV_HEADER_LENGTH - len(self._item_header)]
            self._item_header += take
            i += len(take)
            if len(self._item_header) < _PDV_HEADER_LENGTH:
                break
            length = int.from_bytes(self._item_header[:4], "big")
            self._mch = self._item_header[5]
            self._item_header.clear()
            if length < 2 or length - 2 > self._body_left - i:
                return f"malformed PDV item: length {length} does not fit its P-DATA-TF PDU"
            self._item_left = length - 2
            if not self._item_left:
                self._fragment_end()
        return None

    def _fragment(self, chunk: memoryview) -> str | None:
        if self._mch & 0x01:  # command information (PS3.8 E.2)
            if len(self._command) + len(chunk) > self._max_command:
                return f"DIMSE command set of more than {self._max_command} bytes"
            self._command += chunk
        elif self._message != _C_STORE_RQ:  # pynetdicom keeps this data set in memory
            self._data_set += len(chunk)
            if self._data_set > self._max_data_set:
                if self._message is None:
                    what = "a data set sent before its command set"
                elif self._message < 0:
                    what = "the data set of a message whose command set has no Command Field"
                else:
                    what = f"the data set of a message with Command Field 0x{self._message:04X}"
                return (
                    f"{what} grows over {self._max_data_set} bytes; only a C-STORE-RQ may "
                    "carry a large data set"
                )
        return None

    def _fragment_end(self) -> None:
        if not self._mch & 0x02:  # not the last fragment
            return
        if self._mch & 0x01:  # the command set is complete
            field, data_set_type = _command_fields(bytes(self._command))
            self._command.clear()
            self._message = field if field is not None else -1
            if data_set_type == _NO_DATA_SET:
                self._end_message()
        else:  # the data set is complete: so is the message
            self._end_message()

    def _end_message(self) -> None:
        self._message = None
        self._data_set = 0


def _command_fields(command: bytes) -> tuple[int | None, int | None]:
    """(0000,0100) Command Field and (0000,0800) Command Data Set Type of a command set.

    A command set is encoded Implicit VR Little Endian (PS3.7 6.3.1): tag, 4-byte length,
    value. ``None`` for what is absent or malformed (pynetdicom then refuses the message).
    """
    field: int | None = None
    data_set_type: int | None = None
    i, n = 0, len(command)
    while i + 8 <= n:
        group, element, length = struct.unpack_from("<HHL", command, i)
        i += 8
        if i + length > n:
            break
        if group == 0x0000 and length == 2:
            value = int.from_bytes(command[i : i + 2], "little")
            if element == 0x0100:
                field = value
            elif element == 0x0800:
                data_set_type = value
        i += length
    return field, data_set_type
