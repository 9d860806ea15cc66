"""The staged file's fsync runs beside its hashing (a helper thread): its failure is still the
write's failure. A disk that fails fsync cannot be made here, so ``_fsync_file`` is replaced
by one that raises the errno a failing disk gives; everything else is the real spool."""

from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from integration.status import StoreStatus
from node.runtime import spool as spool_mod
from node.runtime.spool import Spool, SpoolFullError, SpoolIOError

DATA = b"\0" * (3 << 20)  # several read chunks: the hash runs while the file syncs


def _received(spool: Spool) -> Path:
    """A received file where pynetdicom leaves it: in the spool's staging folder."""
    path = spool.incoming / "tmp-received.dcm"
    path.write_bytes(DATA)
    return path


def _store(spool: Spool, src: Path) -> None:
    spool.store(
        src, study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=generate_uid()
    )


@pytest.mark.parametrize(
    ("code", "error", "status"),
    [
        (errno.EIO, SpoolIOError, StoreStatus.OUT_OF_RESOURCES_SPOOL_IO),
        (errno.ENOSPC, SpoolFullError, StoreStatus.OUT_OF_RESOURCES_DISK),
    ],
)
def test_a_failed_fsync_refuses_and_leaves_nothing_placed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    error: type[Exception],
    status: int,
) -> None:
    spool = Spool(tmp_path / "spool")
    src = _received(spool)
    threads: list[str] = []

    def failing(path: Path) -> None:
        threads.append(threading.current_thread().name)
        raise OSError(code, "simulated")

    monkeypatch.setattr(spool_mod, "_fsync_file", failing)
    with pytest.raises(error) as caught:
        _store(spool, src)
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert threads and threads[0].startswith("spool-fsync")  # it ran in the helper thread
    assert list((tmp_path / "spool").rglob("*.dcm")) == []  # nothing placed
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []  # nothing staged left


def test_a_good_fsync_places_the_file_with_its_hash(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    src = _received(spool)
    placed = spool.store(
        src, study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=generate_uid()
    )
    assert placed.sha256 == hashlib.sha256(DATA).hexdigest()
    assert placed.path.read_bytes() == DATA
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []
