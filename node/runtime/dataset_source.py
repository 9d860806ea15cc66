"""The bytes of a received data set, read forward once: from the file, or inflated on demand.

:class:`FileSource` reads a native (PS3.5 A.1-A.3) data set from its Part 10 file (PS3.10
7.1), skipping values with a seek; :class:`InflateSource` inflates a deflated one (PS3.5 A.5,
A.7, A.12) as it is read, never holding it whole, and refuses it (0xC210) once it inflates past
its :class:`InflateLimits`. Both feed :class:`node.runtime.dataset_walk.Walker`.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.runtime.dataset_error import malformed

__all__ = ["DEFLATED", "FileSource", "InflateLimits", "InflateSource"]

_MIB = 1 << 20

#: Transfer syntaxes whose data set is deflated (raw deflate, RFC 1951): PS3.5 A.5 (Deflated
#: Explicit VR Little Endian), A.7 (JPIP Referenced Deflate), A.12 (JPIP HTJ2K Referenced
#: Deflate); pydicom 3.0's UID.is_deflated knows the first only.
DEFLATED = frozenset(
    {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
_INFLATE_IN = 1 << 16  # deflated bytes read from the file at a time
_INFLATE_OUT = 1 << 20  # inflated bytes produced at a time (the most ever held)


@dataclass(frozen=True, slots=True)
class InflateLimits:
    """How far a deflated data set (PS3.5 A.5) may inflate before it is refused (0xC210).

    The limit for one data set is ``min(max_bytes, max_ratio * deflated bytes + 1 MiB)``.
    Chest radiographs deflate by a small factor (detector noise does not compress); a
    deflate stream can reach about 1032:1 (zeros), which is what bombs use.

    Parameters
    ----------
    max_ratio
        Inflated bytes allowed per received deflated byte (setting ``deflate_max_ratio``).
    max_bytes
        Inflated bytes allowed whatever the ratio (setting ``deflate_max_inflated_mb``).

    Raises
    ------
    ValueError
        When either limit is below 1.
    """

    max_ratio: int = 100
    max_bytes: int = 256 * _MIB

    def __post_init__(self) -> None:
        if self.max_ratio < 1 or self.max_bytes < 1:
            raise ValueError(f"inflate limits must be at least 1, got {self}")

    def for_size(self, deflated_bytes: int) -> int:
        """The inflated-size limit for a deflated stream of ``deflated_bytes``."""
        return min(self.max_bytes, self.max_ratio * max(deflated_bytes, 0) + _MIB)


class FileSource:
    """The data set bytes of a file (native transfer syntaxes): skipping is a seek.

    Parameters
    ----------
    fh
        The Part 10 file (PS3.10 7.1), positioned at the first data set element.
    size
        The file's size in bytes: a skip never seeks past it.
    """

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._size = size
        self.pos = fh.tell()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the file."""
        data = self._fh.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Skip up to ``n`` bytes (not past the end); return how many were skipped."""
        step = max(0, min(n, self._size - self.pos))
        self._fh.seek(step, io.SEEK_CUR)
        self.pos += step
        return step

    def finish(self) -> None:
        """Nothing to check after the last element of a file."""


class InflateSource:
    """The inflated bytes of a deflated data set, produced on demand and never kept.

    At most :data:`_INFLATE_OUT` inflated bytes are held at a time; skipping a value inflates
    and discards it. More than ``limit`` inflated bytes in all raise
    :class:`~node.runtime.dataset_error.DataSetError` (0xC210): the deflate bomb of issue #22
    (1 MB in, 1 GiB out) stops at the limit.

    Parameters
    ----------
    fh
        The Part 10 file, positioned at the start of the deflated data set (PS3.5 A.5).
    limit
        Inflated bytes allowed in all (:meth:`InflateLimits.for_size`).
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
                    raise malformed("deflated data set truncated (stream not finished)")
            out = z.decompress(data, max_length)
            if out:
                self.inflated += len(out)
                if self.inflated > self._limit:
                    raise malformed(
                        f"deflated data set inflates beyond {self._limit // _MIB} MiB (limit)"
                    )
                return out
        return b""

    def read(self, n: int) -> bytes:
        """Up to ``n`` inflated bytes; fewer only at the end of the deflate stream."""
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
        """Inflate and discard up to ``n`` bytes; return how many were skipped."""
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

        Raises
        ------
        DataSetError
            0xC210 when inflated bytes follow the last element.
        """
        if len(self._buf) > self._off or self._inflate(1):
            raise malformed("deflated data set malformed: bytes after the last element")
