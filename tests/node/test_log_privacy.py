"""Issue #22, item 1: the node's log withholds what libraries quote from patient data.

Real libraries, real faults, the node's real logging set-up (``configure_logging`` writing to
a buffer): highdicom's single-component name warning, pydicom's invalid-value warning and
element-by-element debug output, SQLAlchemy's statement parameters and result rows, and a
pydicom exception logged with its traceback. The node's own lines (UIDs, AE titles) stay as
they are. The whole pipeline at DEBUG is ``tests/e2e/test_no_phi_in_logs.py``.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.uid import generate_uid
from pydicom.valuerep import DA
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from integration.errors import SRBuildError
from integration.privacy import REDACTED, redact_patient_values
from integration.sc import build_synthetic_sc
from node.db.engine import make_engine
from node.logging_setup import WITHHELD, configure_logging
from node.runtime.spool import spool_relative_path
from tests.helpers import node_draft_sr, rg1_file

NAME = "DOE JOHN"
BIRTH = "1962-07-30"  # ISO form: not a valid DA (PS3.5 6.2)
REPORT = "Maginfrared carc follow variations"


@pytest.fixture
def node_log() -> Iterator[io.StringIO]:
    """The node's handler (``configure_logging("DEBUG")``) writing to a buffer.

    Python warnings are shown every time while the test runs; the root logger, its handlers,
    the library levels ``configure_logging`` sets and ``warnings.showwarning`` are restored
    afterwards.
    """
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    libraries = {n: logging.getLogger(n).level for n in ("pynetdicom", "apscheduler", "alembic")}
    for h in list(root.handlers):
        if h.name == "cxr-node":
            root.removeHandler(h)
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging("DEBUG", stream=buf)
        try:
            yield buf
        finally:
            for h in list(root.handlers):
                if h not in saved[1]:
                    root.removeHandler(h)
            for h in saved[1]:
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(saved[0])
            for name, level in libraries.items():
                logging.getLogger(name).setLevel(level)


def _header(**values: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(rg1_file(), stop_before_pixels=True)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _sr(evidence: pydicom.Dataset) -> hd.sr.ComprehensiveSR:
    return node_draft_sr(
        evidence,
        findings=None,
        impression="No acute findings.",
        version="test",
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=9900,
        instance_number=1,
    )


# --- at the source: the node's SR and SC builders ------------------------------------------


def test_sr_and_sc_builders_raise_no_name_warning() -> None:
    """highdicom's check quotes single-component names; the builders keep it quiet."""
    ref = _header(PatientName=NAME, ReferringPhysicianName="WELBY MARCUS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = _sr(ref)
        sc = build_synthetic_sc(
            np.zeros((8, 8), np.uint8), model_name="m", model_version="1", demo=True, reference=ref
        )
    assert str(sr.PatientName) == NAME and str(sc.PatientName) == NAME
    quoted = [
        str(w.message) for w in caught if "DOE" in str(w.message) or "WELBY" in str(w.message)
    ]
    assert not quoted


def test_sr_build_error_redacts_the_value_highdicom_quotes() -> None:
    """A malformed birth date fails the SR; the error (job error, log, API) omits it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when the test sets the bad value
        ref = _header(PatientName=NAME, PatientBirthDate=BIRTH, PatientID="PID-40417")
    with pytest.raises(SRBuildError) as info:
        _sr(ref)
    message = str(info.value)
    assert f"'{REDACTED}'" in message and "'DA'" in message
    assert BIRTH not in message and "19620730" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_redact_patient_values_covers_parts_and_date_forms() -> None:
    ds = _header(PatientName="Müller^Jürgen", PatientID="PID-1", PatientBirthDate="19620511")
    out = redact_patient_values(
        "müller, Jürgen, PID-1, born 1962-05-11 (19620511); study 1.2.3", [ds]
    )
    assert out == (f"{REDACTED}, {REDACTED}, {REDACTED}, born {REDACTED} ({REDACTED}); study 1.2.3")


# --- the process-wide guard: the node's log handler -----------------------------------------


def test_library_warning_text_is_withheld(node_log: io.StringIO) -> None:
    """The issue's leak: highdicom's warning quotes the name; the log keeps only where."""
    hd.sc.SCImage(
        pixel_array=np.zeros((8, 8), np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=1,
        instance_number=1,
        manufacturer="test",
        patient_id="PID-40417",
        patient_name=NAME,
        patient_orientation=("L", "F"),
    )
    ds = pydicom.Dataset()
    ds.PatientBirthDate = BIRTH  # pydicom: "Invalid value for VR DA: '1962-07-30'."
    out = node_log.getvalue()
    assert "DOE" not in out and "JOHN" not in out and BIRTH not in out, out
    assert "WARNING py.warnings: UserWarning at highdicom/" in out
    assert "WARNING py.warnings: UserWarning at pydicom/valuerep.py" in out
    assert f"WARNING pydicom: pydicom/misc.py:82: {WITHHELD}" in out


def test_pydicom_debug_output_is_withheld(node_log: io.StringIO, tmp_path: Path) -> None:
    """pydicom's debug mode logs every element it reads, values included."""
    path = tmp_path / "cxr.dcm"
    _header(PatientName=NAME, PatientID="PID-40417").save_as(path, enforce_file_format=True)
    level, debugging = logging.getLogger("pydicom").level, pydicom.config.debugging
    pydicom.config.debug(True, default_handler=False)
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    finally:
        logging.getLogger("pydicom").setLevel(level)
        pydicom.config.debugging = debugging
    out = node_log.getvalue()
    assert out.count("DEBUG pydicom: pydicom/filereader.py") > 50
    assert "DOE" not in out and "PID-40417" not in out and "b'" not in out


def test_sql_parameters_and_rows_stay_out_of_logs_and_errors(
    node_log: io.StringIO, tmp_path: Path
) -> None:
    """Report text bound as a parameter: not in INFO statements, DEBUG rows, nor the error."""
    engine_log = logging.getLogger("sqlalchemy.engine")
    level = engine_log.level
    engine_log.setLevel(logging.DEBUG)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE drafts (id INTEGER PRIMARY KEY, report TEXT)"))
            conn.execute(text("INSERT INTO drafts VALUES (1, :r)"), {"r": REPORT})
            assert conn.execute(text("SELECT report FROM drafts")).scalar() == REPORT
        with pytest.raises(IntegrityError) as info, engine.begin() as conn:
            conn.execute(text("INSERT INTO drafts VALUES (1, :r)"), {"r": REPORT})
    finally:
        engine.dispose()
        engine_log.setLevel(level)
    out = node_log.getvalue()
    assert "INSERT INTO drafts VALUES" in out and "hide_parameters=True" in out
    assert "DEBUG sqlalchemy.engine.Engine:" in out  # the rows, withheld
    assert REPORT not in out and "Maginfrared" not in out
    assert "Maginfrared" not in str(info.value)


def test_tracebacks_withhold_library_messages_and_keep_the_nodes(
    node_log: io.StringIO,
) -> None:
    log = logging.getLogger("node.test")
    try:
        DA(BIRTH)
    except ValueError:
        log.exception("converting failed")
    try:
        spool_relative_path(study_uid="1.2.x", series_uid="1.2", sop_instance_uid="1.3", sha256="")
    except ValueError:
        log.exception("spool path refused")
    out = node_log.getvalue()
    assert BIRTH not in out
    assert f"ValueError: ({WITHHELD})" in out
    assert "pydicom/valuerep.py" in out  # the stack is kept
    assert "ValueError: Study Instance UID '1.2.x' is not a valid UID" in out


def test_the_nodes_own_lines_and_pynetdicom_stay_readable(node_log: io.StringIO) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    logging.getLogger("integration.scp").info("C-STORE 0x0000 new from %r sop=%s", "PACS", uid)
    logging.getLogger("pynetdicom.acse").info("Accepting Association")
    logging.getLogger("highdicom.base").info('copy Patient-related attributes from "%s"', uid)
    out = node_log.getvalue()
    assert f"INFO integration.scp: C-STORE 0x0000 new from 'PACS' sop={uid}" in out
    assert "INFO pynetdicom.acse: Accepting Association" in out
    assert f'copy Patient-related attributes from "{uid}"' in out
    assert WITHHELD not in out
