"""Fixtures for the web console tests: a real node (SCP, SQLite, demo model, worker, delivery,
API + console), a stand-in PACS, API tokens, and headless Chromium driven by Playwright.

Chromium is Debian's ``/usr/bin/chromium`` (``scripts/setup.sh --peers``), launched through
the Python ``playwright`` driver's ``executable_path``; ``playwright install`` is never run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from tests.helpers import free_port, port_open, rg1_file, wait_for

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROLES = ("admin", "operator", "viewer", "reviewer")


def chromium_path() -> str:
    """Debian's Chromium, or skip with the reason."""
    for candidate in (os.environ.get("CXR_NODE_TEST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Debian chromium is not installed (scripts/setup.sh --peers installs it)")
    return found


def launch_chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright driving Debian's binary) until the generator ends."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    path = chromium_path()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium, shared by the session."""
    yield from launch_chromium()


@dataclass
class ConsoleNode:
    """A running node with the console, its stand-in PACS and one token per role."""

    base_url: str
    settings: Any
    pacs: Any
    dead_destination: str
    tokens: dict[str, str]
    token_ids: dict[str, int]
    sessions: sessionmaker[Session]

    def actor(self, role: str) -> str:
        """The audit ``actor`` of the ``role`` token (``token:<id>:<name>``)."""
        return f"token:{self.token_ids[role]}:web-test-{role}"

    def send(self, path: Path) -> None:
        """C-STORE one file to the node's SCP (pynetdicom SCU, as the PACS)."""
        from integration.scu import DicomDestination, send_dataset

        s = self.settings
        result = send_dataset(
            path, DicomDestination(s.ae_title, s.host, s.port), calling_ae=self.pacs.ae_title
        )
        assert result.status == 0x0000


def chest_file(tmp: Path, *, view: str = "PA", **attrs: str) -> tuple[Path, str]:
    """RG1 (a real chest CR) as a new study with ``view`` as View Position and the further
    attributes ``attrs`` (keyword: value); returns its Study Instance UID."""
    ds = dcmread(rg1_file())
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition = view
    path = tmp / f"{ds.StudyInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def start_pacs(inbox: Path) -> Any:
    """The demo's stand-in PACS (``node.demo.DemoPacs``: C-STORE and C-ECHO)."""
    from node.demo import DemoPacs

    pacs = DemoPacs(inbox)
    pacs.start()
    return pacs


@pytest.fixture(scope="session")
def console_node(
    tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path
) -> Iterator[ConsoleNode]:
    """``cxr-node serve``'s components in a thread: SCP, SQLite, model, worker, API + web."""
    from node.db import tokens as tokens_db
    from node.db.engine import make_engine, make_session_factory
    from node.runtime.components import default_components
    from node.runtime.service import run_node
    from node.services.tokens import hash_secret, new_token
    from node.settings import load_settings

    work = tmp_path_factory.mktemp("web-node")
    pacs = start_pacs(work / "pacs-inbox")
    dead = f"DEADPACS@127.0.0.1:{free_port()}"  # nothing listens there
    settings = load_settings(
        None,
        ae_title="WEBNODE",
        host="127.0.0.1",
        port=free_port(),
        api_host="127.0.0.1",
        api_port=free_port(),
        api_enabled=True,
        spool_dir=work / "spool",
        database_url=f"sqlite:///{work / 'node.sqlite3'}",
        model_dir=demo_bundle,
        destinations=f"{pacs.ae_title}@127.0.0.1:{pacs.port},{dead}",
        allowed_aes=pacs.ae_title,
        study_quiet_seconds=1.0,
        min_free_disk_mb=16,
        delivery_backoff_seconds=1.0,
        delivery_max_attempts=2,
        generation_max_new_tokens=16,
    )
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run_node(settings, stop_event=stop, extra_components=default_components(settings))
        except BaseException as exc:  # reported to the test
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=target, name="web-test-node", daemon=True)
    thread.start()
    engine = make_engine(settings.database_url)
    try:
        wait_for(lambda: bool(failure) or port_open(settings.api_port), timeout=120, interval=0.1)
        if failure:
            raise RuntimeError(f"node failed to start: {failure[0]!r}") from failure[0]
        sessions = make_session_factory(engine)
        tokens: dict[str, str] = {}
        ids: dict[str, int] = {}
        for role in ROLES:
            tok = new_token()
            with sessions() as session:
                row = tokens_db.create_token(
                    session,
                    name=f"web-test-{role}",
                    role=role,
                    token_hash=hash_secret(tok),
                    actor="web-test",
                )
            tokens[role], ids[role] = tok, row.id
        base_url = f"http://127.0.0.1:{settings.api_port}"
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}

        def node_ready() -> bool:  # model warmed up, database and spool reachable
            return httpx.get(f"{base_url}/ready", headers=viewer, timeout=10).status_code == 200

        wait_for(node_ready, timeout=180, interval=0.2)
        yield ConsoleNode(
            base_url=base_url,
            settings=settings,
            pacs=pacs,
            dead_destination=dead,
            tokens=tokens,
            token_ids=ids,
            sessions=sessions,
        )
    finally:
        stop.set()
        thread.join(timeout=60)
        engine.dispose()
        pacs.stop()


def job_of_study(node: ConsoleNode, study_uid: str) -> Any:
    """The newest job row of a study (or ``None``)."""
    from sqlalchemy import select

    from node.db.models import Job, Study

    with node.sessions() as session:
        return session.scalars(
            select(Job)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Job.id.desc())
        ).first()


def wait_job_state(node: ConsoleNode, study_uid: str, states: set[str], timeout: float) -> Any:
    """Poll the database until the study's job is in one of ``states``; return the job."""
    found: list[Any] = []

    def check() -> bool:
        job = job_of_study(node, study_uid)
        if job is not None and job.state.value in states:
            found.append(job)
            return True
        return False

    wait_for(check, timeout=timeout, interval=0.2)
    return found[-1]


@pytest.fixture(scope="session")
def done_study(
    console_node: ConsoleNode, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, int]:
    """A frontal chest study sent over C-STORE and drafted: ``(study UID, job id)``."""
    path, uid = chest_file(tmp_path_factory.mktemp("done-study"))
    console_node.send(path)
    job = wait_job_state(console_node, uid, {"done", "failed"}, timeout=300)
    assert job.state.value == "done", job.last_error
    return uid, int(job.id)


def login(context: Any, node: ConsoleNode, role: str) -> Any:
    """Log in through the login page (paste the token, submit); return the page on ``/``."""
    page = context.new_page()
    page.goto(node.base_url + "/")
    assert "/login" in page.url  # no session: redirected
    page.fill("#token", node.tokens[role])
    page.click("#login-submit")
    page.wait_for_url(node.base_url + "/", timeout=15_000)
    return page


@contextlib.contextmanager
def browser_context(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (own cookies), closed afterwards."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield ctx
    finally:
        ctx.close()


def check_png(path: Path, *, min_width: int = 800, min_height: int = 400) -> None:
    """A valid PNG, big enough, and not one flat colour (a page actually rendered)."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= min_width and im.height >= min_height, im.size
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 20, "screenshot is (nearly) one colour"
