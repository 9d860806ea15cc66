"""Ingest: the node's :class:`~integration.scp.InstanceSink` (spool + SQL) for the storage SCP.

For each received instance, in this order (architecture: "durability first"):

1. read the data set's structure, without pixel data in memory, and the few attributes the
   node records; refuse a truncated or malformed data set (0xC210);
2. check the UIDs (0xA900-0xA903);
3. check free space against ``min_free_disk_mb`` (0xA700, transient);
4. spool the file: fsync, atomic rename, fsync the directory (:mod:`node.spool`);
5. record it in SQL and commit (:func:`node.db.repository.record_instance_detailed`); if
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
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from integration.scp import ReceivedMeta, StoreResult
from integration.status import StoreStatus
from node.api import metrics
from node.spool import Spool, SpooledFile, SpoolError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["DataSetError", "HeaderInfo", "IngestSink", "read_header"]

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
_DEFER = 1024  # bytes: larger values are skipped with a seek, never read


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


def _walk(fp: BinaryIO, *, implicit: bool, little: bool, size: int) -> dict[int, RawDataElement]:
    """Walk every top-level element (values > 1 KiB skipped by seeking); check the ending."""
    found: dict[int, RawDataElement] = {}
    end = fp.tell()
    for raw in data_element_generator(fp, implicit, little, defer_size=_DEFER):
        end = fp.tell()
        short = (
            isinstance(raw, RawDataElement)
            and isinstance(raw.value, bytes)
            and raw.length != 0xFFFFFFFF
            and len(raw.value) < raw.length
        )
        if end > size or short:
            raise DataSetError(
                f"data set truncated: element ({raw.tag.group:04X},{raw.tag.element:04X}) "
                f"ends at byte {end} of {size}",
                status=StoreStatus.CANNOT_UNDERSTAND,
            )
        if raw.tag in _WANTED and isinstance(raw, RawDataElement):
            found[int(raw.tag)] = raw
    if end != size:
        raise DataSetError(
            f"data set malformed: {size - end} bytes after the last complete element",
            status=StoreStatus.CANNOT_UNDERSTAND,
        )
    return found


def read_header(path: Path) -> HeaderInfo:
    """Check a received Part 10 file's structure and read the attributes the node records.

    Every top-level element header is walked (PS3.5 7.1; encapsulated pixel data items,
    PS3.5 A.4, are followed item by item) so a truncated or malformed data set is refused
    here, while pixel data is never loaded into memory.

    Parameters
    ----------
    path
        File written by the SCP: preamble, file meta (PS3.10 7.1), data set as received.

    Returns
    -------
    HeaderInfo

    Raises
    ------
    DataSetError
        Status 0xC210 when the file cannot be parsed.
    """
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
            ts = _as_text(meta.get(0x00020010), "iso8859")
            if not ts:
                raise DataSetError(
                    "file meta has no Transfer Syntax UID", status=StoreStatus.CANNOT_UNDERSTAND
                )
            uid = UID(ts)
            if uid.is_deflated:
                data = zlib.decompress(fh.read(), -zlib.MAX_WBITS)
                buf = io.BytesIO(data)
                found = _walk(buf, implicit=False, little=True, size=len(data))
            else:
                implicit = bool(uid.is_implicit_VR) if uid.is_transfer_syntax else True
                little = bool(uid.is_little_endian) if uid.is_transfer_syntax else True
                found = _walk(fh, implicit=implicit, little=little, size=size)
    except DataSetError:
        raise
    except (EOFError, ValueError, KeyError, IndexError, NotImplementedError, zlib.error) as exc:
        raise DataSetError(
            f"data set cannot be parsed: {type(exc).__name__}",
            status=StoreStatus.CANNOT_UNDERSTAND,
        ) from exc
    except Exception as exc:  # pydicom raises assorted errors on garbage input
        raise DataSetError(
            f"data set cannot be parsed: {type(exc).__name__}",
            status=StoreStatus.CANNOT_UNDERSTAND,
        ) from exc

    charset_raw = found.get(0x00080005)
    encoding: str | list[str] = "iso8859"
    if charset_raw is not None and charset_raw.value:
        from pydicom.charset import convert_encodings

        cs = _as_text(charset_raw, "iso8859")
        try:
            encoding = convert_encodings(cs.split("\\") if cs else None)
        except Exception:  # unknown character set: fall back, names are not PHI-relevant
            encoding = "iso8859"

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
    )


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
        Node settings (``min_free_disk_mb``, ``job_max_attempts``, ``spool_dir``).
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
            header = read_header(path)
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
        from node.db.repository import InstanceRecord, record_instance_detailed

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
        )
        with self.session_factory() as session:
            result = record_instance_detailed(session, rec, job_max_attempts=self.job_max_attempts)
        return str(result.outcome.value), result.obsolete_spool_path
