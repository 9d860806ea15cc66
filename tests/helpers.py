"""Small helpers shared by the test suite: free ports, readiness polling, test data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import datetime as dt

    import numpy as np
    import numpy.typing as npt
    from pydicom.dataset import Dataset

    from integration.report_pdf import DraftReportContent
    from node.settings import Settings

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


def node_env(port: int, workdir: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``python -m node.cli serve`` subprocess.

    Parameters
    ----------
    port
        DICOM port (``CXR_NODE_PORT``).
    workdir
        Holds the SQLite file ``node.sqlite3`` and the spool folder ``spool``.
    settings
        Further variables (``CXR_NODE_*`` settings, ``TMPDIR``, ...); they win over the
        ones set here.

    Returns
    -------
    dict
        This process's environment without its ``CXR_NODE_*`` variables, plus the port, the
        database, the spool, no free-disk floor and ``settings``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
    env.update(
        {
            "CXR_NODE_PORT": str(port),
            "CXR_NODE_DATABASE_URL": f"sqlite:///{workdir / 'node.sqlite3'}",
            "CXR_NODE_SPOOL_DIR": str(workdir / "spool"),
            "CXR_NODE_MIN_FREE_DISK_MB": "0",
        }
    )
    env.update(settings or {})
    return env


def spawn_node(
    env: Mapping[str, str], log: Path, *, cwd: Path = REPO, append: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python -m node.cli serve`` with its output (stdout and stderr) in ``log``.

    Parameters
    ----------
    env
        Its environment (see :func:`node_env`).
    log
        The log file, truncated first unless ``append``.
    cwd
        Its working directory.
    append
        Add to ``log`` (a restarted node) instead of truncating it.

    Returns
    -------
    subprocess.Popen
        The running process; stop it with :func:`terminate`.
    """
    with open(log, "ab" if append else "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve"],
            cwd=cwd,
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``proc`` if it runs and wait; SIGKILL it after ``timeout`` seconds.

    Parameters
    ----------
    proc
        The process.
    timeout
        Seconds it has to exit on SIGTERM.

    Returns
    -------
    int
        Its exit code.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


def node_thread(
    settings: Settings, stop: threading.Event, *, daemon: bool = False, **options: Any
) -> tuple[threading.Thread, list[int]]:
    """Start :func:`node.runtime.service.run_node` in a thread.

    Parameters
    ----------
    settings
        The node's settings.
    stop
        Its ``stop_event``: set it, then join the thread.
    daemon
        Whether the thread is a daemon thread.
    **options
        Further keyword arguments of ``run_node`` (``extra_components``, ...).

    Returns
    -------
    tuple
        The started thread, and the list its exit code is appended to when it returns.
    """
    from node.runtime.service import run_node

    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(run_node(settings, stop_event=stop, **options)),
        daemon=daemon,
    )
    thread.start()
    return thread, codes


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


def node_draft_sr(
    image: Dataset,
    *,
    findings: str | None,
    impression: str,
    version: str,
    model: str = "LLM-CXR",
    software_version: str = "llm-cxr-node test",
    demo: bool = True,
    **overrides: Any,
) -> Dataset:
    """The node's draft SR of ``image`` built with :func:`integration.sr.build_draft_sr`.

    Parameters
    ----------
    image
        The image read, also the only evidence.
    findings, impression
        The draft's text.
    version, model
        Algorithm version and name.
    software_version, demo
        As for :func:`~integration.sr.build_draft_sr`; manufacturer is ``llm-cxr-node``.
    **overrides
        Further keyword arguments of :func:`~integration.sr.build_draft_sr` (e.g.
        ``series_number``); SOP Instance and Series Instance UIDs default to the node's own
        (:func:`integration.uids.sr_instance_uid`, :func:`~integration.uids.sr_series_uid`).

    Returns
    -------
    Dataset
        The SR, not written anywhere.
    """
    from integration.sr import build_draft_sr
    from integration.uids import sr_instance_uid, sr_series_uid

    study = str(image.StudyInstanceUID)
    args: dict[str, Any] = {
        "sop_instance_uid": sr_instance_uid(
            study,
            model,
            version,
            inputs=[str(image.SOPInstanceUID)],
            findings=findings,
            impression=impression,
        ),
        "series_instance_uid": sr_series_uid(study, model, version),
        **overrides,
    }
    return build_draft_sr(
        evidence=[image],
        image_read=image,
        findings=findings,
        impression=impression,
        algorithm_name=model,
        algorithm_version=version,
        manufacturer="llm-cxr-node",
        software_version=software_version,
        demo=demo,
        **args,
    )


def node_draft_content(
    image: Dataset,
    *,
    findings: str,
    impression: str,
    model: str,
    version: str,
    generated_at: dt.datetime,
    thumbnail: npt.NDArray[np.uint8] | None = None,
) -> DraftReportContent:
    """What the node's draft report PDF of ``image`` shows (DEMO model, software 0.1.0).

    Parameters
    ----------
    image
        The image read: the header comes from it.
    findings, impression
        The draft's text.
    model, version
        Algorithm name and version.
    generated_at
        When the draft was made.
    thumbnail
        The image as shown; default: ``image`` as the node's 8-bit grey conversion.

    Returns
    -------
    DraftReportContent
        For :func:`integration.report_pdf.render_report_pdf`.
    """
    from integration.pixels import to_gray8
    from integration.report_pdf import DraftReportContent, report_header_from

    return DraftReportContent(
        header=report_header_from(image),
        impression=impression,
        findings=findings,
        model_name=model,
        model_version=version,
        demo=True,
        generated_at=generated_at,
        software_version="0.1.0",
        thumbnail=to_gray8(image) if thumbnail is None else thumbnail,
    )


def node_draft_pdf(
    pdf: bytes, source: Dataset, *, model: str, version: str, **overrides: Any
) -> Dataset:
    """The node's draft PDF of ``source`` as an Encapsulated PDF instance (DEMO model).

    Parameters
    ----------
    pdf
        The rendered report.
    source
        The image the report is of.
    model, version
        Algorithm name and version.
    **overrides
        Further keyword arguments of :func:`integration.encapsulated_pdf.build_encapsulated_pdf`
        (``created_at`` is required); the UIDs default to ``deterministic_uid("pdf", study)``
        and ``deterministic_uid("pdf-series", study)``, the series number to 9902.

    Returns
    -------
    Dataset
        The Encapsulated PDF instance, not written anywhere.
    """
    from integration.encapsulated_pdf import build_encapsulated_pdf
    from integration.uids import deterministic_uid

    study = str(source.StudyInstanceUID)
    args: dict[str, Any] = {
        "sop_instance_uid": deterministic_uid("pdf", study),
        "series_instance_uid": deterministic_uid("pdf-series", study),
        "series_number": 9902,
        "demo": True,
        "manufacturer": "llm-cxr-node",
        "software_version": "0.1.0",
        **overrides,
    }
    return build_encapsulated_pdf(
        pdf, source=source, algorithm_name=model, algorithm_version=version, **args
    )
