"""Ingest: the node's :class:`~integration.scp.InstanceSink` (spool + SQL) for the storage SCP.

For each received instance, in this order (architecture: "durability first"):

1. read the data set's structure, without pixel data in memory, and the few attributes the
   node records; refuse a truncated or malformed data set, a deflated one that inflates past
   the limits (``deflate_max_ratio``, ``deflate_max_inflated_mb``) and an invalid Specific
   Character Set (0xC210, :func:`node.runtime.header.read_header`);
2. check the UIDs (0xA900-0xA903, :func:`validate_uids`);
3. check free space against ``min_free_disk_mb`` on every file system the node writes to:
   the spool, its staging folder, ``outputs``, the SQLite database's folder (0xA700,
   transient; :meth:`node.runtime.spool.Spool.check_free`);
4. spool the file: fsync, atomic rename, fsync the directory (:mod:`node.runtime.spool`);
5. record it in SQL and commit (:func:`node.db.studies.record_instance_detailed`); if
   that fails (database down: 0xA701, transient) the just-spooled file is removed again;
6. only then answer 0x0000.

Duplicate SOP Instance UIDs (policy, also in ``CONFORMANCE.md``): identical content answers
success and changes nothing; different content is stored as a new file, the SQL row is
switched to it in the same commit, then the old file is deleted ("newest wins"). An object
the node made itself (in ``<spool>/outputs``) coming back answers success and is not stored.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from integration.priority import PriorityRule
from integration.scp import ReceivedMeta, StoreResult
from integration.status import StoreStatus
from node import metrics
from node.runtime.dataset_error import DataSetError
from node.runtime.dataset_source import InflateLimits
from node.runtime.header import HeaderInfo, header_priority, read_header
from node.runtime.spool import Spool, SpooledFile, SpoolError, incoming_grace
from node.spool_layout import OUTPUTS_DIR

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["IngestSink"]

LOG = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MIB = 1 << 20


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
        # alone on the spool, whatever is staged is a crash's; shared, another receiver may
        # be writing into a staged file now
        grace = (
            incoming_grace(
                float(getattr(settings, "network_timeout", 60.0)),
                float(getattr(settings, "pdu_receive_timeout", 30.0)),
            )
            if getattr(settings, "spool_shared", False)
            else 0.0
        )
        removed = self.spool.clean_incoming(grace)
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
        header = self.inspect(path, meta)
        if isinstance(header, StoreResult):
            return header
        return self.store_inspected(path, header, meta)

    def store_inspected(self, path: Path, header: HeaderInfo, meta: ReceivedMeta) -> StoreResult:
        """Steps 3 to 6 of the module text, for a file whose ``header`` :meth:`inspect` has
        read and passed (:class:`node.runtime.finals.ReportSink` inspects an SR or PDF
        before it reads it whole); never raises."""
        if self.is_own_object(header.sop_instance_uid):
            # a PACS that routes a study's objects to every node sends the node's drafts
            # back: stored, they would reopen the study and draft it again, in a loop
            LOG.info(
                "C-STORE of the node's own object %s: not stored again", header.sop_instance_uid
            )
            return StoreResult(status=StoreStatus.SUCCESS, outcome="own_object")
        with self._locks.hold(header.sop_instance_uid):
            result = self._store(path, header, meta)
        # the receive log keeps a refused instance's study (integration.association_log)
        return result if result.ok else replace(result, study_uid=header.study_uid or None)

    def is_own_object(self, sop_instance_uid: str) -> bool:
        """Whether the node made the instance itself: a draft SR, Basic Text SR, coded SR,
        Encapsulated PDF, rejection note or synthetic Secondary Capture is written to
        ``<spool>/outputs/<SOP Instance UID>.dcm`` before it is sent (``sop_instance_uid``
        is a validated UID)."""
        return (self.spool.root / OUTPUTS_DIR / f"{sop_instance_uid}.dcm").is_file()

    def inspect(self, path: Path, meta: ReceivedMeta) -> HeaderInfo | StoreResult:
        """Steps 1 and 2 of :meth:`accept`: the received file's header, read within the
        parsing and inflation bounds, with its UIDs checked; never raises.

        :class:`node.runtime.finals.ReportSink` calls it before it reads an SR or PDF
        whole, so a final report is refused as any instance is (PS3.4 Table B.2-1).

        Returns
        -------
        HeaderInfo or StoreResult
            The header, or the refusal: 0xC210 (:func:`node.runtime.header.read_header`)
            or 0xA900-0xA903 (:func:`validate_uids`).
        """
        try:
            header = read_header(path, inflate=self.inflate)
        except DataSetError as exc:
            return StoreResult(status=exc.status, reason=exc.message)
        try:
            validate_uids(header, meta)
        except DataSetError as exc:
            return StoreResult(
                status=exc.status, reason=exc.message, study_uid=header.study_uid or None
            )
        return header

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
        from node.db.instance_record import InstanceRecord
        from node.db.studies import record_instance_detailed

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
            accession_number=header.accession_number or None,
            patient_name=header.patient_name or None,
            patient_id=header.patient_id or None,
            study_date=header.study_date or None,
            spool_path=spooled.relative,
            size_bytes=spooled.size_bytes,
            sha256=spooled.sha256,
            calling_ae=meta.calling_ae or None,
            association_id=meta.association_id,
            received_at=self.clock(),
            priority=header_priority(
                header, calling_ae=meta.calling_ae or None, rules=self.priority_rules
            ),
        )
        with self.session_factory() as session:
            result = record_instance_detailed(session, rec, job_max_attempts=self.job_max_attempts)
        return str(result.outcome.value), result.obsolete_spool_path
