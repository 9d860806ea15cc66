"""Suite-wide setup.

Node processes that tests start (``cxr-node serve`` subprocesses, ``run_node`` threads) run
without the admin API unless a test turns it on with its own free port: the API's default
port (8080) would otherwise be shared by every node the suite starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("CXR_NODE_API_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# fixtures of real HL7 and FHIR receivers (hl7_listener, fhir_server), for every test package
pytest_plugins = ["tests.receivers"]


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model bundle (tiny random GPT-NeoX + VQ-GAN, real LLM-CXR layout), built once
    per session; read-only: a test that changes a bundle copies it first."""
    from models.demo import create_demo_bundle

    out = tmp_path_factory.mktemp("bundle") / "demo"
    create_demo_bundle(out)
    return out


@pytest.fixture
def host_at_plus_0530(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time zone is UTC+05:30 (a POSIX TZ: no zone database needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
