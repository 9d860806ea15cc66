"""Staged files in a spool that several receivers share: a starting receiver (or the hourly
chore) deletes only what no living transfer can still be writing (#29, several receivers)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from node.runtime.spool import STALE_INCOMING_SECONDS, Spool, incoming_grace


def _staged(spool: Spool, name: str, age_s: float) -> Path:
    path = spool.incoming / name
    path.write_bytes(b"partial data set")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_staged_files_left_alone_past_the_grace_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    grace = incoming_grace(60.0, 30.0)
    assert grace == STALE_INCOMING_SECONDS  # 2 x 60 s is shorter than the floor
    assert incoming_grace(60.0, 3600.0) == 7200.0  # a long PDU allowance lengthens it
    live = _staged(spool, "tmpabc123.dcm", 5)  # another receiver is writing into it
    live_part = _staged(spool, f"{'a' * 32}.part", 60)
    crashed = _staged(spool, "tmpdead01.dcm", grace + 60)
    crashed_part = _staged(spool, f"{'b' * 32}.part", grace + 60)
    other = _staged(spool, "notes.txt", grace + 60)  # not a staging pattern: never touched

    assert spool.clean_incoming(grace) == 2
    assert live.exists() and live_part.exists() and other.exists()
    assert not crashed.exists() and not crashed_part.exists()
    # a second receiver starting on the same spool leaves the living transfer alone too
    assert Spool(tmp_path / "spool", fsync=False).clean_incoming(grace) == 0
    assert live.exists()
    assert spool.clean_incoming(0) == 2  # no grace: everything staged goes


def test_a_starting_receiver_on_a_shared_spool_spares_living_transfers(tmp_path: Path) -> None:
    from node.runtime.ingest import IngestSink
    from node.settings import load_settings

    spool = Spool(tmp_path / "spool", fsync=False)
    live = _staged(spool, "tmplive01.dcm", 5)
    crashed = _staged(spool, "tmpdead01.dcm", 3600)
    url = f"sqlite:///{tmp_path}/n.db"
    shared = load_settings(spool_dir=tmp_path / "spool", database_url=url, spool_shared=True)
    IngestSink(settings=shared, session_factory=lambda: None)  # type: ignore[arg-type,return-value]
    assert live.exists() and not crashed.exists()
    alone = load_settings(spool_dir=tmp_path / "spool", database_url=url)
    IngestSink(settings=alone, session_factory=lambda: None)  # type: ignore[arg-type,return-value]
    assert not live.exists()  # one receiver: whatever is staged at start is a crash's
