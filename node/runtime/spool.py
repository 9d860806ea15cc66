"""The durable spool: received DICOM files, fsync'd before the C-STORE success goes out.

Layout: ``<spool>/<Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.<h>.dcm``
where ``<h>`` is the first 16 hex digits of the file's SHA-256. UIDs are digits and dots
(PS3.5 9.1; the node refuses other UIDs), so they are safe path names as they are.

Why the content hash in the name: a duplicate SOP Instance UID with *different* content is
written to its own file, never over the file the committed SQL row points to; only after the
row is committed does the old file become obsolete and get deleted. An identical duplicate
lands on the same name and the existing file is left untouched. A crash at any point leaves
either the old state or the new state plus, at worst, an unreferenced file.

Write protocol (POSIX): stage in ``<spool>/.incoming/`` (same filesystem), ``fsync`` the
file, ``os.replace`` it into place (atomic), ``fsync`` the directory (and any directory
created on the way), so the name survives power loss. A received file renamed into
``.incoming`` is fsync'd in a helper thread while this thread reads it for its SHA-256; both
end before the file is placed. Files are 0600 and folders 0700 (patient
data, :mod:`node.filemodes`).

Received data sets arrive in ``.incoming`` as well: ``cxr-node serve`` points Python's
``tempfile`` there (:func:`node.runtime.service.stage_tempfiles_in_spool`), where pynetdicom writes
each incoming C-STORE data set, so patient data is never written outside the spool; what an
aborted transfer leaves is removed when its connection closes (:mod:`integration.scp`) and
what a crash leaves at the next start and by the hourly chore, once it has been left alone
for :data:`STALE_INCOMING_SECONDS` (:meth:`Spool.clean_incoming`: receivers on other hosts
may share the spool and be writing there now).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from integration.status import StoreStatus
from node.filemodes import DIR_MODE, FILE_MODE, make_private_dir
from node.spool_layout import OUTPUTS_DIR

__all__ = [
    "INCOMING",
    "OUTPUTS_DIR",
    "RECEIVED_GLOB",
    "STALE_INCOMING_SECONDS",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolIOError",
    "SpooledFile",
    "fsync_dir",
    "incoming_grace",
    "spool_relative_path",
]

LOG = logging.getLogger(__name__)

INCOMING = ".incoming"
#: the least time a staged file is left alone before it is taken for a crash's leftover
STALE_INCOMING_SECONDS = 900.0


def incoming_grace(network_timeout: float, pdu_receive_timeout: float) -> float:
    """Seconds a staged file must be unchanged before :meth:`Spool.clean_incoming` deletes
    it: :data:`STALE_INCOMING_SECONDS`, or twice the longest a living association may go
    without a byte (``network_timeout``) or spend on one PDU (``pdu_receive_timeout``)."""
    return max(STALE_INCOMING_SECONDS, 2.0 * max(network_timeout, pdu_receive_timeout))


#: Received data sets in the staging folder: pynetdicom's ``NamedTemporaryFile(suffix=".dcm")``
#: (default prefix ``tmp``) while a C-STORE arrives (``node.runtime.service`` points
#: ``tempfile`` there).
RECEIVED_GLOB = "tmp*.dcm"
_MIB = 1 << 20
_CHUNK = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class SpoolError(OSError):
    """Writing the spool failed; carries the C-STORE status to answer (PS3.4 B.2-1)."""

    status: StoreStatus = StoreStatus.OUT_OF_RESOURCES_SPOOL_IO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SpoolFullError(SpoolError):
    """Free space below the floor or the disk is full: 0xA700, transient."""

    status = StoreStatus.OUT_OF_RESOURCES_DISK


class SpoolIOError(SpoolError):
    """Another operating-system error writing the spool: 0xA702, transient."""

    status = StoreStatus.OUT_OF_RESOURCES_SPOOL_IO


@dataclass(frozen=True, slots=True)
class SpooledFile:
    """A file durably in the spool.

    Parameters
    ----------
    path
        Absolute path.
    relative
        Path relative to the spool root (POSIX separators), as recorded in SQL.
    size_bytes
        File size.
    sha256
        Hex SHA-256 of the whole file.
    already_present
        ``True`` when an identical file was already there (nothing was written).
    """

    path: Path
    relative: str
    size_bytes: int
    sha256: str
    already_present: bool


def spool_relative_path(
    *, study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str
) -> PurePosixPath:
    """The spool-relative path of an instance (see the module docstring for the layout)."""
    for concept, uid in (
        ("Study Instance UID", study_uid),
        ("Series Instance UID", series_uid),
        ("SOP Instance UID", sop_instance_uid),
    ):
        if not uid or len(uid) > 64 or uid.strip("0123456789.") or uid.startswith("."):
            raise ValueError(f"{concept} {uid!r} is not a valid UID (PS3.5 9.1)")
    if len(sha256) != 64:
        raise ValueError("sha256 must be 64 hex digits")
    return PurePosixPath(study_uid, series_uid, f"{sop_instance_uid}.{sha256[:16]}.dcm")


def fsync_dir(path: Path) -> None:
    """fsync a directory, making a rename or a new entry in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsyncs that overlap the hashing of the same file (Spool._stage); a thread that waits on the
# disk takes no CPU, so a few serve every association of the process
_FSYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-fsync")


def _wrap(exc: OSError, what: str) -> SpoolError:
    if exc.errno in _FULL_ERRNOS:
        return SpoolFullError(f"spool disk full while {what} ({errno.errorcode[exc.errno]})")
    name = errno.errorcode.get(exc.errno or 0, "?")
    return SpoolIOError(f"spool I/O error while {what} ({name})")


class Spool:
    """The spool directory.

    Parameters
    ----------
    root
        Spool directory; created if missing.
    min_free_bytes
        Refuse (0xA700, transient) an instance that would leave less free space than this on
        the spool's filesystem; ``None`` lets the caller supply the floor per call.
    fsync
        Whether to fsync files and directories (leave ``True`` outside benchmarks).
    """

    def __init__(
        self, root: Path | str, *, min_free_bytes: int | None = None, fsync: bool = True
    ) -> None:
        if min_free_bytes is not None and min_free_bytes < 0:
            raise ValueError(f"spool free-space floor must be >= 0 bytes, got {min_free_bytes}")
        self.root = Path(root).absolute()
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.incoming = self.root / INCOMING
        make_private_dir(self.incoming)  # 0700, as every spool folder (node.filemodes)

    # --- space ------------------------------------------------------------------------

    def free_bytes(self, path: Path | None = None) -> int:
        """Bytes available to this process on the file system of ``path`` (default: the
        spool root), from ``statvfs``."""
        st = os.statvfs(self.root if path is None else path)
        return int(st.f_bavail * st.f_frsize)

    def watched(self, also: Mapping[str, Path] | None = None) -> dict[str, Path]:
        """The folders the node writes to, one per file system, by label.

        The spool root (``spool``), the staging folder (``staging``: ``.incoming``, where
        ``cxr-node serve`` has pynetdicom write received data sets), ``outputs`` (SRs) once
        it exists, then ``also`` (e.g. ``{"database": <SQLite file's folder>}``); a folder on
        the same file system (``st_dev``) as an earlier one, or missing, is left out.
        """
        folders = {"spool": self.root, "staging": self.incoming}
        if (self.root / OUTPUTS_DIR).is_dir():
            folders["outputs"] = self.root / OUTPUTS_DIR
        folders.update(also or {})
        seen: set[int] = set()
        out: dict[str, Path] = {}
        for label, folder in folders.items():
            try:
                dev = os.stat(folder).st_dev
            except OSError:
                continue
            if dev not in seen:
                seen.add(dev)
                out[label] = folder
        return out

    def check_free(
        self,
        incoming_bytes: int,
        *,
        floor_bytes: int | None = None,
        also: Mapping[str, Path] | None = None,
    ) -> None:
        """Raise :class:`SpoolFullError` (0xA700) when a file system the node writes to has
        less free space than the floor (``min_free_disk_mb``).

        Parameters
        ----------
        incoming_bytes
            Bytes still to be written on the spool root's file system for this instance (0
            when the received file is already there and is only renamed).
        floor_bytes
            The floor; default the spool's ``min_free_bytes``.
        also
            More folders to check (see :meth:`watched`).
        """
        floor = self.min_free_bytes if floor_bytes is None else floor_bytes
        floor = floor or 0
        for label, folder in self.watched(also).items():
            free = self.free_bytes(folder)
            need = incoming_bytes if label == "spool" else 0
            if free - need < floor:
                extra = " + this instance" if need else ""
                raise SpoolFullError(
                    f"{label} disk: {free // _MIB} MiB free, floor {floor // _MIB} MiB{extra}"
                )

    # --- writing ----------------------------------------------------------------------

    def _stage(self, src: Path) -> tuple[Path, int, str]:
        """Move (or copy) ``src`` into ``.incoming``; return (path, size, sha256)."""
        stage = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        try:
            os.replace(src, stage)
            moved = True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise _wrap(exc, "moving the received file") from exc
            moved = False
        try:
            if moved:
                # the data is in the page cache: write it out while reading it for the hash
                synced = _FSYNC_POOL.submit(_fsync_file, stage) if self.fsync else None
                try:
                    with open(stage, "rb") as fh:
                        while chunk := fh.read(_CHUNK):
                            digest.update(chunk)
                        size = fh.tell()
                finally:
                    if synced is not None:
                        synced.result()  # its OSError is this write's error
            else:
                size = 0
                with open(src, "rb") as fin, open(stage, "wb") as fout:
                    while chunk := fin.read(_CHUNK):
                        digest.update(chunk)
                        fout.write(chunk)
                        size += len(chunk)
                    fout.flush()
                    if self.fsync:
                        os.fsync(fout.fileno())
        except OSError as exc:
            stage.unlink(missing_ok=True)
            raise _wrap(exc, "writing the staged file") from exc
        return stage, size, digest.hexdigest()

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entries changed."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=DIR_MODE)
            if self.fsync:
                fsync_dir(d.parent)

    def store(
        self,
        src: Path,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        floor_bytes: int | None = None,
        also: Mapping[str, Path] | None = None,
    ) -> SpooledFile:
        """Durably place the file ``src`` (consumed: moved or copied) in the spool.

        Parameters
        ----------
        src
            The received Part 10 file.
        study_uid, series_uid, sop_instance_uid
            (0020,000D), (0020,000E), (0008,0018) of the data set (valid UIDs).
        floor_bytes
            Free-space floor for this call (default: the spool's ``min_free_bytes``).
        also
            More folders whose file systems must keep the floor (:meth:`check_free`).

        Returns
        -------
        SpooledFile

        Raises
        ------
        SpoolFullError
            Below the free-space floor, or ENOSPC/EDQUOT (status 0xA700).
        SpoolIOError
            Any other OS error (status 0xA702).
        """
        st = src.stat()
        # a file already on the spool's file system (pynetdicom's, under .incoming) is renamed
        # into place and needs no more space there
        incoming = 0 if st.st_dev == os.stat(self.root).st_dev else st.st_size
        self.check_free(incoming, floor_bytes=floor_bytes, also=also)
        stage, size, sha = self._stage(src)
        rel = spool_relative_path(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            sha256=sha,
        )
        final = self.root / rel
        try:
            os.chmod(stage, FILE_MODE)  # patient data: 0600 whatever created the file
            self._makedirs(final.parent)
            if final.exists() and final.stat().st_size == size:
                # Same name = same SHA-256 prefix and size: an identical duplicate.
                stage.unlink()
                return SpooledFile(final, str(rel), size, sha, already_present=True)
            os.replace(stage, final)
            if self.fsync:
                fsync_dir(final.parent)
        except OSError as exc:
            stage.unlink(missing_ok=True)
            raise _wrap(exc, "renaming into the spool") from exc
        return SpooledFile(final, str(rel), size, sha, already_present=False)

    def discard(self, spooled: SpooledFile) -> None:
        """Undo :meth:`store` when the instance could not be recorded.

        A file that was already present (an identical duplicate, referenced by SQL) is kept.
        """
        if spooled.already_present:
            return
        self.remove(spooled.relative)

    def remove(self, relative: str) -> None:
        """Delete a spool file (relative path) and fsync its directory; missing is fine."""
        path = self.root / relative
        if ".." in PurePosixPath(relative).parts or PurePosixPath(relative).is_absolute():
            raise ValueError(f"spool path {relative!r} must stay inside the spool")
        try:
            path.unlink(missing_ok=True)
            if self.fsync and path.parent.exists():
                fsync_dir(path.parent)
        except OSError:
            LOG.warning("could not delete spool file %s", relative, exc_info=True)

    def clean_incoming(self, older_than_seconds: float = STALE_INCOMING_SECONDS) -> int:
        """Delete staged files left by a crash (never acknowledged); return how many.

        The node's own staged files (``*.part``) and the data sets pynetdicom was receiving
        into the staging folder (``tmp*.dcm``, :data:`RECEIVED_GLOB`) when a process died,
        once unchanged for ``older_than_seconds``: several receivers may share the spool,
        and a file another one is receiving into right now is written to at least every
        ``network_timeout`` (or its association is aborted and the file removed), so a
        file left alone that long belongs to no living transfer (:func:`incoming_grace`).
        Called at start and by the hourly retention chore.
        """
        cutoff = time.time() - older_than_seconds
        n = 0
        for pattern in ("*.part", RECEIVED_GLOB):
            for p in self.incoming.glob(pattern):
                with contextlib.suppress(OSError):
                    if p.stat().st_mtime <= cutoff:
                        p.unlink()
                        n += 1
        return n

    def used_bytes(self) -> int:
        """Total size of the spooled ``.dcm`` files (walks the tree; data sets still being
        received in the staging folder are not counted)."""
        total = 0
        for dirpath, dirs, files in os.walk(self.root):
            if Path(dirpath) == self.root and INCOMING in dirs:
                dirs.remove(INCOMING)
            for f in files:
                if f.endswith(".dcm"):
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(dirpath, f)).st_size
        return total

    def disk_usage(self) -> shutil._ntuple_diskusage:
        """``shutil.disk_usage`` of the spool's filesystem."""
        return shutil.disk_usage(self.root)
