"""Small helpers shared by the test suite: free ports, readiness polling, test data."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_ASSETS = SHARED / "assets"
NIH_PNGS = sorted((SHARED_ASSETS / "cxr" / "nih-chestxray14").glob("*.png"))
NEOX_TOKENIZER = SHARED_ASSETS / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


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
    """The two real NIH ChestX-ray14 PNGs from ../shared, or skip."""
    if len(NIH_PNGS) < 2:
        pytest.skip(f"NIH ChestX-ray14 PNGs not found under {SHARED_ASSETS}")
    return NIH_PNGS
