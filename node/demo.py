"""``cxr-node demo``: the node's main job on embedded defaults, end to end, in one process.

What it does, in order:

1. builds the demo model bundle (a small, randomly initialised model with the real LLM-CXR
   architecture family and token layout) unless one is already there;
2. starts a stand-in PACS: a pynetdicom Storage SCP (AE ``DEMOPACS``) on a free loopback port;
3. starts the node (storage SCP, SQLite database, local spool, chores, model host, worker,
   delivery) with that PACS as its destination;
4. sends a real chest X-ray (the RG1 PA chest CR from ``pydicom-data``, or a file given with
   ``--image``) to the node over DICOM, as a PACS auto-route would;
5. waits until the draft Structured Report arrives at the stand-in PACS and prints it.

The demo model's output is meaningless by construction; every line printed says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from sqlalchemy import select

from integration.conformance import STORAGE_SCU
from integration.scu import VERIFICATION, DicomDestination, send_dataset
from node.filemodes import make_private_dir, open_private
from node.settings import Settings, load_settings

__all__ = ["DemoPacs", "run_demo", "sr_text_items"]

log = logging.getLogger(__name__)

PACS_AE = "DEMOPACS"
DEMO_BANNER = (
    "DEMO MODEL: randomly initialised weights with the LLM-CXR architecture and token layout. "
    "The report below is machine noise, not a reading of the image."
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoPacs:
    """A stand-in PACS: a Storage SCP that keeps what it receives in ``inbox``.

    Parameters
    ----------
    inbox
        Directory where received instances are written as ``<SOPInstanceUID>.dcm``.
    ae_title
        Its AE title.
    """

    inbox: Path
    ae_title: str = PACS_AE
    port: int = field(default_factory=_free_port)
    received: list[Path] = field(default_factory=list)
    _server: Any = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.inbox / f"{ds.SOPInstanceUID}.dcm"
        with open_private(path) as fh:  # the SR carries the sent image's patient data
            ds.save_as(fh, enforce_file_format=True)
        with self._cond:
            self.received.append(path)
            self._cond.notify_all()
        return 0x0000

    def start(self) -> None:
        """Listen on 127.0.0.1:``port`` for the SR and SC storage classes and C-ECHO."""
        make_private_dir(self.inbox)
        ae = AE(ae_title=self.ae_title)
        for uid in STORAGE_SCU.sop_classes:
            ae.add_supported_context(uid, list(STORAGE_SCU.transfer_syntaxes))
        ae.add_supported_context(VERIFICATION)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()

    def wait_for(self, timeout: float) -> Path | None:
        """Wait for the first received instance; ``None`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.received:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))
            return self.received[0]


def sr_text_items(ds: Dataset) -> list[tuple[str, str]]:
    """Flatten an SR content tree (PS3.3 C.17.3) into ``(concept name, text)`` pairs.

    Containers give their concept name as a heading with empty text; TEXT, CODE and UIDREF
    items give their value. Order is document order.
    """
    out: list[tuple[str, str]] = []

    def walk(items: Any) -> None:
        for item in items:
            name = ""
            if "ConceptNameCodeSequence" in item:
                name = str(item.ConceptNameCodeSequence[0].CodeMeaning)
            vt = item.get("ValueType", "")
            if vt == "CONTAINER":
                out.append((name, ""))
            elif vt == "TEXT":
                out.append((name, str(item.TextValue)))
            elif vt == "CODE":
                out.append((name, str(item.ConceptCodeSequence[0].CodeMeaning)))
            elif vt == "UIDREF":
                out.append((name, str(item.UID)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    if "ConceptNameCodeSequence" in ds:
        out.append((str(ds.ConceptNameCodeSequence[0].CodeMeaning), ""))
    walk(ds.get("ContentSequence", []))
    return out


def _default_image() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:  # pragma: no cover - pydicom-data is a dependency of the demo
        raise FileNotFoundError("RG1_UNCR.dcm not found: pip install pydicom-data")
    return Path(str(path))


@contextlib.contextmanager
def _node_running(settings: Settings) -> Iterator[threading.Event]:
    from node.runtime.components import default_components
    from node.runtime.service import run_node

    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run_node(settings, stop_event=stop, extra_components=default_components(settings))
        except BaseException as exc:  # reported to the main thread
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=target, name="cxr-node", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        with (
            contextlib.suppress(OSError),
            socket.create_connection((settings.host, settings.port), timeout=0.5),
        ):
            break
        time.sleep(0.1)
    if failure:
        raise RuntimeError(f"the node failed to start: {failure[0]}") from failure[0]
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=60)


def _job_rows(settings: Settings) -> list[dict[str, Any]]:
    from node.db import views as views_db
    from node.db.engine import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine, read_only=True)() as session:
            rows, _ = views_db.filter_jobs(session, views_db.JobFilter(limit=20))
            return [j.to_dict() for j in rows]
    finally:
        engine.dispose()


def _draft_row(settings: Settings, sr_uid: str) -> dict[str, Any] | None:
    from node.db.engine import make_engine, make_session_factory
    from node.db.models import Draft, Job

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine, read_only=True)() as session:
            row = session.execute(
                select(Draft)
                .join(Job, Draft.job_id == Job.id)
                .where(Job.sr_sop_instance_uid == sr_uid)
                .order_by(Draft.id.desc())
            ).scalar()
            if row is None:
                return None
            return {
                "model": f"{row.model_name} {row.model_version}",
                "demo": row.demo,
                "timings": row.timings or {},
            }
    finally:
        engine.dispose()


def _demo_bundle(workdir: Path, con: Console) -> Path:
    """The DEMO bundle in ``workdir/model-bundle``, built on the first run; say which."""
    from models.bundle import ModelBundle
    from models.demo import create_demo_bundle

    bundle_dir = workdir / "model-bundle"
    if not (bundle_dir / "manifest.json").exists():
        con.print(f"building the demo model bundle in {bundle_dir} ...")
        create_demo_bundle(bundle_dir, overwrite=True)
    bundle = ModelBundle.open(bundle_dir)
    con.print(
        f"model: {bundle.model_name} {bundle.model_version}"
        + (" [bold red](DEMO)[/bold red]" if bundle.demo else "")
    )
    return bundle_dir


def _fresh_state(workdir: Path) -> None:
    """Empty the database, spool and inbox (the bundle is kept).

    The same RG1 study sent again to a node that already finished it would be an identical
    duplicate (docs/policies.md) and produce no new job, so a second run would wait for
    nothing.
    """
    for name in ("node.sqlite3", "node.sqlite3-wal", "node.sqlite3-shm"):
        (workdir / name).unlink(missing_ok=True)
    for sub in ("spool", "pacs-inbox"):
        shutil.rmtree(workdir / sub, ignore_errors=True)


def run_demo(
    *,
    workdir: Path,
    image: Path | None = None,
    timeout: float = 900.0,
    console: Console | None = None,
) -> int:
    """Run the main job once; return the process exit code (0 when the SR arrived).

    Parameters
    ----------
    workdir
        Where the demo keeps its bundle, database, spool and the stand-in PACS inbox.
    image
        A chest X-ray DICOM file to send; default the RG1 PA chest CR from pydicom-data.
    timeout
        Seconds to wait for the SR at the stand-in PACS.
    console
        Where to print (rich).
    """
    con = console or Console()
    workdir = workdir.resolve()
    make_private_dir(workdir)  # database, spool and SRs inside: 0700 when created here
    con.print(Panel(DEMO_BANNER, style="bold red", title="llm-cxr-node demo"))

    bundle_dir = _demo_bundle(workdir, con)
    _fresh_state(workdir)
    pacs = DemoPacs(workdir / "pacs-inbox")
    pacs.start()
    settings = load_settings(
        None,
        ae_title="LLMCXR",
        host="127.0.0.1",
        port=_free_port(),
        spool_dir=workdir / "spool",
        database_url=f"sqlite:///{workdir / 'node.sqlite3'}",
        model_dir=bundle_dir,
        destinations=f"{pacs.ae_title}@127.0.0.1:{pacs.port}",
        allowed_aes=pacs.ae_title,
        study_quiet_seconds=2.0,
        min_free_disk_mb=64,
        api_enabled=False,
        delivery_backoff_seconds=1.0,
    )
    source = image or _default_image()
    try:
        with _node_running(settings) as stopped:
            con.print(
                f"node listening as {settings.ae_title} on {settings.host}:{settings.port}; "
                f"stand-in PACS {pacs.ae_title} on 127.0.0.1:{pacs.port}"
            )
            t0 = time.monotonic()
            result = send_dataset(
                source,
                DicomDestination(settings.ae_title, settings.host, settings.port),
                calling_ae=pacs.ae_title,
            )
            con.print(
                f"sent {source.name} over DICOM C-STORE: status 0x{result.status:04X} "
                f"in {time.monotonic() - t0:.2f} s; waiting for the study to complete "
                f"({settings.study_quiet_seconds:.0f} s quiet period), the draft, and the SR ..."
            )
            received = None
            deadline = time.monotonic() + timeout
            while received is None and time.monotonic() < deadline and not stopped.is_set():
                received = pacs.wait_for(5.0)
                if received is None:
                    states = ", ".join(f"job {j['id']}: {j['state']}" for j in _job_rows(settings))
                    con.print(f"  ... {states or 'no job yet'}")
            jobs = _job_rows(settings)
        if received is None:
            con.print("[red]no SR arrived at the stand-in PACS[/red]")
            con.print(json.dumps(jobs, indent=2, default=str))
            return 1
        _print_sr(con, received, settings, elapsed=time.monotonic() - t0)
        return 0
    finally:
        pacs.stop()


def _print_sr(con: Console, path: Path, settings: Settings, *, elapsed: float) -> None:
    ds = dcmread(path)
    table = Table(title="Draft SR received by the stand-in PACS", show_header=False)
    table.add_row("file", str(path))
    table.add_row("SOP Class", f"{ds.SOPClassUID.name}")
    table.add_row("SOP Instance UID", str(ds.SOPInstanceUID))
    table.add_row("Study Instance UID", str(ds.StudyInstanceUID))
    table.add_row("Series Description", str(ds.get("SeriesDescription", "")))
    table.add_row(
        "Flags",
        f"Completion {ds.CompletionFlag}, Verification {ds.VerificationFlag}, "
        f"Preliminary {ds.get('PreliminaryFlag', '')}",
    )
    evidence = [
        str(i.ReferencedSOPInstanceUID)
        for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    ]
    table.add_row("Evidence", ", ".join(evidence))
    draft = _draft_row(settings, str(ds.SOPInstanceUID))
    if draft is not None:
        table.add_row("Model", f"{draft['model']}" + (" (DEMO)" if draft["demo"] else ""))
        timings = ", ".join(
            f"{k[:-2]} {v:.2f} s" if k.endswith("_s") else f"{k} {v:g}"
            for k, v in draft["timings"].items()
            if isinstance(v, int | float)
        )
        table.add_row("Stage timings", timings)
    table.add_row("Sent -> SR received", f"{elapsed:.1f} s")
    con.print(table)
    lines = []
    for name, text in sr_text_items(ds):
        lines.append(f"[bold]{name}[/bold]" if not text else f"  {name}: {text}")
    con.print(Panel("\n".join(lines), title="SR content", style="yellow"))
    con.print(Panel(DEMO_BANNER, style="bold red"))
