"""Issue #22, items 1 and 11: no patient attribute in any log line, private files, end to end.

One real ``cxr-node serve`` process (demo model bundle, SQLite, local spool) receives six
chest CR studies from DCMTK ``storescu`` and delivers the draft SRs to DCMTK ``storescp``.
The studies carry realistic patient attributes: a single-component name with no caret
("DOE JOHN", the one highdicom's name check quotes), "O'BRIEN^SEAN", "Müller^Jürgen" in
Latin-1 (ISO_IR 100), "山田^太郎" in UTF-8 (ISO_IR 192), "Sørensen^Åse" declared UTF-8 but
sent in Latin-1, Patient IDs, birth dates, accession
numbers, a referring physician; the sixth has a birth date in ISO form ("1962-07-30", not a
valid DA), which highdicom refuses when it builds the SR (quoting it in its error).

Logging is as loud as it gets: ``log_level = DEBUG``, every library logger at DEBUG
(``sqlalchemy.engine`` logs its result rows there), pydicom's element-by-element debug
output on, and Python warnings shown every time (``-W always``). Every stream is searched
for every attribute value and its parts, in plain and escaped forms, and for the drafts'
report text: the node's stdout and stderr, the SCP's output, each SCU's output, and the
failed job's error text. Then the mode of every file and folder the node created (spool,
``.incoming``, ``outputs``, database and its ``-wal``/``-shm``) must be 0600/0700, and the
running process's umask 0077.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.helpers import (
    REPO,
    free_port,
    port_open,
    require_binary,
    rg1_file,
    terminate,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE_AE = "LLMCXR"
PACS_AE = "PACS"

# The node as ``cxr-node serve``, with every library logger at DEBUG before the node starts
# (the node's own configure_logging then sets the root to DEBUG from CXR_NODE_LOG_LEVEL).
LAUNCHER = """
import logging, sys
import pydicom.config
pydicom.config.debug(True, default_handler=False)  # every element read, with its value
for name in ("pydicom", "highdicom", "pynetdicom", "sqlalchemy", "sqlalchemy.engine",
             "sqlalchemy.pool", "sqlalchemy.orm", "alembic", "apscheduler", "uvicorn",
             "httpx", "PIL", "transformers", "torch", "onnxruntime", "asyncio"):
    logging.getLogger(name).setLevel(logging.DEBUG)
from node.cli import main
sys.argv = ["cxr-node", "serve"]
main()
"""


@dataclass(frozen=True)
class Patient:
    """The identifying attributes of one test study."""

    name: str
    charset: str | None
    patient_id: str
    birth_date: str
    accession: str
    referring: str = ""
    sent_as: str | None = None  # encode the name in this codec whatever ``charset`` says

    def values(self) -> list[str]:
        """Each attribute value, each part of a name, the birth date in DA and ISO form."""
        out = [self.name, self.patient_id, self.accession, self.birth_date]
        names = [self.name, self.referring]
        if self.sent_as:  # as the node decodes it (UTF-8 with replacement characters)
            names.append(self.received_name)
        for name in names:
            if name:
                out.append(name)
                out.extend(p for p in re.split(r"[\^=\s]+", name) if p)
        digits = self.birth_date.replace("-", "")
        out.extend([digits, f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"])
        return sorted(set(out))

    @property
    def received_name(self) -> str:
        """Patient Name as the node reads it (``sent_as`` bytes decoded as UTF-8)."""
        if not self.sent_as:
            return self.name
        return self.name.encode(self.sent_as).decode("utf-8", errors="replace")


PATIENTS = (
    Patient("DOE JOHN", None, "PID-40417", "19510314", "ACC-88213", referring="WELBY MARCUS"),
    Patient("O'BRIEN^SEAN", None, "PID-40418", "19470922", "ACC-88214"),
    Patient("Müller^Jürgen", "ISO_IR 100", "PID-40419", "19620511", "ACC-88215"),
    Patient("山田^太郎", "ISO_IR 192", "PID-40420", "19830127", "ACC-88216"),
    # declared UTF-8, sent in Latin-1 (a common modality misconfiguration): the SR carries it
    # on as it is, and it reads back with replacement characters
    Patient("Sørensen^Åse", "ISO_IR 192", "PID-40422", "19790203", "ACC-88218", sent_as="latin-1"),
)
# a birth date in ISO form is not a valid DA (PS3.5 6.2): pydicom warns with it quoted and
# highdicom refuses to copy it into the SR (the job fails permanently)
MALFORMED = Patient("KOWALCZYK ZBIGNIEW", None, "PID-40421", "1962-07-30", "ACC-88217")


def _forms(term: str) -> list[str]:
    """``term`` as a log line could show it: plain, and escaped by repr/ascii/JSON/bytes."""
    forms = {term, ascii(term)[1:-1], json.dumps(term)[1:-1], repr(term.encode())[2:-1]}
    with suppress(UnicodeEncodeError):
        forms.add(repr(term.encode("latin-1"))[2:-1])
    return sorted(forms)


def _leaks(text: str, terms: list[str]) -> list[str]:
    """Lines of ``text`` that contain a term (ASCII words: as a whole word, case-sensitive)."""
    found = []
    for term in terms:
        for form in _forms(term):
            if form.isascii() and re.fullmatch(r"[A-Za-z']+", form):
                pattern = rf"(?<![A-Za-z]){re.escape(form)}(?![A-Za-z])"
            else:
                pattern = re.escape(form)
            for m in re.finditer(pattern, text):
                start = text.rfind("\n", 0, m.start()) + 1
                end = text.find("\n", m.end())
                found.append(f"{term!r}: {text[start : end if end >= 0 else None][:300]}")
    return found


def _write_study(base: pydicom.Dataset, patient: Patient, path: Path) -> None:
    with warnings.catch_warnings():  # pydicom warns here about the malformed birth date
        warnings.simplefilter("ignore")
        _write(base, patient, path)


def _write(base: pydicom.Dataset, patient: Patient, path: Path) -> None:
    ds = copy.deepcopy(base)
    if patient.charset:
        ds.SpecificCharacterSet = patient.charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.PatientName = patient.name.encode(patient.sent_as) if patient.sent_as else patient.name
    ds.PatientID = patient.patient_id
    ds.AccessionNumber = patient.accession
    ds.ReferringPhysicianName = patient.referring
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientBirthDate = patient.birth_date
    ds.save_as(path, enforce_file_format=True)


def _modes(root: Path) -> Iterator[tuple[Path, int]]:
    yield root, stat.S_IMODE(root.stat().st_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            yield p, stat.S_IMODE(p.lstat().st_mode)


def _not_private(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for path, mode in _modes(root):
            want = 0o700 if path.is_dir() else 0o600
            if mode != want:
                bad.append(f"{oct(mode)} {path}")
    return bad


def _jobs(db: Path) -> list[tuple[str, str | None]]:
    # read-only, through the node's own -shm: this process creates no file next to the DB
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return list(conn.execute("SELECT state, last_error FROM jobs ORDER BY id"))


def _drafts(db: Path) -> list[str]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute("SELECT full_text, findings, impression FROM drafts").fetchall()
    return sorted({t.strip() for row in rows for t in row if t and len(t.strip()) >= 12})


def test_no_patient_data_in_any_log_and_private_files(tmp_path: Path, demo_bundle: Path) -> None:
    storescp = require_binary("storescp")
    storescu = require_binary("storescu")
    inputs, inbox, logs, cwd = (tmp_path / d for d in ("inputs", "inbox", "logs", "cwd"))
    for d in (inputs, inbox, logs, cwd):
        d.mkdir()
    base = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    files = [inputs / f"study{i}.dcm" for i in range(len(PATIENTS) + 1)]
    for patient, path in zip((*PATIENTS, MALFORMED), files, strict=True):
        _write_study(base, patient, path)

    port, pacs_port = free_port(), free_port()
    spool, db = cwd / "spool", cwd / "db" / "node.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "CXR_NODE_AE_TITLE": NODE_AE,
            "CXR_NODE_PORT": str(port),
            "CXR_NODE_DATABASE_URL": f"sqlite:///{db}",
            "CXR_NODE_SPOOL_DIR": str(spool),
            "CXR_NODE_MIN_FREE_DISK_MB": "0",
            "CXR_NODE_API_ENABLED": "false",
            "CXR_NODE_LOG_LEVEL": "DEBUG",
            "CXR_NODE_MODEL_DIR": str(demo_bundle),
            "CXR_NODE_BACKEND": "transformers",
            "CXR_NODE_BACKEND_DTYPE": "float32",
            "CXR_NODE_BACKEND_THREADS": "1",
            "CXR_NODE_GENERATION_GREEDY": "true",
            "CXR_NODE_GENERATION_MAX_NEW_TOKENS": "8",
            "CXR_NODE_STUDY_QUIET_SECONDS": "0.5",
            "CXR_NODE_DESTINATIONS": f"{PACS_AE}@127.0.0.1:{pacs_port}",
            "CXR_NODE_DELIVERY_BACKOFF_SECONDS": "0.5",
        }
    )
    scp_log, node_log = logs / "storescp.log", logs / "node.log"
    with scp_log.open("wb") as out:
        scp = subprocess.Popen(
            [storescp, "-aet", PACS_AE, "-od", str(inbox), str(pacs_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    with node_log.open("wb") as out:
        node = subprocess.Popen(
            [sys.executable, "-W", "always", "-c", LAUNCHER],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            umask=0o022,  # a permissive parent: the node must make its files private itself
        )
    scu_output: list[str] = []
    try:
        wait_for(lambda: port_open(port) or node.poll() is not None, timeout=180, interval=0.2)
        assert node.poll() is None, node_log.read_text(errors="replace")[-3000:]
        umask = re.search(r"^Umask:\s*(\d+)", Path(f"/proc/{node.pid}/status").read_text(), re.M)
        assert umask is not None and umask.group(1) == "0077"

        for path in files:
            r = subprocess.run(
                [storescu, "-aet", PACS_AE, "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            scu_output.append(r.stdout + r.stderr)
            assert r.returncode == 0, r.stderr

        def finished() -> bool:
            states = [s for s, _ in _jobs(db)] if db.exists() else []
            return len(states) == len(files) and all(s in ("done", "failed") for s in states)

        wait_for(finished, timeout=240, interval=0.5)
        wait_for(lambda: len(list(inbox.iterdir())) >= len(PATIENTS), timeout=120, interval=0.5)
        jobs = _jobs(db)
        drafts = _drafts(db)
        # while running: the database's -wal and -shm exist, and must be private too
        assert {p.name for p in db.parent.iterdir()} >= {db.name, f"{db.name}-wal"}
        running_bad = _not_private(spool, db.parent)
    finally:
        terminate(node, timeout=120)
        scp.terminate()
        scp.wait(timeout=30)
    assert node.returncode == 0, node_log.read_text(errors="replace")[-3000:]

    # the four valid studies came back as SRs with the patient data intact ...
    assert [s for s, _ in jobs].count("done") == len(PATIENTS), jobs
    received = [pydicom.dcmread(p) for p in sorted(inbox.iterdir())]
    names = sorted(str(ds.PatientName) for ds in received)
    assert names == sorted(p.received_name for p in PATIENTS)
    # ... and the malformed birth date failed its job with the value redacted
    errors = [e or "" for s, e in jobs if s == "failed"]
    assert len(errors) == 1 and "<redacted>" in errors[0], errors

    # no attribute value, no name part, no report text in any stream
    log_text = node_log.read_text(encoding="utf-8", errors="replace")
    streams = {
        "node stdout/stderr": log_text,
        "storescp": scp_log.read_text(encoding="utf-8", errors="replace"),
        "storescu": "\n".join(scu_output),
        "failed job's error": "\n".join(errors),
    }
    terms = sorted({v for p in (*PATIENTS, MALFORMED) for v in p.values()} | set(drafts))
    leaks = {name: _leaks(text, terms) for name, text in streams.items()}
    assert not any(leaks.values()), json.dumps(leaks, indent=1, ensure_ascii=False)

    # the test saw what it meant to: library debug output and warnings (withheld), and the
    # node's own lines with UIDs and AE titles (kept)
    assert re.search(r"DEBUG pydicom: .*text withheld", log_text)
    assert re.search(r"WARNING pydicom: .*text withheld", log_text)
    assert re.search(r"DEBUG sqlalchemy\.engine\.Engine: .*text withheld", log_text)
    assert "[SQL parameters hidden due to hide_parameters=True]" in log_text
    for ds in received:
        assert str(ds.SOPInstanceUID) in log_text
    assert f"{PACS_AE}@127.0.0.1:{pacs_port}" in log_text
    assert drafts, "no draft text to look for"

    # every file and folder the node created: 0600 / 0700, while running and after the stop
    assert not running_bad, running_bad
    assert not _not_private(cwd / "spool", cwd / "db"), _not_private(cwd / "spool", cwd / "db")
    created = {p.name for p in cwd.iterdir()}
    assert created == {"spool", "db"}, created
