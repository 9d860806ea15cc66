"""Private files and folders for patient data: umask 0077, files 0600, folders 0700.

Everything the node writes that holds patient data is readable by the node's own user only:
the spool (received instances, ``.incoming`` staging, ``outputs`` SRs), the SQLite database
with its ``-wal``/``-shm``/``-journal`` files (SQLite creates those with the database file's
mode), and the demo's work directory and stand-in PACS inbox.

Two layers:

- ``cxr-node serve``, ``worker`` and ``demo`` set the process umask to :data:`PRIVATE_UMASK`
  at start (:func:`apply_private_umask`), so files that libraries create on their own
  (pynetdicom's received-data temporary files, SQLite's journals) are private too;
  ``deploy/cxr-node.service`` sets ``UMask=0077`` as well;
- the node creates its files and folders with explicit modes (:func:`open_private`,
  :func:`make_private_dir`, :func:`private_file`), so they are private whatever the umask
  of the process that embeds it (tests, ``run_node`` in another program).

An existing spool root or database file with group or other permission bits (from an
earlier version) is tightened at start when this user owns it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "PRIVATE_UMASK",
    "apply_private_umask",
    "make_private_dir",
    "open_private",
    "private_file",
    "tighten",
]

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700


def apply_private_umask() -> int:
    """Set the process umask to :data:`PRIVATE_UMASK` (0077); return the previous one."""
    return os.umask(PRIVATE_UMASK)


def tighten(path: Path, mode: int) -> bool:
    """Drop group and other permission bits of ``path`` down to ``mode``.

    Parameters
    ----------
    path
        A file or folder; a missing one, or one another user owns, is left alone.
    mode
        The wanted mode (:data:`FILE_MODE` or :data:`DIR_MODE`).

    Returns
    -------
    bool
        Whether the mode was changed.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_uid != os.geteuid() or (st.st_mode & 0o777) & ~mode == 0:
        return False
    with contextlib.suppress(PermissionError):
        os.chmod(path, (st.st_mode & 0o777) & mode)
        return True
    return False


def make_private_dir(path: Path, *, tighten_existing: bool = False) -> None:
    """Create ``path`` and its missing parents with mode :data:`DIR_MODE` (0700).

    Parameters
    ----------
    path
        The folder.
    tighten_existing
        Also :func:`tighten` ``path`` itself when it already exists (the spool root).

    Raises
    ------
    OSError
        When a folder cannot be created.
    """
    missing: list[Path] = []
    d = path
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
    if tighten_existing and not missing:
        tighten(path, DIR_MODE)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode :data:`FILE_MODE` when missing, else tighten it.

    Raises
    ------
    OSError
        When the file cannot be created.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        tighten(path, FILE_MODE)


def open_private(path: Path) -> BinaryIO:
    """Open ``path`` for binary writing (created or truncated) with mode :data:`FILE_MODE`.

    A file that already exists is set to 0600 as well.

    Raises
    ------
    OSError
        When the file cannot be opened.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")
