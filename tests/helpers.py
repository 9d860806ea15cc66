"""Small helpers shared by the test suite: free ports, readiness polling, test data."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
"""Test data kept in the repository, with its sources and terms in ``data/README.md``."""
NIH_PNGS = sorted((DATA / "nih-chestxray14").glob("*.png"))


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s: {predicate!r}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_binary(name: str) -> str:
    """Return the path of an executable or skip the test with a clear reason."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh --peers installs it as root)")
    return path


def rg1_file(name: str = "RG1_UNCR.dcm") -> Path:
    """Path of a real chest CR from pydicom-data (RG1_UNCR, RG1_J2KR, RG1_J2KI)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom is not installed")
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available: pip install pydicom-data")
    return Path(str(path))


def require_nih_pngs() -> list[Path]:
    """The two real NIH ChestX-ray14 PNGs in ``tests/data`` ("NIH Clinical Center,
    ChestX-ray8 (Wang et al., CVPR 2017)")."""
    assert len(NIH_PNGS) == 2, f"tests/data/nih-chestxray14 is incomplete: {NIH_PNGS}"
    return NIH_PNGS
