"""Fixtures of the API tests: a real node database, the API served by uvicorn on a free
loopback port (``make_api_server``), tokens of every role, the demo model bundle loaded by
the real model host, and studies seeded through the repository (real DICOM in the spool).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from node.api.server import ApiServer, make_api_server
from node.db import jobs as jobs_db
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db import withdrawals as withdrawals_db
from node.db.engine import make_engine, make_session_factory
from node.db.jobs import transition
from node.db.migrate import upgrade
from node.db.models import AuditLog, Delivery, DeliveryKind, DeliveryState, Draft, Job, utcnow
from node.runtime.modelhost import ModelHost
from node.runtime.service import NodeContext
from node.services.context import ServiceContext
from node.services.tokens import create_token
from node.settings import Settings, load_settings
from tests.helpers import free_port, rg1_file
from tests.node.conftest import db_url, pg_schema_url  # noqa: F401  (fixtures)
from tests.node.factories import record

ROLES = ("viewer", "operator", "admin")
UID_ROOT = "1.2.826.0.1.3680043.10.4242"
#: ``last_attempt_at`` of a seeded delivery
LAST_ATTEMPT = datetime(2026, 11, 29, 4, 5, 6, tzinfo=UTC)
_counter = iter(range(1, 10**9))


def new_uid() -> str:
    """A fresh synthetic UID."""
    return f"{UID_ROOT}.{next(_counter)}"


@pytest.fixture(scope="session")
def model_host(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelHost:
    """The real model host (WORKER's) with the demo bundle, loaded and warmed up."""
    tmp = tmp_path_factory.mktemp("host")
    settings = load_settings(
        model_dir=demo_bundle, spool_dir=tmp / "spool", database_url=f"sqlite:///{tmp}/h.db"
    )
    host = ModelHost(settings)
    host.start()
    assert host.wait_ready(300), host.error
    return host


@pytest.fixture(scope="session")
def rg1_template() -> bytes:
    """RG1_UNCR (a real PA chest CR from pydicom-data) as Part 10 bytes."""
    return rg1_file().read_bytes()


@dataclass
class Seeded:
    """A seeded study and its job."""

    study_uid: str
    sop_uid: str
    job_id: int


@dataclass
class ApiEnv:
    """A migrated database, the API server on a free port, and a token of every role."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    server: ApiServer
    base: str
    tokens: dict[str, str] = field(default_factory=dict)
    token_ids: dict[str, int] = field(default_factory=dict)
    template: bytes = b""

    @property
    def api_ctx(self) -> ServiceContext:
        """An API context on this environment's database (no model)."""
        return ServiceContext(
            settings=self.settings,
            read_sessions=make_session_factory(self.engine, read_only=True),
            write_sessions=self.sessions,
        )

    def client(self, role: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client, with the bearer token of ``role`` when given."""
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=120, **kwargs)

    def actor(self, role: str) -> str:
        """The audit actor of the token of ``role``."""
        return f"token:{self.token_ids[role]}:{role}-test"

    def audit(self, action: str) -> list[AuditLog]:
        """Audit rows with ``action``, oldest first."""
        with self.sessions() as s:
            return list(
                s.scalars(select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.id))
            )

    def job(self, job_id: int) -> Job:
        """The job row as stored now."""
        with self.sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def seed(
        self,
        state: str = "queued",
        *,
        draft: str | None = None,
        destination: str | None = None,
        view: str = "PA",
    ) -> Seeded:
        """Store a real chest CR in the spool and record it; move its job to ``state``.

        ``received``: as recorded; ``queued``: study completed; ``running``: claimed;
        ``failed``: failed for good; ``done``: finished with an SR UID and the selected image
        (``draft`` text stored as its draft, ``destination`` as a failed delivery).
        """
        study, series, sop = new_uid(), new_uid(), new_uid()
        ds = dcmread(BytesIO(self.template))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        ds.ViewPosition = view
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        rel = f"{study}/{series}/{sop}.dcm"
        path = self.settings.spool_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        now = utcnow()
        rec = record(
            study=study,
            series=series,
            sop=sop,
            content=data,
            at=now,
            spool_path=rel,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            view_position=view,
        )
        with self.sessions() as s:
            res = studies_db.record_instance_detailed(s, rec)
        job_id = res.job_id
        assert job_id is not None
        if state == "received":
            return Seeded(study, sop, job_id)
        with self.sessions() as s:
            completion_db.complete_quiet_studies(
                s,
                quiet_seconds=1,
                max_wait_seconds=2,
                now=now + timedelta(seconds=5),
                rule=self.settings.chest_rule,
            )
        if state == "queued":
            return Seeded(study, sop, job_id)
        owner = "test-worker"
        with self.sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None
            transition(job, "running")
            job.attempts += 1
            job.lease_owner = owner
            job.lease_expires_at = utcnow() + timedelta(seconds=60)
            s.commit()
        if state == "failed":
            with self.sessions() as s:
                jobs_db.fail_job(s, job_id, owner=owner, error="pixel data unreadable", retry=False)
        elif state == "done":
            with self.sessions() as s:
                withdrawals_db.finish_job(
                    s,
                    job_id,
                    owner=owner,
                    sr_sop_instance_uid=new_uid(),
                    selected_sop_instance_uid=sop,
                )
                if draft is not None:
                    s.add(
                        Draft(
                            job_id=job_id,
                            full_text=draft,
                            impression=draft,
                            model_name="llm-cxr-demo",
                            model_version="0",
                            demo=True,
                            timings={"encode_s": 0.1, "decode_s": 0.5, "tokens": 12.0},
                            created_at=utcnow(),
                        )
                    )
                if destination is not None:
                    s.add(
                        Delivery(
                            job_id=job_id,
                            destination=destination,
                            kind=DeliveryKind.dimse,
                            state=DeliveryState.failed,
                            attempts=8,
                            last_attempt_at=LAST_ATTEMPT,
                            last_error="association rejected",
                            created_at=utcnow(),
                        )
                    )
                s.commit()
        elif state != "running":
            raise ValueError(state)
        return Seeded(study, sop, job_id)


EnvFactory = Callable[..., ApiEnv]


def start_env(
    tmp: Path,
    template: bytes,
    host: ModelHost | None,
    *,
    url: str | None = None,
    **overrides: Any,
) -> ApiEnv:
    """Migrate a database, start the API server on a free port, create a token per role."""
    url = url or f"sqlite:///{tmp}/node.sqlite3"
    settings = load_settings(
        database_url=url, spool_dir=tmp / "spool", api_port=free_port(), **overrides
    )
    settings.prepare_runtime()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    ctx = NodeContext(settings, engine, sessions, "test-owner", threading.Event())
    if host is not None:
        ctx.extras["model_host"] = host
    server = make_api_server(ctx)
    server.start()
    env = ApiEnv(
        settings=settings,
        engine=engine,
        sessions=sessions,
        server=server,
        base=f"http://{settings.api_host}:{settings.api_port}",
        template=template,
    )
    for role in ROLES:
        row, secret = create_token(env.api_ctx, name=f"{role}-test", role=role, actor="test-setup")
        env.tokens[role] = secret
        env.token_ids[role] = row.id
    return env


def stop_env(env: ApiEnv) -> None:
    """Stop the server and release the database."""
    env.server.stop()
    env.engine.dispose()


@pytest.fixture
def make_env(
    tmp_path: Path, rg1_template: bytes, request: pytest.FixtureRequest
) -> Iterator[EnvFactory]:
    """Start API environments: ``make_env(url=None, model=True, **settings)``."""
    started: list[ApiEnv] = []

    def factory(*, url: str | None = None, model: bool = True, **overrides: Any) -> ApiEnv:
        tmp = tmp_path / f"env{len(started)}"
        tmp.mkdir()
        host = request.getfixturevalue("model_host") if model else None
        env = start_env(tmp, rg1_template, host, url=url, **overrides)
        started.append(env)
        return env

    yield factory
    for env in started:
        stop_env(env)


@pytest.fixture
def env(make_env: EnvFactory) -> ApiEnv:
    """An API environment on SQLite with the demo model."""
    return make_env()
