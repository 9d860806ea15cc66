"""The files of outbound objects: written durably and privately under ``<spool>/outputs``.

Every object the node sends (SR, PDF, HL7 message, FHIR Bundle, rejection note, Secondary
Capture) is a file under ``<spool>/outputs`` before its delivery row is queued
(:mod:`node.db.deliveries`): written to a temporary file, fsynced, renamed into place and
the folder fsynced, so that a crash leaves either the old file or the new one. Files are
0600 and the folder 0700 (:mod:`node.filemodes`): they carry patient data.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from node.filemodes import make_private_dir, open_private
from node.runtime.spool import OUTPUTS_DIR, fsync_dir

__all__ = ["short_digest", "spool_relative", "write_output"]


def write_output(
    data: bytes | Dataset,
    outputs_dir: Path,
    name: str,
    *,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write ``data`` durably and privately to ``<outputs_dir>/<name>`` (replacing).

    A temporary file in the same folder (0600), ``fsync``, ``before_rename()`` (e.g. a
    lease check that raises), atomic ``os.replace``, ``fsync`` of the folder (created 0700
    when missing, :mod:`node.filemodes`). A :class:`~pydicom.dataset.Dataset` is written
    as a DICOM Part 10 file (PS3.10 §7).
    """
    make_private_dir(outputs_dir)
    final = outputs_dir / name
    tmp = outputs_dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open_private(tmp) as fh:
            if isinstance(data, Dataset):
                data.save_as(fh, enforce_file_format=True)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, final)
        fsync_dir(outputs_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def spool_relative(path: Path) -> str:
    """``outputs/<name>``: how a delivery row names a file written by :func:`write_output`."""
    return f"{OUTPUTS_DIR}/{path.name}"


def short_digest(text: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``text`` (a file name part per destination)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
